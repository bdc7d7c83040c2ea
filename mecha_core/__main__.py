"""The ``mecha`` console script and ``python -m mecha_core``.

The first thing the command imports, so it stays tiny: Ctrl-C or SIGTERM while the rest (typer,
and for merges torch, which takes seconds) is still importing exits 130 or 143 without a
traceback, like it does later.
"""

from __future__ import annotations

import os
import signal
import sys


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(143)  # unwinds like an exception, so cleanups run; a merge installs its own


_terminate.mecha_startup = True  # type: ignore[attr-defined]  # a merge's handler replaces it


def main() -> int:
    """Run the command line; returns the exit code."""
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminate)
        from .exiting import collect_once_at_exit

        collect_once_at_exit()  # the command's process ends without shutdown's collections
        from .cli.app import run

        return run()
    except KeyboardInterrupt:
        if os.environ.get("MECHA_DEBUG") == "1":
            raise
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
