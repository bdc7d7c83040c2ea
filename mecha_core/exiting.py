"""A quick end of a merge: input maps released in the background, and no garbage collection at
exit.

When the interpreter shuts down it tears the modules down and runs full garbage collections over
everything still alive; with torch imported that is ~190,000 objects, and those passes took a
third of a second of CPU, more than planning a merge. :func:`collect_once_at_exit` registers an
exit handler that freezes every object (:func:`gc.freeze`): shutdown's collections then skip
them. It does not collect first: one full collection of those objects is itself 0.2 s (measured
after an LLM merge on the 2-core machine), and the garbage it would find is a few hundred
objects. Objects are still freed by reference counting as the modules are torn down; only
reference cycles left at exit go to the operating system, whose finalizers CPython never
promised to run (``weakref.finalize`` and ``atexit`` handlers still run). Nothing of a merge
depends on them: its output is written, flushed and renamed before the merge returns.

``MECHA_EXIT_GC=full`` keeps Python's own shutdown.

:func:`release_in_background` drops the last reference to an input's memory map on a thread:
unmapping a map whose pages were read undoes every page's entry (about 0.1 s of system time per
GB read), which a merge's caller need not wait for; the output was renamed into place before.
"""

from __future__ import annotations

import atexit
import gc
import os
import queue
import threading
from typing import Any

_lock = threading.Lock()
_registered = False
_releases: queue.SimpleQueue[list[Any]] | None = None
_releases_pid = 0  # the process whose thread drains _releases (a forked child starts its own)


def _freeze() -> None:
    if os.environ.get("MECHA_EXIT_GC") == "full":
        return
    gc.freeze()


def freezes_at_exit() -> bool:
    """Whether this process is the ``mecha`` command's and will freeze its objects at exit (the
    command registered :func:`collect_once_at_exit`, ``MECHA_EXIT_GC`` is not ``full``): it may
    then freeze them earlier too (``mecha_core.lazy``). A program that imports mecha keeps its
    own collector as it set it."""
    return _registered and os.environ.get("MECHA_EXIT_GC") != "full"


def collect_once_at_exit() -> None:
    """Make this process's exit skip the interpreter's shutdown collections (see the module
    docstring); the first call registers the exit handler, later calls do nothing."""
    global _registered
    with _lock:
        if not _registered:
            atexit.register(_freeze)
            _registered = True


def _release_forever(pending: queue.SimpleQueue[list[Any]]) -> None:
    while True:
        held = pending.get()
        held.clear()  # the last reference: the map is unmapped here, off the caller's thread


def release_in_background(obj: Any) -> None:
    """Drop a reference to ``obj`` on a daemon thread (one per process, started on first use),
    so that freeing it (unmapping a memory map: the kernel undoes each mapped page) does not
    hold up the caller. Whoever else holds ``obj`` keeps it alive as usual."""
    global _releases, _releases_pid
    with _lock:
        if _releases is None or _releases_pid != os.getpid():
            _releases, _releases_pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=_release_forever, args=(_releases,), name="mecha-release",
                             daemon=True).start()
        _releases.put([obj])
