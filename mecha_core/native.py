"""Small C kernels, compiled on first use and loaded with ctypes, for the loops where eager torch
makes a pass over memory per operation.

A kernel is C source text (a plugin keeps it in a string). :func:`load` compiles it once per
machine with the system's C compiler (``$CC``, else ``cc``), caches the shared library under
``$XDG_CACHE_HOME/mecha/kernels`` (``~/.cache`` when unset), and returns a ``ctypes.CDLL``;
ctypes releases the GIL during the call, so the merge's worker threads run kernels at once.

Same bytes as torch: the flags are ``-O3 -march=native -ffp-contract=off`` and never
``-ffast-math``, so every float operation is IEEE single or double precision, rounded as written,
with no fused multiply-add; vector instructions give the same bits per element as scalar ones.
The library's name is a digest of the source, the flags, the compiler and the CPU model and
flags, so a cache folder shared by different machines never hands one another's build.

Where there is no compiler, the build fails or ``MECHA_NATIVE=0`` is set, :func:`load` returns
``None`` (and :func:`why_not` says why): the caller keeps an eager torch path that gives the same
bytes, and uses it then.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from typing import Any

#: compiler flags; part of every library's digest
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-std=c99")

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_reasons: dict[str, str] = {}
_functions: dict[tuple[str, str, str], Any] = {}


def load(name: str, source: str) -> ctypes.CDLL | None:
    """The kernel library ``name`` built from ``source`` (compiled now if this machine has no
    build of it yet), or ``None`` where native kernels are off or cannot be built."""
    if os.environ.get("MECHA_NATIVE") == "0":
        _reasons[name] = "MECHA_NATIVE=0 is set"
        return None
    with _lock:  # one build per process, whichever worker asks first
        key = f"{name}\0{source}"
        if key not in _loaded:
            _loaded[key] = _build(name, source)
        return _loaded[key]


def function(name: str, source: str, symbol: str, restype: Any, argtypes: list[Any]) -> Any:
    """The C function ``symbol`` of the kernel library ``name`` built from ``source`` (see
    :func:`load`), its ctypes result and argument types set; looked up once per process, so a
    caller on a hot path pays a dictionary lookup. ``None`` where :func:`load` gives ``None``."""
    key = (name, source, symbol)
    if key not in _functions:
        library = load(name, source)
        fn = None
        if library is not None:
            fn = getattr(library, symbol)
            fn.restype, fn.argtypes = restype, argtypes
        _functions[key] = fn
    return _functions[key]


def why_not(name: str) -> str | None:
    """Why the last :func:`load` of ``name`` returned ``None`` (``None`` if it did not)."""
    return _reasons.get(name)


def cache_folder() -> str:
    """Where built kernels are kept: ``$XDG_CACHE_HOME/mecha/kernels`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mecha", "kernels")


def _build(name: str, source: str) -> ctypes.CDLL | None:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        _reasons[name] = f"no C compiler ({os.environ.get('CC') or 'cc'} not found)"
        return None
    compiler = os.path.realpath(compiler)
    folder = cache_folder()
    path = os.path.join(folder, f"{name}-{_digest(source, compiler)}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(folder, exist_ok=True)
            _compile(compiler, source, folder, path)
        except (OSError, subprocess.SubprocessError) as exc:
            _reasons[name] = f"could not build it in {folder}: {' '.join(str(exc).split())[:300]}"
            return None
    try:
        library = ctypes.CDLL(path)
    except OSError as exc:
        _reasons[name] = f"could not load {path}: {exc}"
        return None
    _reasons.pop(name, None)
    return library


def _compile(compiler: str, source: str, folder: str, path: str) -> None:
    """Compile into a file of this call's own, then rename it into place: processes that build
    the same kernel at once each rename a whole library."""
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build-") as work:
        c_file = os.path.join(work, "kernel.c")
        built = os.path.join(work, "kernel.so")
        with open(c_file, "w", encoding="utf-8") as f:
            f.write(source)
        done = subprocess.run([compiler, *FLAGS, "-o", built, c_file], capture_output=True, text=True,
                              timeout=120, check=False)
        if done.returncode != 0:
            raise subprocess.SubprocessError(f"{os.path.basename(compiler)} exited {done.returncode}: "
                                             f"{done.stderr.strip()}")
        os.replace(built, path)


def _digest(source: str, compiler: str) -> str:
    stat = os.stat(compiler)
    parts = [source, " ".join(FLAGS), compiler, str(stat.st_size), str(stat.st_mtime_ns), _cpu()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _cpu() -> str:
    """The CPU's model and feature flags (what ``-march=native`` builds for)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f if line.startswith(("model name", "flags", "Features", "CPU part"))]
        return "".join(dict.fromkeys(lines))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
