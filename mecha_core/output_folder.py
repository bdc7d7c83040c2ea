"""Writing a model as a Hugging Face folder: a folder that appears whole, and what goes in it
besides the shards (whose layout is :mod:`mecha_core.engine.shards`).

:class:`OutputFolder` is :class:`~mecha_core.output.OutputFile` for a folder: the work goes to a
temporary folder ``.NAME.mecha-PID-RANDOM.tmp`` beside the target, renamed over it only when
everything worked; an existing output folder is moved aside first and removed only after the
rename. Leaving the block without :meth:`OutputFolder.commit` removes the temporary folder.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import shutil
import stat
from typing import Any, Mapping

from .errors import MechaError, OutputError
from .files import os_error_text
from .output import _LIVE, NAME_MAX, Protected, TerminateAsInterrupt, sweep_stale, temp_prefix

#: ``save_pretrained``'s default ``max_shard_size`` in transformers 5.24.0 ("50GB", decimal units)
DEFAULT_SHARD_SIZE = 50 * 10 ** 9
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
RECIPE_NAME = "recipe.mecha"
#: Files of an input folder that are weights (or describe weights) and so are never copied.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx",
                   ".index.json")
#: Other files of an input folder that describe that input, not the merge.
NOT_COPIED = frozenset({RECIPE_NAME, "README.md", ".gitattributes"})

_UNITS = {"": 1, "b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_shard_size(value: int | str) -> int:
    """Bytes from ``5GB``/``500MB`` (decimal units, as transformers reads them), ``2GiB`` (binary)
    or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        size = int(float(m.group(1)) * _UNITS[unit]) if m and unit in _UNITS else 0
    if size < 1:
        raise MechaError(f"--shard-size: cannot read {value!r} as a positive size (e.g. 5GB, 500MB, or bytes)")
    return size


def is_folder_output(output: str | os.PathLike[str]) -> bool:
    """Whether ``output`` asks for a folder: a name ending with a slash, or an existing folder."""
    text = os.fspath(output)
    return text.endswith(("/", os.sep)) or os.path.isdir(text)


def files_to_copy(folder: str) -> list[str]:
    """The names of the non-weight files of an input folder (config, tokenizer, chat template ...)
    that an output folder takes over: regular files at its top level, not hidden."""
    names = []
    try:
        listing = sorted(os.listdir(folder))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot list the files to copy: {os_error_text(exc)}") from None
    for name in listing:
        if name.startswith(".") or name in NOT_COPIED or name.lower().endswith(WEIGHT_SUFFIXES):
            continue
        if os.path.isfile(os.path.join(folder, name)):
            names.append(name)
    return names


def _inside(path: str, folder: str) -> bool:
    try:
        real, root = os.path.realpath(path), os.path.realpath(folder)
    except (OSError, ValueError):
        return False
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def _looks_like_output(folder: str) -> bool:
    """Whether an existing folder may be replaced: empty, or a model folder (weights at its top,
    no subfolders), not a folder of anything else."""
    try:
        names = os.listdir(folder)
    except OSError:
        return False
    if not names:
        return True
    if any(os.path.isdir(os.path.join(folder, n)) and not n.startswith(".") for n in names):
        return False
    return SINGLE_NAME in names or INDEX_NAME in names


