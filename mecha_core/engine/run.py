"""Running a plan: the output file, and each unit's result checked, cast and written in place.

The output header is written first; every unit of work then writes its bytes at an offset fixed
by the plan, so the file's bytes never depend on the thread count or on which unit ends first.
The file is a temporary one beside the target, renamed into place only when everything worked.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping

from ..errors import MechaError, MergeError, OutputError, mark_failed
from ..lazy import torch
# the output writer and the signal handling live in mecha_core.output; re-exported here for callers
from ..output import (OutputFile, Protected, Terminated, TerminateAsInterrupt, output_mode, resolve_output,  # noqa: F401
                      temp_prefix)
from .allocator import reuse_freed_memory
from .direct_write import OutputWriter, RegionPool, pwrite_all, staging_memory
from .evaluate import Evaluator
from .folders import source_files
from .passthrough import PassThrough
from .plan import Plan
from .safetensors_io import ITEMSIZE, build_header, is_float, tensor_bytes, torch_dtype
from .schedule import Unit, run_units, worker_count


#: output dtypes without infinity, where torch clamps out-of-range values instead of making them
#: Inf: the magnitude above which a value would round past the largest finite one (448 + half
#: an ulp of 32), i.e. where float16 would give Inf
_SATURATES = {"float8_e4m3fn": 464.0}


def _to_output(value: torch.Tensor, dtype: str, key: str, where: str, allow_nonfinite: bool,
               cast_now: bool = True) -> torch.Tensor:
    """``value`` cast to the output ``dtype``, refusing NaN/Inf and values the cast would overflow.
    With ``cast_now`` false, a value whose cast is known to be safe is returned as it is: the
    caller casts it (into the output's buffers, without a copy in between).

    One ``aminmax`` pass proves the common case (it propagates NaN, and an Inf is its own min or
    max): about 25x cheaper than ``isfinite(...).all()``, which took a third of a merge's time.
    Elements are counted only on the way to an error.
    """
    out_dtype = torch_dtype(dtype)
    if allow_nonfinite or value.numel() == 0:
        return value.to(dtype=out_dtype) if cast_now else value
    lo, hi = (float(v) for v in torch.aminmax(value))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(value)).sum())
        raise MergeError(f"key '{key}': {bad} NaN/Inf value(s) in the result{where}; check the "
                         f"inputs, or pass --allow-nonfinite to write them anyway")
    if max(-lo, hi) <= torch.finfo(out_dtype).max:  # everything fits: nothing can round to Inf or saturate
        return value.to(dtype=out_dtype) if cast_now else value
    cast = value.to(dtype=out_dtype)
    limit = _SATURATES.get(dtype)
    if limit is not None:
        bad = int((value.abs() > limit).sum())
    else:  # above the largest finite value may still round down to it: count what became Inf
        bad = int((~torch.isfinite(cast.float() if cast.element_size() == 1 else cast)).sum())
    if bad:
        raise MergeError(f"key '{key}': {bad} value(s){where} overflow {dtype}; choose a wider "
                         f"--output-dtype, or pass --allow-nonfinite to write them anyway")
    return cast


#: ``fill(plan, pwrite)``: computes every key of ``plan`` and writes each result's bytes with
#: ``pwrite(position, data)`` at the position :func:`unit_bytes` gives (another executor's way of
#: filling the output file; the default runs the units in this process's thread pool)
FileFill = Callable[[Plan, Callable[[int, bytes], None]], None]


def execute(plan: Plan, output: str | os.PathLike[str], metadata: dict[str, str], *,
            progress: bool = False, write_hook: Callable[[str], None] | None = None,
            protect: Protected = (), fill: FileFill | None = None) -> str:
    """Write the merge to ``output`` atomically; returns the absolute output path.

    The output must not be one of the plan's inputs nor any path in ``protect`` (the recipe
    files the merge was read from). ``write_hook`` is called with each key before it is
    written (tests use it to simulate faults). Errors raised once tensors are being read are
    marked as a failed merge (exit code 1), see :func:`mecha_core.errors.mark_failed`.
    ``fill``: computes and writes the keys instead of the local thread pool (see :data:`FileFill`).
    """
    labels = dict(protect) if isinstance(protect, Mapping) else {p: None for p in protect}
    for source in plan.sources:  # a folder input: each of its shards too
        for path in dict.fromkeys([source.path, *source_files(source)]):
            labels.setdefault(path, f"the input {path}")
    out = OutputFile(output, protect=labels)
    header, offsets = build_header(plan.output, metadata)
    data_start = len(header)
    total = data_start + sum(i.numel * ITEMSIZE[i.dtype] for i in plan.output.values())
    old_threads = torch.get_num_threads()
    with out:
        try:
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(out.fd, 0, total)
                else:
                    os.ftruncate(out.fd, total)
            except OSError as exc:
                if exc.errno in (28,):  # ENOSPC: fail before any work is done
                    raise mark_failed(OutputError(f"{output}: not enough disk space for "
                                                  f"{total / 1e6:,.0f} MB")) from None
                os.ftruncate(out.fd, total)
            os.pwrite(out.fd, header, 0)
            try:
                if fill is not None:  # computed elsewhere (each unit with one thread, see unit_bytes)
                    fill(plan, lambda position, data: _pwrite_all(out.fd, data, position, output))
                else:
                    # One intra-op thread per worker: results then never depend on how torch splits a
                    # reduction, so the bytes are the same for any thread count.
                    torch.set_num_threads(1)
                    pool = RegionPool.for_merge(plan.options.memory_budget, worker_count(plan.options))
                    writer = OutputWriter(out.fd, out.path, (data_start, total), pool=pool)  # past the page cache
                    try:
                        place = {key: (writer, data_start + offset) for key, offset in offsets.items()}
                        with reuse_freed_memory(plan.options.memory_budget):  # fewer page faults (engine/allocator.py)
                            run_units(plan, _writer(plan, place, write_hook, output), progress,
                                      staging_memory(pool, [writer]))
                        writer.finish()  # an error of its thread: an OSError, "writing failed" below
                    finally:
                        writer.close()
            except MechaError as exc:  # tensors were read: a failed merge (exit 1), not bad usage
                raise mark_failed(exc)  # noqa: B904 (the same exception, re-raised with its traceback)
        except OSError as exc:  # the header write: the merge had started
            raise mark_failed(OutputError(f"{output}: writing failed: {exc.strerror or exc}")) from None
        finally:
            torch.set_num_threads(old_threads)
        try:
            return out.commit()
        except MechaError as exc:  # the close or the rename, after the work: a failed merge
            raise mark_failed(exc)  # noqa: B904 (the same exception, re-raised with its traceback)


def _pwrite_all(fd: int, data: Any, position: int, output: Any) -> None:
    """Write all of ``data`` at ``position`` (a pwrite may write less than asked)."""
    try:
        pwrite_all(fd, data, position)
    except OSError as exc:
        raise OutputError(f"{output}: writing failed: {exc.strerror or exc}") from None


def unit_data(evaluator: Evaluator, plan: Plan, unit: Unit) -> Any:
    """The output bytes of one unit: evaluated, checked and cast to the output dtype (the same
    bytes in any process that holds the same plan). A unit of pieces (a key whose method needs
    whole-key statistics) computes the statistics, then gives its pieces' bytes in order."""
    if unit.pieces:
        stats = evaluator.statistics(unit.key, list(unit.pieces))
        return b"".join(bytes(piece_data(evaluator, plan, unit.key, a, b, stats)) for a, b in unit.pieces)
    return piece_data(evaluator, plan, unit.key, unit.start, unit.stop, None)


