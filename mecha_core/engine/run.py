"""Running a plan: evaluate keys (or slices of keys) in a thread pool, write them in place.

The output header is written first; every unit of work then writes its bytes at an offset fixed
by the plan, so the file's bytes never depend on the thread count or on which unit ends first.
The file is a temporary one beside the target, renamed into place only when everything worked.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import os
import sys
import threading
import time
from typing import Any, Callable, Mapping

from ..lazy import torch

from ..errors import MechaError, MergeError, OutputError, mark_failed
from ..method import MergeContext
# the output writer and the signal handling live in mecha_core.output; re-exported here for callers
from ..output import (OutputFile, Protected, Terminated, TerminateAsInterrupt, output_mode, resolve_output,  # noqa: F401
                      temp_prefix)
from ..recipe.nodes import CallNode, LiteralNode
from ..recipe.values import WeightMap
from ..specs import DELTA
from .plan import Plan, Step, slice_elements, unit_cost
from .safetensors_io import ITEMSIZE, build_header, is_float, output_order, tensor_bytes, torch_dtype


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


class _Budget:
    """A byte budget: work is admitted while the bytes in flight stay under the limit."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.cond = threading.Condition()

    def acquire(self, n: int, stop: threading.Event) -> bool:
        with self.cond:
            while self.used > 0 and self.used + n > self.limit:
                if stop.is_set():
                    return False
                self.cond.wait(0.1)
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self.cond:
            self.used -= n
            self.cond.notify_all()


