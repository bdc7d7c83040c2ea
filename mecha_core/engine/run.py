"""Running a plan: the output file, and each unit's result checked, cast and written in place.

The output header is written first; every unit of work then writes its bytes at an offset fixed
by the plan, so the file's bytes never depend on the thread count or on which unit ends first.
The file is a temporary one beside the target, renamed into place only when everything worked.
"""

from __future__ import annotations

import math
import os
import signal
import tempfile
import threading
from typing import Any, Callable

import torch

from ..errors import MergeError, OutputError
from .evaluate import Evaluator
from .plan import Plan
from .safetensors_io import ITEMSIZE, build_header, is_float, tensor_bytes, torch_dtype
from .schedule import Unit, run_units


#: output dtypes without infinity, where torch clamps out-of-range values instead of making them
#: Inf: the magnitude above which a value would round past the largest finite one (448 + half
#: an ulp of 32), i.e. where float16 would give Inf
_SATURATES = {"float8_e4m3fn": 464.0}


def _to_output(value: torch.Tensor, dtype: str, key: str, where: str, allow_nonfinite: bool) -> torch.Tensor:
    """``value`` cast to the output ``dtype``, refusing NaN/Inf and values the cast would overflow.

    One ``aminmax`` pass proves the common case (it propagates NaN, and an Inf is its own min or
    max): about 25x cheaper than ``isfinite(...).all()``, which took a third of a merge's time.
    Elements are counted only on the way to an error.
    """
    out_dtype = torch_dtype(dtype)
    if allow_nonfinite or value.numel() == 0:
        return value.to(dtype=out_dtype)
    lo, hi = (float(v) for v in torch.aminmax(value))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeError(f"key '{key}': {bad} NaN/Inf value(s) in the result{where}; check the "
                         f"inputs, or pass --allow-nonfinite to write them anyway")
    cast = value.to(dtype=out_dtype)
    if max(-lo, hi) <= torch.finfo(out_dtype).max:
        return cast  # everything fits: nothing can round to Inf or saturate
    limit = _SATURATES.get(dtype)
    if limit is not None:
        bad = int((value.abs() > limit).sum())
    else:  # above the largest finite value may still round down to it: count what became Inf
        bad = int((~torch.isfinite(cast.float() if cast.element_size() == 1 else cast)).sum())
    if bad:
        raise MergeError(f"key '{key}': {bad} value(s){where} overflow {dtype}; choose a wider "
                         f"--output-dtype, or pass --allow-nonfinite to write them anyway")
    return cast


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def resolve_output(output: str | os.PathLike[str]) -> str:
    """The absolute path a result is written to: through a symbolic link, as cp does, rather
    than replacing the link."""
    target = os.path.abspath(os.fspath(output))
    return os.path.realpath(target) if os.path.islink(target) else target


def temp_prefix(target: str) -> str:
    """``.NAME.`` for the temporary file beside ``target``, NAME cut to 100 bytes: a legal long
    output name (up to 255 bytes) must not make the temporary name too long to create."""
    name = os.path.basename(target)
    while len(os.fsencode(name)) > 100:
        name = name[:-1]
    return f".{name}."


def output_mode(target: str) -> int:
    """The permission bits for a new output: an existing file's own, else what the umask allows."""
    try:
        return os.stat(target).st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def execute(plan: Plan, output: str | os.PathLike[str], metadata: dict[str, str], *,
            progress: bool = False, write_hook: Callable[[str], None] | None = None) -> str:
    """Write the merge to ``output`` atomically; returns the absolute output path.

    ``write_hook`` is called with each key before it is written (tests use it to simulate faults).
    """
    target = resolve_output(output)
    for path in plan.input_paths:
        if _same_file(path, target):
            raise OutputError(f"{output}: the output would overwrite the input {path}; choose another path")
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise OutputError(f"{output}: the folder {folder} does not exist")
    if os.path.isdir(target):
        raise OutputError(f"{output}: is a directory")
    header, offsets = build_header(plan.output, metadata)
    data_start = len(header)
    total = data_start + sum(i.numel * ITEMSIZE[i.dtype] for i in plan.output.values())
    try:
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=folder)
    except OSError as exc:
        raise OutputError(f"{output}: cannot write in {folder}: {exc.strerror}") from None
    ok = False
    old_threads = torch.get_num_threads()
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, total)
            else:
                os.ftruncate(fd, total)
        except OSError as exc:
            if exc.errno in (28,):  # ENOSPC: fail before any work is done
                raise OutputError(f"{output}: not enough disk space for {total / 1e6:,.0f} MB") from None
            os.ftruncate(fd, total)
        os.pwrite(fd, header, 0)
        # One intra-op thread per worker: results then never depend on how torch splits a
        # reduction, so the bytes are the same for any thread count.
        torch.set_num_threads(1)
        run_units(plan, _writer(plan, fd, offsets, data_start, write_hook, output), progress)
        closing, fd = fd, -1  # never closed twice, even when close itself fails
        os.close(closing)
        os.chmod(tmp, output_mode(target))
        os.replace(tmp, target)
        ok = True
        return target
    except OSError as exc:  # the header write, the close or the rename: still the user's error
        raise OutputError(f"{output}: writing failed: {exc.strerror or exc}") from None
    finally:
        torch.set_num_threads(old_threads)
        if fd >= 0:
            os.close(fd)
        if not ok:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


def _writer(plan: Plan, fd: int, offsets: dict[str, int], data_start: int,
            write_hook: Callable[[str], None] | None, output: Any) -> Callable[[Unit], int]:
    """The job of one unit: evaluate it, check and cast it to the output dtype, and write its
    bytes where the plan put them; returns the number of bytes written."""
    evaluator = Evaluator(plan)
    opts = plan.options

    def job(unit: Unit) -> int:
        key, start, end = unit.key, unit.start, unit.stop
        info = plan.output[key]
        value = evaluator.evaluate(key, start, end)
        # a sliced key is checked slice by slice: say which elements the count covers
        where = f" (elements {start}..{end - 1} of {info.numel})" if end is not None else ""
        if is_float(info.dtype):
            value = _to_output(value, info.dtype, key, where, opts.allow_nonfinite)
        elif value.dtype != torch_dtype(info.dtype):
            value = value.to(dtype=torch_dtype(info.dtype))
        expected = (end - start) if end is not None else info.numel
        if value.numel() != expected or (end is None and tuple(value.shape) != info.shape):
            raise MergeError(f"key '{key}': the merge produced shape {list(value.shape)}, expected "
                             f"{list(info.shape)}")
        data = tensor_bytes(value)
        del value
        try:
            if write_hook is not None:
                write_hook(key)
            position = data_start + offsets[key] + start * ITEMSIZE[info.dtype]
            view = data
            while len(view):
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
        except OSError as exc:
            raise OutputError(f"{output}: writing failed: {exc.strerror or exc}") from None
        return len(data)

    return job


class Terminated(KeyboardInterrupt):
    """SIGTERM during a merge: handled like Ctrl-C (cleanup), reported with exit code 143."""


class TerminateAsInterrupt:
    """Turns SIGTERM into KeyboardInterrupt while a merge runs, so cleanup happens."""

    def __enter__(self) -> "TerminateAsInterrupt":
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum: int, frame: Any) -> None:
                raise Terminated("terminated")

            self.previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