def unit_first_element(unit: Unit) -> int:
    """The first element of the key a unit's bytes start at."""
    return unit.pieces[0][0] if unit.pieces else unit.start


def piece_data(evaluator: Evaluator, plan: Plan, key: str, start: int, end: int | None, stats: Any) -> Any:
    """The output bytes of elements ``start:end`` of ``key`` (the whole key when ``end`` is
    None), given the key's statistics (``None`` when its method takes none)."""
    return tensor_bytes(piece_tensor(evaluator, plan, key, start, end, stats))


def piece_tensor(evaluator: Evaluator, plan: Plan, key: str, start: int, end: int | None, stats: Any,
                 cast_now: bool = True) -> torch.Tensor:
    """The result of elements ``start:end`` of ``key``, checked, in the output dtype; with
    ``cast_now`` false a float result whose cast is safe may still be in the work dtype."""
    info = plan.output[key]
    value = evaluator.evaluate(key, start, end, stats)
    # a sliced key is checked slice by slice: say which elements the count covers
    where = f" (elements {start}..{end - 1} of {info.numel})" if end is not None else ""
    if is_float(info.dtype):
        value = _to_output(value, info.dtype, key, where, plan.options.allow_nonfinite, cast_now)
    elif value.dtype != torch_dtype(info.dtype):
        value = value.to(dtype=torch_dtype(info.dtype))
    expected = (end - start) if end is not None else info.numel
    if value.numel() != expected or (end is None and tuple(value.shape) != info.shape):
        raise MergeError(f"key '{key}': the merge produced shape {list(value.shape)}, expected "
                         f"{list(info.shape)}")
    return value


