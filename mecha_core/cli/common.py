"""What every command shares: the error boundary and JSON output."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import typer

from ..errors import EXIT_INTERRUPTED, EXIT_TERMINATED, MechaError


def debug_enabled() -> bool:
    return os.environ.get("MECHA_DEBUG") == "1"


def printable(message: str) -> str:
    """``message`` with control characters escaped: key names and paths come from files the user
    did not write, and a key holding terminal escape codes must not rewrite their screen."""
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in message)


def json_error(message: str, kind: str, file: str | None = None, line: int | None = None) -> None:
    """The JSON error object a failing command prints on stdout under ``--json`` (the one-line
    message still goes to stderr): ``error`` the message, ``kind`` the error class, ``file`` and
    ``line`` where known (null otherwise)."""
    print_json({"error": message, "kind": kind, "file": file, "line": line})


def _report(exc: BaseException, message: str, as_json: bool) -> None:
    if as_json:
        json_error(message, type(exc).__name__, getattr(exc, "source", None), getattr(exc, "line", None))
    typer.echo(f"error: {printable(message)}", err=True)


def boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MechaError into one line on stderr (and, under ``--json``, a JSON error object on
    stdout) and its exit code; Ctrl-C into 130 and SIGTERM into 143 (tracebacks with
    MECHA_DEBUG=1). The command's ``--json`` flag is its ``json_out`` argument."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("json_out"))
        try:
            return fn(*args, **kwargs)
        except MechaError as exc:
            if debug_enabled():
                raise
            _report(exc, str(exc), as_json)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            run = sys.modules.get("mecha_core.engine.run")  # its Terminated is SIGTERM during a merge
            terminated = run is not None and isinstance(exc, run.Terminated)
            if as_json:
                json_error("terminated" if terminated else "interrupted", type(exc).__name__)
            typer.echo("interrupted; nothing was written", err=True)
            raise typer.Exit(EXIT_TERMINATED if terminated else EXIT_INTERRUPTED) from None

    return wrapper


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
