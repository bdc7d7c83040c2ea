"""A quick interpreter exit after a merge: one garbage collection at exit instead of shutdown's.

When the interpreter shuts down it tears the modules down and runs full garbage collections over
everything still alive; with torch imported that is ~170,000 objects, and those passes took a
third of a second of CPU, more than planning a merge. :func:`collect_once_at_exit` registers an
exit handler that collects once while every module is still importable (so the finalizers of
cyclic garbage run, and with working modules), then freezes the survivors (:func:`gc.freeze`):
shutdown's collections then skip them. Survivors are still freed by reference counting as the
modules are torn down; only reference cycles still reachable from a module at exit are left to the
operating system, whose finalizers CPython never promised to run. Nothing of a merge depends on
them: its output is written, flushed and renamed before the merge returns.

``MECHA_EXIT_GC=full`` keeps Python's own shutdown.
"""

from __future__ import annotations

import atexit
import gc
import os
import threading

_lock = threading.Lock()
_registered = False


def _collect_and_freeze() -> None:
    if os.environ.get("MECHA_EXIT_GC") == "full":
        return
    gc.collect()
    gc.freeze()


def collect_once_at_exit() -> None:
    """Make this process's exit skip the interpreter's shutdown collections (see the module
    docstring); the first call registers the exit handler, later calls do nothing."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(_collect_and_freeze)
            _registered = True