def unit_bytes(plan: Plan, metadata: dict[str, str]) -> Callable[[Unit], tuple[int, Any]]:
    """For another executor: a function giving one unit's position in the single output file
    and its bytes (what :func:`execute` writes there)."""
    evaluator = Evaluator(plan)
    header, offsets = build_header(plan.output, metadata)

    def bytes_of(unit: Unit) -> tuple[int, Any]:
        position = len(header) + offsets[unit.key] + unit_first_element(unit) * ITEMSIZE[plan.output[unit.key].dtype]
        return position, unit_data(evaluator, plan, unit)

    return bytes_of


def _writer(plan: Plan, place: Mapping[str, tuple[OutputWriter, int]],
            write_hook: Callable[[str], None] | None, output: Any) -> Callable[[Unit], int]:
    """The job of one unit: evaluate it, check and cast it to the output dtype, and write its
    bytes where the plan put them (``place``: key -> the writer of its file and the position of
    the key's first byte); returns the number of bytes written."""
    evaluator = Evaluator(plan)
    passthrough = PassThrough(plan)
    opts = plan.options

    def job(unit: Unit) -> int:
        if unit.pieces:  # whole-key statistics first, then the key slice by slice
            stats = evaluator.statistics(unit.key, list(unit.pieces))
            return sum(piece(unit.key, a, b, stats) for a, b in unit.pieces)
        return piece(unit.key, unit.start, unit.stop, None)

    def piece(key: str, start: int, end: int | None, stats: Any) -> int:
        info = plan.output[key]
        # a sliced key is checked slice by slice: say which elements the count covers
        where = f" (elements {start}..{end - 1} of {info.numel})" if end is not None else ""
        hooked = False
        writer, base = place[key]
        position = base + start * ITEMSIZE[info.dtype]
        if key in passthrough:  # an input tensor as stored: copied file to file (engine/passthrough.py)
            if is_float(info.dtype) and not opts.allow_nonfinite:  # the NaN/Inf check, on the mapped input
                _to_output(passthrough.tensor(key).reshape(-1)[start:end], info.dtype, key, where, False)
            try:
                if write_hook is not None:
                    write_hook(key)
                hooked = True
                if passthrough.copy(key, writer.fd, position, start, end):
                    n = ((info.numel if end is None else end) - start) * ITEMSIZE[info.dtype]
                    writer.written(position, n)  # its regions are written around it
                    return n
            except OSError as exc:
                raise OutputError(f"{output}: writing failed: {exc.strerror or exc}") from None
        value = piece_tensor(evaluator, plan, key, start, end, stats, cast_now=not writer.direct)
        out_dtype = torch_dtype(info.dtype)
        try:
            if write_hook is not None and not hooked:
                write_hook(key)
            # a float result in the work dtype: cast straight into the output's regions
            if value.dtype == out_dtype or not writer.write_cast(value, out_dtype, position):
                writer.write(tensor_bytes(value.to(dtype=out_dtype)), position)
        except OSError as exc:
            raise OutputError(f"{output}: writing failed: {exc.strerror or exc}") from None
        return value.numel() * ITEMSIZE[info.dtype]

    return job
