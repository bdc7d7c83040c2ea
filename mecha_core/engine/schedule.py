"""Scheduling a plan's work: units (a key, or a slice of an element-wise key), a byte budget that
bounds memory, a pool of worker threads, and the progress line.

What a unit does (evaluate it and write it) is the caller's job; here it is only decided what runs
when. Units are numbered in output order, and when several fail the first one's error is raised,
so what a failed merge reports does not depend on the thread count either.
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import inspect
import os
import sys
import threading
import time
from typing import Callable

import attrs

from .plan import MergeOptions, Plan
from .safetensors_io import ITEMSIZE, is_float, output_order
from ..sizes import format_bytes


@attrs.frozen
class Unit:
    """One piece of work: a whole key, or elements ``start:stop`` of a flattened one."""

    index: int
    """The unit's position in the schedule (errors are reported in this order)."""
    key: str
    """The output key."""
    start: int
    """The first element (0 for a whole key)."""
    stop: int | None
    """One past the last element; ``None`` for a whole key."""
    cost: int
    """Bytes the unit may hold at once, for the memory budget."""
    last: bool
    """The unit finishes its key (the progress line counts the key then)."""
    pieces: tuple[tuple[int, int], ...] = ()
    """For a whole key whose methods need whole-key statistics but are otherwise element-wise:
    the slices it is evaluated in, one after the other (statistics first, then each slice is
    written), so it never holds more than one slice."""


def bytes_per_element(plan: Plan, key: str) -> int:
    """Working bytes one output element of ``key`` costs: every input and intermediate, in the work dtype."""
    nodes = sum(1 for s in plan.steps if key in s.table)
    return ITEMSIZE.get(plan.options.work_dtype, 4) * (nodes + 1)


def slice_elements(plan: Plan, key: str) -> int:
    """How many elements of an element-wise key one unit of work takes (whole rows when a
    method it goes through is row-wise)."""
    if plan.options.chunk_elements:
        chunk = max(1, plan.options.chunk_elements)
    else:
        chunk = max(1 << 16, plan.options.slice_bytes // bytes_per_element(plan, key))
    if any(s.method is not None and s.method.rowwise and key in s.table and key not in s.take for s in plan.steps):
        info = plan.output[key]
        row = info.numel // info.shape[0] if len(info.shape) >= 2 and info.shape[0] else info.numel
        chunk = max(row, chunk - chunk % row) if row else chunk
    return chunk


def unit_cost(plan: Plan, key: str, elements: int | None = None) -> int:
    """Bytes a unit of work may hold at once (for the memory budget): every input and
    intermediate, and for a whole key also what its methods declare they hold besides
    (``working_set``: an SVD's factors)."""
    n = plan.output[key].numel if elements is None else elements
    cost = n * bytes_per_element(plan, key)
    if elements is None:
        cost += declared_working_set(plan, key)
    return max(1, cost)


def declared_working_set(plan: Plan, key: str) -> int:
    """The largest ``working_set`` a method ``key`` goes through declares (its calls run one
    after the other), 0 when none does. A ``working_set`` that takes keyword arguments also
    gets the step's hyperparameters for the key (what it holds may depend on them)."""
    itemsize = ITEMSIZE.get(plan.options.work_dtype, 4)
    found = 0
    for step in plan.steps:
        method = step.method
        if method is not None and method.working_set is not None and key in step.table and key not in step.take:
            hyper = step.hyper.for_key(key) if step.hyper is not None and _takes_keywords(method.working_set) else {}
            found = max(found, int(method.working_set(plan.output[key], len(step.inputs), itemsize, **hyper)))
    return found


@functools.lru_cache(maxsize=None)
def _takes_keywords(function: Callable[..., int]) -> bool:
    """Whether a ``working_set`` accepts ``**hyperparameters`` besides (info, inputs, itemsize)."""
    try:
        return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())
    except (TypeError, ValueError):
        return False


def chunkable(plan: Plan, key: str) -> bool:
    """Whether ``key`` may be evaluated in slices: every step it passes through is element-wise
    (or row-wise: the slices are then whole rows) and every file it comes from stores it as is
    (a converter computes whole tensors)."""
    for step in plan.steps:
        if key not in step.table:
            continue
        if step.source is not None and not step.source.direct:
            return False
        if step.method is not None and not (step.method.elementwise or step.method.rowwise):
            return False
    return True


def needs_statistics(plan: Plan, key: str) -> bool:
    """Whether a step ``key`` goes through declares whole-key statistics."""
    return any(s.method is not None and s.method.statistics is not None and key in s.table and key not in s.take
               for s in plan.steps)


def pieces_cost(plan: Plan, key: str, ranges: tuple[tuple[int, int], ...]) -> int:
    """Bytes a whole key worked through slice by slice may hold: one slice at a time, plus a
    selection's bit patterns and shifted digits of one input (16 bytes an element at most) and
    the candidates it collects (at most one slice's worth, 12 bytes each: engine/statistics.py),
    and what its methods declare besides (``working_set``: a rotation's d×d matrices)."""
    elements = max(b - a for a, b in ranges)
    return unit_cost(plan, key, elements) + 28 * elements + declared_working_set(plan, key)


