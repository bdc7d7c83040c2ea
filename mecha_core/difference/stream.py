"""Running a diff's units of work (a key, or a slice of one) in a thread pool within the memory
budget, like a merge, with a progress line on stderr."""

from __future__ import annotations

import concurrent.futures as cf
import threading
from typing import Any, Callable

from ..errors import MechaError, mark_failed
from ..lazy import torch
from ..engine.plan import MergeOptions, Plan
from ..engine.schedule import Budget, Progress, _drain, worker_count


def run_units(units: list, job: Callable[[Any], Any], results: list, report: Progress, read_bytes: Any,
              options: MergeOptions, plans: list[Plan]) -> None:
    """Run ``job`` on every unit in a thread pool within the memory budget (like a merge); the
    first failing unit's error is raised, marked as a failure after reading began (exit 1)."""
    threads = worker_count(options)
    budget = Budget(max(1, options.memory_budget))
    stop = threading.Event()
    errors: list[tuple[int, BaseException]] = []
    lock = threading.Lock()
    sources: dict[str, list] = {}
    for plan in plans:
        for step in plan.steps:
            if step.source is not None and step.source.direct:
                for key in step.table:
                    sources.setdefault(key, []).append(step.source)

    def cost(unit: tuple) -> int:
        item, start, stop_ = unit
        n = (stop_ - start) if stop_ is not None else item.numel
        return min(max(1, n * 8 * (len(item.members) + 3)), budget.limit)

    active = [0]  # units running now: the inputs stay open until this is back to zero

    def work(index: int) -> None:
        unit = units[index]
        with lock:
            active[0] += 1
        try:
            if not stop.is_set():
                results[index] = job(unit)
                report.update(read_bytes(*unit), unit[2] is None or unit[2] >= unit[0].numel)
        except BaseException as exc:
            with lock:
                errors.append((index, exc))
            stop.set()
        finally:
            with lock:
                active[0] -= 1
            budget.release(cost(unit))

    # one intra-op thread per worker: a reduction's rounding then never depends on how torch
    # splits it, so the numbers are the same for any thread count
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    pool = cf.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="mecha-diff")
    try:
        for index, unit in enumerate(units):
            if stop.is_set() or not budget.acquire(cost(unit), stop):
                break
            for source in sources.get(unit[0].key, ()):
                source.prefetch(unit[0].key, unit[1], unit[2])
            pool.submit(work, index)
        pool.shutdown(wait=True)
    except BaseException:  # Ctrl-C: no worker may still read an input when the plans close
        stop.set()
        _drain(pool, active, lock)
        raise
    finally:
        torch.set_num_threads(old_threads)
        report.close()
    if errors:
        errors.sort(key=lambda e: e[0])
        exc = errors[0][1]
        if isinstance(exc, MechaError):
            raise mark_failed(exc)
        raise exc