class Evaluator:
    """Evaluates the recipe graph for one key (optionally one flat slice of it)."""

    def __init__(self, plan: Plan):
        self.plan = plan
        opts = plan.options
        self.device = torch.device(opts.device)
        self.work_dtype = torch_dtype(opts.work_dtype)
        self.uses = [0] * len(plan.steps)
        for step in plan.steps:
            for i in step.inputs:
                self.uses[i] += 1
        self.arch = plan.host.architecture(plan.architecture) if plan.architecture else None
        self._map_archs: dict[str, Any] = {}

    def chunkable(self, key: str) -> bool:
        for step in self.plan.steps:
            if key not in step.table:
                continue
            if step.source is not None and not step.source.direct:
                return False
            if step.source is None and not step.node.method.elementwise:
                return False
        return True

    def _hyper(self, value: Any, key: str, default: Any, kind: type | None = None) -> Any:
        if not isinstance(value, WeightMap):
            return value
        arch = self._map_archs.get(value.arch)
        if arch is None:
            arch = self._map_archs[value.arch] = self.plan.host.architecture(value.arch)
        spec = arch.keys.get(key)
        resolved = value.resolve((), None, default) if spec is None else value.resolve(spec.blocks, spec.klass, default)
        if kind is int and isinstance(resolved, float):
            # a key in several blocks takes the mean of their values; an int hyperparameter
            # (a seed, an iteration count) gets it rounded, half to even
            return round(resolved)
        return resolved

    def evaluate(self, key: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The value of the recipe's root for ``key`` (elements ``start:stop`` of it, flattened).

        Steps run in topological order, iteratively (a recipe may be thousands of steps deep);
        each intermediate is dropped as soon as its last consumer has run.
        """
        steps = self.plan.steps
        sliced = stop is not None
        # which steps this key needs: pass-through steps need only the input they pass on
        needed = [False] * len(steps)
        needed[-1] = True
        for step in reversed(steps):
            if not needed[step.index] or step.source is not None:
                continue
            if key in step.take:
                needed[step.inputs[step.take[key]]] = True
            else:
                for j in step.inputs:
                    if key in steps[j].table:
                        needed[j] = True
        remaining = [0] * len(steps)
        for step in steps:
            if needed[step.index] and step.source is None:
                for j in (step.inputs if key not in step.take else [step.inputs[step.take[key]]]):
                    if needed[j]:
                        remaining[j] += 1
        values: list[Any] = [None] * len(steps)
        for step in steps:
            if not needed[step.index]:
                continue
            if step.source is not None:
                values[step.index] = self._leaf(step, key, start, stop)
                continue
            node = step.node
            assert isinstance(node, CallNode)
            if key in step.take:
                consumed = [step.inputs[step.take[key]]]
                out = values[consumed[0]]
            else:
                consumed = step.inputs
                args = []
                for j in step.inputs:
                    if needed[j]:
                        args.append(self._work(values[j]))
                    elif node.method.accepts_missing:
                        args.append(None)
                    else:  # a delta that does not touch this key: zero difference
                        shape = (stop - start,) if sliced else self.plan.output[key].shape
                        args.append(torch.zeros(shape, dtype=self.work_dtype, device=self.device))
                out = self._call(node, args, key)
            values[step.index] = out
            for j in consumed:
                if needed[j]:
                    remaining[j] -= 1
                    if remaining[j] == 0:
                        values[j] = None
        return values[-1]

    def _leaf(self, step: Step, key: str, start: int, stop: int | None) -> Any:
        # kept in its stored dtype until a method uses it: a key copied through (a recipe that is
        # one model, --allow-missing) must not lose float64 bits to the float32 work dtype
        t = step.source.read(key)
        if stop is not None:
            t = t.reshape(-1)[start:stop]
        if is_float(step.table[key].dtype):
            return t.to(device=self.device)
        return t

    def _work(self, value: Any) -> Any:
        """A method's float input, in the work dtype."""
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != self.work_dtype:
            return value.to(dtype=self.work_dtype)
        return value

    def _call(self, node: CallNode, args: list[Any], key: str) -> torch.Tensor:
        method = node.method
        given = {name: v for name, v in node.kwargs}
        kwargs: dict[str, Any] = {}
        for h in method.hyperparameters:
            value = given.get(h.name)
            raw = value.value if isinstance(value, LiteralNode) else h.default
            kwargs[h.name] = self._hyper(raw, key, h.default, h.kind)
        if method.wants_context:
            kwargs["ctx"] = MergeContext(key, self.plan.output[key], self.plan.architecture, str(self.device))
        try:
            out = method.function(*args, **kwargs)
        except MechaError:
            raise
        except (Exception, SystemExit) as exc:  # plugin code: even sys.exit() is one line naming it
            from ..errors import PluginCodeError
            from ..plugins import describe_exception

            plugin = self.plan.host.merge_methods.provider(method.name)
            raise PluginCodeError(f"plugin '{plugin}': method '{method.name}' raised {describe_exception(exc)} "
                                  f"(key '{key}')", plugin=plugin) from exc
        if not isinstance(out, torch.Tensor):
            raise MergeError(f"key '{key}': {method.name} returned {type(out).__name__}, not a tensor")
        return out


def format_bytes(n: float) -> str:
    """``512 B``, ``12 kB``, ``2.1 GB``: a byte count for people (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit in ("B", "kB") else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} GB"


class Progress:
    """A one-line progress report on stderr: keys, bytes, rate and ETA."""

    def __init__(self, total_keys: int, total_bytes: int, enabled: bool):
        self.total_keys, self.total_bytes, self.enabled = total_keys, total_bytes, enabled
        self.keys = self.bytes = 0
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def update(self, bytes_: int, key_done: bool) -> None:
        with self.lock:
            self.bytes += bytes_
            self.keys += int(key_done)
            now = time.monotonic()
            if self.enabled and (now - self.last > 0.2 or self.keys == self.total_keys):
                self.last = now
                elapsed = max(now - self.start, 1e-6)
                rate = self.bytes / elapsed
                eta = (self.total_bytes - self.bytes) / rate if rate > 0 else 0
                sys.stderr.write(f"\rmerging {self.keys}/{self.total_keys} keys, "
                                 f"{format_bytes(self.bytes)}/{format_bytes(self.total_bytes)}, "
                                 f"{format_bytes(rate)}/s, ETA {eta:,.0f}s ")
                sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _units(plan: Plan, evaluator: Evaluator) -> list[tuple[str, int, int | None]]:
    units = []
    for key in output_order(plan.output):
        n = plan.output[key].numel
        chunk = slice_elements(plan, key)
        if n > chunk and is_float(plan.output[key].dtype) and evaluator.chunkable(key):
            units.extend((key, s, min(s + chunk, n)) for s in range(0, n, chunk))
        else:
            units.append((key, 0, None))
    return units


def execute(plan: Plan, output: str | os.PathLike[str], metadata: dict[str, str], *,
            progress: bool = False, write_hook: Callable[[str], None] | None = None,
            protect: Protected = ()) -> str:
    """Write the merge to ``output`` atomically; returns the absolute output path.

    The output must not be one of the plan's inputs nor any path in ``protect`` (the recipe
    files the merge was read from). ``write_hook`` is called with each key before it is
    written (tests use it to simulate faults).
    """
    labels = dict(protect) if isinstance(protect, Mapping) else {p: None for p in protect}
    for path in plan.input_paths:
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
            # One intra-op thread per worker: results then never depend on how torch splits a
            # reduction, so the bytes are the same for any thread count.
            torch.set_num_threads(1)
            try:
                _run_units(plan, out.fd, offsets, data_start, progress, write_hook, output)
            except MechaError as exc:  # tensors were read: a failed merge (exit 1), not bad usage
                raise mark_failed(exc)
        except OSError as exc:  # the header write: the merge had started
            raise mark_failed(OutputError(f"{output}: writing failed: {exc.strerror or exc}")) from None
        finally:
            torch.set_num_threads(old_threads)
        try:
            return out.commit()
        except MechaError as exc:  # the close or the rename, after the work: a failed merge
            raise mark_failed(exc)


def _run_units(plan: Plan, fd: int, offsets: dict[str, int], data_start: int, progress: bool,
               write_hook: Callable[[str], None] | None, output: Any) -> None:
    opts = plan.options
    evaluator = Evaluator(plan)
    units = _units(plan, evaluator)
    threads = max(1, opts.threads or os.cpu_count() or 1)
    budget = _budget = _Budget(max(1, opts.memory_budget))
    stop = threading.Event()
    report = Progress(len(plan.output), sum(i.numel * ITEMSIZE[i.dtype] for i in plan.output.values()), progress)
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()
    last_unit = {}
    for idx, (key, _, _) in enumerate(units):
        last_unit[key] = idx

    active = [0]  # units running now; inputs stay mapped until this is back to zero

    def work(idx: int, key: str, start: int, end: int | None, cost: int) -> None:
        with lock:
            active[0] += 1
        try:
            if stop.is_set():
                return
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
                raise MergeError(f"key '{key}': {type(plan.root).__name__ if not isinstance(plan.root, CallNode) else plan.root.method.name} "
                                 f"produced shape {list(value.shape)}, expected {list(info.shape)}")
            data = tensor_bytes(value)
            del value
            if write_hook is not None:
                write_hook(key)
            position = data_start + offsets[key] + start * ITEMSIZE[info.dtype]
            view = data
            while len(view):
                written = os.pwrite(fd, view, position)
                view, position = view[written:], position + written
            report.update(len(data), idx == last_unit[key])
            del data, view
        except OSError as exc:
            with lock:
                errors.append((idx, OutputError(f"{output}: writing failed: {exc.strerror or exc}")))
            stop.set()
        except BaseException as exc:
            with lock:
                errors.append((idx, exc))
            stop.set()
        finally:
            with lock:
                active[0] -= 1
            budget.release(cost)

    sources_by_key: dict[str, list[Any]] = {}
    for step in plan.steps:
        if step.source is not None and step.source.direct:
            for key in step.table:
                sources_by_key.setdefault(key, []).append(step.source)
    pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mecha")
    try:
        for idx, (key, start, end) in enumerate(units):
            cost = unit_cost(plan, key, None if end is None else end - start)
            cost = min(cost, budget.limit)
            if stop.is_set() or not budget.acquire(cost, stop):
                break
            for source in sources_by_key.get(key, ()):  # overlap reading with the work in flight
                source.prefetch(key, start, end)
            pool.submit(work, idx, key, start, end, cost)
        pool.shutdown(wait=True)
    except BaseException:
        stop.set()
        _drain(pool, active, lock)
        raise
    finally:
        report.close()
    if errors:
        errors.sort(key=lambda e: e[0])
        raise errors[0][1]


def _drain(pool: cf.ThreadPoolExecutor, active: list[int], lock: threading.Lock) -> None:
    """Wait until no unit runs any more, even through further Ctrl-Cs: the inputs' memory maps
    are closed after this, and a worker still reading one would crash the process."""
    while True:
        try:
            pool.shutdown(wait=True, cancel_futures=True)
            # A join interrupted by a signal can return early; the counter is the real test.
            while True:
                with lock:
                    if active[0] == 0:
                        return
                time.sleep(0.005)
        except KeyboardInterrupt:
            continue