def units(plan: Plan) -> list[Unit]:
    """Every unit of the merge, in output order; large element-wise keys are sliced, and large
    keys whose methods need statistics become one unit that works through its slices."""
    pieces: list[tuple[str, int, int | None, tuple[tuple[int, int], ...]]] = []
    for key in output_order(plan.output):
        n = plan.output[key].numel
        chunk = slice_elements(plan, key)
        if n > chunk and is_float(plan.output[key].dtype) and chunkable(plan, key):
            ranges = [(s, min(s + chunk, n)) for s in range(0, n, chunk)]
            if needs_statistics(plan, key):
                pieces.append((key, 0, None, tuple(ranges)))
            else:
                pieces.extend((key, a, b, ()) for a, b in ranges)
        else:
            pieces.append((key, 0, None, ()))
    limit = max(1, plan.options.memory_budget)
    out = []
    for i, (key, start, stop, ranges) in enumerate(pieces):
        if ranges:
            cost = pieces_cost(plan, key, ranges)
        else:
            cost = unit_cost(plan, key, None if stop is None else stop - start)
        last = i + 1 == len(pieces) or pieces[i + 1][0] != key
        out.append(Unit(i, key, start, stop, min(cost, limit), last, ranges))
    return out


class Budget:
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


class Progress:
    """A one-line progress report on stderr: keys, bytes, rate and ETA (``verb``: what is done
    to the keys, ``merging`` or ``diffing``)."""

    def __init__(self, total_keys: int, total_bytes: int, enabled: bool, verb: str = "merging"):
        self.total_keys, self.total_bytes, self.enabled, self.verb = total_keys, total_bytes, enabled, verb
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
                sys.stderr.write(f"\r{self.verb} {self.keys}/{self.total_keys} keys, "
                                 f"{format_bytes(self.bytes)}/{format_bytes(self.total_bytes)}, "
                                 f"{format_bytes(rate)}/s, ETA {eta:,.0f}s ")
                sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def worker_count(options: MergeOptions) -> int:
    """The worker threads a merge (or a diff) runs with: ``--threads``, else one per CPU."""
    return max(1, options.threads or os.cpu_count() or 1)


def run_units(plan: Plan, job: Callable[[Unit], int], progress: bool = False, reserved: int = 0) -> None:
    """Run ``job`` on every unit of ``plan`` in a thread pool, within the memory budget less
    ``reserved`` bytes (what the output writer's buffers may hold).

    ``job`` returns the bytes it wrote (for the progress line). Units start in output order.
    After the first failure no new unit starts; once the running ones are done, the failure of
    the earliest unit is raised. On Ctrl-C this returns only when no unit runs any more.
    """
    opts = plan.options
    todo = units(plan)
    _warn_over_budget(plan, todo, reserved)
    threads = worker_count(opts)
    budget = Budget(max(1, opts.memory_budget - reserved))
    stop = threading.Event()
    report = Progress(len(plan.output), sum(i.numel * ITEMSIZE[i.dtype] for i in plan.output.values()), progress)
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()
    active = [0]  # units running now; inputs stay mapped until this is back to zero

    def work(unit: Unit) -> None:
        with lock:
            active[0] += 1
        try:
            if not stop.is_set():
                report.update(job(unit), unit.last)
        except BaseException as exc:
            with lock:
                errors.append((unit.index, exc))
            stop.set()
        finally:
            with lock:
                active[0] -= 1
            budget.release(unit.cost)

    sources_by_key: dict[str, list] = {}
    for step in plan.steps:
        if step.source is not None and step.source.direct:
            for key in step.table:
                sources_by_key.setdefault(key, []).append(step.source)
    pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mecha")
    try:
        for unit in todo:
            if stop.is_set() or not budget.acquire(unit.cost, stop):
                break
            for source in sources_by_key.get(unit.key, ()):  # overlap reading with the work in flight
                source.prefetch(unit.key, unit.start, unit.stop)
            pool.submit(work, unit)
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


def over_budget(plan: Plan, todo: list[Unit], reserved: int = 0) -> list[tuple[str, int]]:
    """The whole keys that need more than the memory budget on their own (key, bytes), less
    ``reserved`` (the output writer's buffers, held beside every unit): they run alone, and the
    merge then holds about that much plus ``reserved``."""
    limit = max(1, plan.options.memory_budget - reserved)
    found = []
    for u in todo:
        if u.stop is None and u.cost >= limit:
            if u.pieces and not declared_working_set(plan, u.key):
                continue  # slices alone: a smaller budget gives smaller slices, nothing more to say
            need = pieces_cost(plan, u.key, u.pieces) if u.pieces else unit_cost(plan, u.key)
            if need > limit:
                found.append((u.key, need))
    return found


def _warn_over_budget(plan: Plan, todo: list[Unit], reserved: int = 0) -> None:
    found = over_budget(plan, todo, reserved)
    if not found:
        return
    key, need = max(found, key=lambda f: f[1])
    more = f" and {len(found) - 1} other key(s)" if len(found) > 1 else ""
    sliced = any(u.key == key and u.pieces for u in todo)
    why = ("is merged in slices but its method holds more besides them" if sliced
           else "cannot be sliced by its method")
    less = f" less {format_bytes(reserved)} of write buffers" if reserved else ""
    buffers = f" ({format_bytes(reserved)} of it the output's write buffers)" if reserved else ""
    sys.stderr.write(f"warning: key '{key}'{more} {why} and needs about "
                     f"{format_bytes(need)} of working memory, more than --memory-budget "
                     f"{format_bytes(plan.options.memory_budget)}{less}; such keys run one at a time, so the "
                     f"merge holds about {format_bytes(need + reserved)} at its peak{buffers}\n")


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