class OutputFolder:
    """A folder to write atomically at ``target``; ``protect``: paths it must never replace.

    The constructor checks the target before any work (:class:`OutputError`, one line naming the
    path): a new name in an existing, writable folder, or an existing folder that is empty or a
    model folder (replacing another folder would delete what it holds), that contains none of
    the ``protect`` paths and is none of them.
    """

    def __init__(self, target: str | os.PathLike[str], *, protect: Protected = ()):
        self.given = os.fspath(target)
        if not self.given or "\0" in self.given:
            raise OutputError(f"{ascii(self.given)[:80]}: not a valid output folder name")
        self.target = os.path.abspath(self.given.rstrip("/" + os.sep) or self.given)
        if os.path.islink(self.target):  # written through, as for a file
            self.target = os.path.realpath(self.target)
        self.parent = os.path.dirname(self.target)
        self.path: str | None = None
        self.committed = False
        self._signals: TerminateAsInterrupt | None = None
        self._check(protect)

    def _fail(self, reason: str) -> OutputError:
        return OutputError(f"{self.given}: {reason}")

    def _check(self, protect: Protected) -> None:
        name = os.path.basename(self.target)
        if len(os.fsencode(name)) > NAME_MAX:
            raise self._fail(f"the folder name is {len(os.fsencode(name))} bytes long; at most {NAME_MAX} fit")
        try:
            st = os.stat(self.target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise self._fail(os_error_text(exc)) from None
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise self._fail("exists and is not a folder; a folder output needs a new name or a folder")
        if st is not None and not _looks_like_output(self.target):
            raise self._fail("is a folder that holds other things than a model (subfolders, or no "
                             "model.safetensors / model.safetensors.index.json); replacing it would delete "
                             "them: choose a new or empty folder")
        try:
            pst = os.stat(self.parent)
        except OSError as exc:
            raise self._fail(f"the folder {self.parent}: {os_error_text(exc)}") from None
        if not stat.S_ISDIR(pst.st_mode):
            raise self._fail(f"{self.parent} is not a folder")
        if not os.access(self.parent, os.W_OK | os.X_OK):
            raise self._fail(f"cannot write in {self.parent}: permission denied")
        labels = protect.items() if isinstance(protect, Mapping) else ((p, None) for p in protect)
        for path, label in labels:
            path = os.fspath(path)
            if _inside(path, self.target):
                raise self._fail(f"the output folder would replace {label or 'the input ' + path}; "
                                 f"choose another folder")

    def __enter__(self) -> "OutputFolder":
        sweep_stale(self.parent)
        self._signals = TerminateAsInterrupt().__enter__()
        try:
            self.path = self._new_temp()
            _LIVE.add(self.path)
            return self
        except BaseException:
            self._signals.__exit__(None, None, None)
            raise

    def _new_temp(self) -> str:
        prefix = temp_prefix(self.target)
        for _ in range(100):
            path = os.path.join(self.parent, f"{prefix}mecha-{os.getpid()}-{secrets.token_hex(6)}.tmp")
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                continue
            except OSError as exc:
                raise self._fail(f"cannot write in {self.parent}: {os_error_text(exc)}") from None
            return path
        raise self._fail(f"cannot create a temporary folder in {self.parent}")

    def file(self, name: str) -> str:
        """The path of ``name`` inside the temporary folder."""
        assert self.path is not None
        return os.path.join(self.path, name)

    def commit(self) -> str:
        """Give the folder and its files their modes and rename it over the target (an existing
        folder is moved aside, then removed); returns the target path."""
        if self.path is None or self.committed:
            raise RuntimeError("commit() outside the with block, or twice")
        aside = None
        try:
            file_mode = _new_mode(0o666)
            for name in os.listdir(self.path):
                os.chmod(os.path.join(self.path, name), file_mode)
            os.chmod(self.path, _new_mode(0o777))
            if os.path.isdir(self.target):
                aside = self._new_temp()
                _LIVE.add(aside)
                os.rename(self.target, aside)  # replaces the empty folder just made
            try:
                os.rename(self.path, self.target)
            except OSError:
                if aside is not None:
                    os.rename(aside, self.target)
                    _LIVE.discard(aside)
                    aside = None
                raise
        except OSError as exc:
            raise self._fail(f"writing failed: {os_error_text(exc)}") from None
        finally:
            if aside is not None:
                shutil.rmtree(aside, ignore_errors=True)
                _LIVE.discard(aside)
        _LIVE.discard(self.path)
        self.committed = True
        return self.target

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.path is not None and not self.committed:
                shutil.rmtree(self.path, ignore_errors=True)
                _LIVE.discard(self.path)
        finally:
            if self._signals is not None:
                self._signals.__exit__(None, None, None)
                self._signals = None


def _new_mode(bits: int) -> int:
    """``bits`` as the umask allows them (the modes of new files and folders)."""
    mask = os.umask(0)
    os.umask(mask)
    return bits & ~mask


def write_bytes(path: str, data: bytes) -> None:
    """A small file (index, recipe, copied config) inside the temporary folder."""
    try:
        with open(path, "xb") as f:
            f.write(data)
    except OSError as exc:
        raise OutputError(f"{path}: writing failed: {os_error_text(exc)}") from None


def copy_file(source: str, target: str) -> None:
    try:
        shutil.copyfile(source, target)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise OutputError(f"{target}: not enough disk space to copy {source}") from None
        raise OutputError(f"copying {source}: {os_error_text(exc)}") from None
