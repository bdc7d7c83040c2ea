"""What every command shares: the error boundary and JSON output."""

from __future__ import annotations

import functools
import json
import os
import re
import sys
from typing import Any, Callable, NoReturn

import typer

from ..errors import EXIT_INTERRUPTED, MechaError


def debug_enabled() -> bool:
    return os.environ.get("MECHA_DEBUG") == "1"


#: Longest quoted value ('...' or "...") an error message shows whole; longer ones are cut.
QUOTED_LIMIT = 200
#: Longest error message printed; longer ones keep their start and end around "...".
MESSAGE_LIMIT = 1000

_QUOTED = re.compile(rf"'[^'\n]{{{QUOTED_LIMIT + 1},}}'|\"[^\"\n]{{{QUOTED_LIMIT + 1},}}\"")


def escaped(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as an escape (``\\x1b``, ``\\n``): text
    from files (key names, paths, plugin messages, recipes) must not move the cursor, recolour
    or retitle the user's terminal. ``keep_newlines``: for multi-line text (``recipe show``)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or (keep_newlines and c == "\n") else ascii(c)[1:-1] for c in text)


def _cut(text: str, limit: int, tail: int) -> str:
    return text if len(text) <= limit else f"{text[:limit - tail - 5]} ... {text[-tail:]}"


def printable(message: str) -> str:
    """``message`` as ONE line a terminal shows safely: control characters (newlines too)
    escaped, each quoted value cut to about :data:`QUOTED_LIMIT` characters and the whole to
    about :data:`MESSAGE_LIMIT`, keeping the start and the end (which says what to do)."""
    if len(message) > 50 * MESSAGE_LIMIT:  # bounded work for a message of megabytes
        message = message[:25 * MESSAGE_LIMIT] + message[-25 * MESSAGE_LIMIT:]
    line = escaped(message)
    line = _QUOTED.sub(lambda m: _cut(m.group(), QUOTED_LIMIT, 41), line)  # 41: the end quote too
    return _cut(line, MESSAGE_LIMIT, 200)


def json_error(message: str, kind: str, file: str | None = None, line: int | None = None) -> None:
    """The JSON error object a failing command prints on stdout under ``--json`` (the one-line
    message still goes to stderr): ``error`` the message, ``kind`` the error class, ``file`` and
    ``line`` where known (null otherwise)."""
    print_json({"error": message, "kind": kind, "file": file, "line": line})


def fail(exc: MechaError, as_json: bool = False) -> NoReturn:
    """End the command on ``exc``: one escaped line on stderr (and, with ``as_json``, the JSON
    error object on stdout), exit with its code; with MECHA_DEBUG=1, raise it (traceback)."""
    if debug_enabled():
        raise exc
    message = str(exc)
    if as_json:
        json_error(message, type(exc).__name__, getattr(exc, "source", None), getattr(exc, "line", None))
    typer.echo(f"error: {printable(message)}", err=True)
    raise typer.Exit(exc.exit_code) from None


def boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MechaError into one line on stderr (and, under ``--json``, a JSON error object on
    stdout) and its exit code (see docs/engine.md); Ctrl-C into 130, and another signal that
    ends a merge (SIGTERM, SIGHUP, ...: see :class:`mecha_core.output.Terminated`) into 128 +
    its number, after one line (tracebacks with MECHA_DEBUG=1). The command's ``--json`` flag is
    its ``json_out`` argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except MechaError as exc:
            fail(exc, as_json)
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            from ..output import Terminated  # no torch: mecha_core.output is the file writer only

            terminated = isinstance(exc, Terminated)
            if as_json:
                json_error("terminated" if terminated else "interrupted", type(exc).__name__)
            if terminated:
                typer.echo(f"interrupted by {exc.args[0]}; nothing was written", err=True)
                raise typer.Exit(exc.exit_code) from None
            typer.echo("interrupted; nothing was written", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
