"""What every command shares: the error boundary and JSON output."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any, Callable

import typer

from ..errors import MechaError


def debug_enabled() -> bool:
    return os.environ.get("MECHA_DEBUG") == "1"


def printable(message: str) -> str:
    """``message`` with control characters escaped: key names and paths come from files the user
    did not write, and a key holding terminal escape codes must not rewrite their screen."""
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in message)


def boundary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MechaError into one line on stderr and exit code 2 (traceback with MECHA_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MechaError as exc:
            if debug_enabled():
                raise
            typer.echo(f"error: {printable(str(exc))}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt as exc:
            if debug_enabled():
                raise
            from ..engine.run import Terminated

            typer.echo("interrupted; nothing was written", err=True)
            raise typer.Exit(143 if isinstance(exc, Terminated) else 130) from None

    return wrapper


def print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")
