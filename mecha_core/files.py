"""Reading what users name and what files hold, in bounded time and memory.

- :func:`read_text_file`: a recipe (or any text file) checked before it is read: a regular
  file (not a FIFO, device or socket, which would block or never end), at most a size bound,
  not a model or other binary file (sniffed from its first bytes), UTF-8.
- :func:`loads_bounded`: JSON from a file (a safetensors ``__metadata__`` entry, a config)
  with bounded size and nesting, so that a 100,000-deep array is a one-line error, not a
  ``RecursionError``.
- :func:`os_error_text`: the reason of an ``OSError`` in words ("symbolic link loop", ...).
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import re
import stat
from typing import Any, Callable

from .errors import MechaError, RecipeError

#: Largest recipe file read (64 MiB): real recipes are kilobytes; a bigger file is a mistake
#: (a model, a log) and reading it whole would cost its size in memory.
RECIPE_SIZE_LIMIT = 64 * 1024 * 1024

#: Deepest nesting of arrays/objects accepted in JSON from files; real configs nest 2-3 levels.
JSON_MAX_DEPTH = 64

#: Longest JSON text accepted from a file's metadata entry (4 MiB).
JSON_MAX_CHARS = 4 * 1024 * 1024


def os_error_text(exc: OSError) -> str:
    """Why an operation on a path failed, in words (ELOOP: "symbolic link loop")."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop (a link that points, through links, back to itself)"
    if exc.errno == errno.ENAMETOOLONG:
        return "the file name is too long for the filesystem"
    if exc.errno == errno.ENOENT:
        return "no such file"
    if exc.errno == errno.ENOTDIR:
        return "a part of the path is not a folder"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def special_kind(mode: int) -> str | None:
    """``None`` for a regular file, else what the path is, in words ("a folder", "a FIFO ...")."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def binary_kind(head: bytes, size: int) -> str | None:
    """What a file that starts with ``head`` (and has ``size`` bytes) is, when it is not text."""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size:
        return "a safetensors model"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive (a PyTorch .ckpt/.pt model?)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle (a .ckpt/.pt model?)"
    if head.startswith(b"GGUF"):
        return "a GGUF model"
    if b"\0" in head:
        return "binary data (not UTF-8 text)"
    return None


def shown(path: str) -> str:
    """A path as messages show it: escaped when it holds control characters, cut when very long."""
    text = path if path.isprintable() else ascii(path)[1:-1]
    return text if len(text) <= 300 else text[:200] + "..." + text[-50:]


def read_text_file(path: str | os.PathLike[str], *, what: str = "recipe", limit: int = RECIPE_SIZE_LIMIT,
                   error: Callable[[str], MechaError] = RecipeError) -> str:
    """The text of the file at ``path``, read in bounded time and memory.

    Refused with ``error(message)`` (one line naming the file): a missing file, a symbolic link
    loop, a folder, FIFO, device or socket (checked before opening; opened non-blocking, so a
    FIFO swapped in meanwhile cannot hang), a file over ``limit`` bytes, a model or other binary
    file (from its first bytes, before the rest is read), text that is not UTF-8.
    """
    p = os.fspath(path)
    name = shown(p)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        broken = os.path.islink(p)
        missing = " (a symbolic link to a missing file)" if broken else ""
        raise error(f"{name}: no such {what} file{missing}") from None
    except OSError as exc:
        raise error(f"{name}: cannot read the {what}: {os_error_text(exc)}") from None
    except ValueError:  # a NUL byte or a lone surrogate: no file can have this name
        raise error(f"{ascii(p)[:80]}: not a valid {what} file name") from None
    kind = special_kind(st.st_mode)
    if kind is not None:
        raise error(f"{name}: is {kind}, not a {what} file")
    try:
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise error(f"{name}: cannot read the {what}: {os_error_text(exc)}") from None
    try:
        st = os.fstat(fd)  # what was opened, which may not be what was checked a moment ago
        kind = special_kind(st.st_mode)
        if kind is not None:
            raise error(f"{name}: is {kind}, not a {what} file")
        head = os.pread(fd, 4096, 0)
        binary = binary_kind(head, st.st_size)
        if binary is not None:
            raise error(f"{name}: is {binary}, not a {what} file (a {what} is text)")
        if st.st_size > limit:
            raise error(f"{name}: {st.st_size:,} bytes is too large for a {what} file (at most {limit:,})")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:  # it grew after the size check
            raise error(f"{name}: more than {limit:,} bytes; too large for a {what} file")
    except OSError as exc:
        raise error(f"{name}: cannot read the {what}: {os_error_text(exc)}") from None
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{name}: not a text {what} (it is not UTF-8; is it a model file?)") from None


class JSONLimitError(ValueError):
    """JSON from a file is too large or too deeply nested to be parsed safely."""


# A JSON string (escapes included): removed before counting brackets, whose nesting is the depth.
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text`` (0 for a scalar). Linear time; for text
    that is not valid JSON the count is an upper bound of what a parser would reach."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP.__getitem__, brackets)), default=0)


def loads_bounded(text: str | bytes, *, max_depth: int = JSON_MAX_DEPTH, max_chars: int = JSON_MAX_CHARS,
                  **kwargs: Any) -> Any:
    """``json.loads(text)`` for untrusted text: :class:`JSONLimitError` (a ``ValueError``) when it
    is longer than ``max_chars`` or nests deeper than ``max_depth``; ``json.JSONDecodeError``
    (also a ``ValueError``) when it is not JSON. The messages are one line."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8")
    if len(text) > max_chars:
        raise JSONLimitError(f"{len(text):,} characters of JSON, more than the {max_chars:,} accepted")
    depth = json_depth(text)
    if depth > max_depth:
        raise JSONLimitError(f"JSON nested {depth:,} levels deep, more than the {max_depth} accepted")
    try:
        return json.loads(text, **kwargs)
    except RecursionError:  # unreachable after the depth check; kept so no traceback can escape
        raise JSONLimitError("JSON nested too deeply") from None
