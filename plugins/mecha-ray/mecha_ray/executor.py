"""Merges as Ray tasks: the plan is made once on the driver, keys are computed on the cluster.

The driver plans the merge from the headers and opens the output through the core's writer
(:func:`mecha_core.kit.executors.write_file` / ``write_folder``), which allocates it, writes its
header and commits it atomically at the end. The work is cut into pieces of whole units (a key,
or a slice of a large element-wise key): for a single file, consecutive units up to a byte size,
whose bytes a task returns and the driver writes at their fixed offsets; for a folder, one shard
per task, written by the worker straight into the output's temporary folder (shared storage).

Each worker process plans the same job again from the same paths (headers only, cached per
process) and checks the plan's fingerprint against the driver's, so a node that sees other
input files fails instead of writing other bytes. Units are computed with one intra-op thread, as
the local executor's workers do: the bytes are the local executor's on any number of nodes.

A task whose worker dies is retried by Ray (``max_retries``); its result is the same, and a
shard left half-written is replaced. A task that raises is not retried: the driver cancels the
others, the core removes the output, and the error names the key and the node. At most
``2 x cluster CPUs`` tasks are in flight, each holding at most its piece's bytes, which bounds the
memory of the driver and of every worker.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import os
import threading
from typing import Any, Callable, Sequence

import ray

from mecha_core.errors import MechaError, MergeError
from mecha_core.kit import executors as kit

#: a task whose worker process dies is run again this many times
MAX_RETRIES = 3
#: output bytes one single-file task computes at most (a larger unit is alone in its task)
PIECE_BYTES = 64 << 20
#: sweeps: merges run at once on the cluster
PARALLEL_MERGES = 4


def run_jobs(jobs: Sequence[kit.MergeJob]) -> list[str]:
    """Run ``jobs`` on Ray (a sweep's merges at once); their output paths in order."""
    address = next((j.settings.get("address") for j in jobs if j.settings.get("address")), None)
    address = address or os.environ.get("RAY_ADDRESS") or None
    started = not ray.is_initialized()
    if started:  # a Ray started for the run when no cluster is named
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    try:
        if len(jobs) == 1:
            return [_run_job(jobs[0], threading.Event())]
        return _run_parallel(jobs)
    finally:
        if started:
            ray.shutdown()


def _run_parallel(jobs: Sequence[kit.MergeJob]) -> list[str]:
    """The merges of a sweep at once (each its own output, committed on its own); on Ctrl-C every
    merge cancels its tasks and removes its output before this returns."""
    cancel = threading.Event()
    pool = cf.ThreadPoolExecutor(max_workers=min(len(jobs), PARALLEL_MERGES), thread_name_prefix="mecha-ray")
    futures = [pool.submit(_run_job, job, cancel) for job in jobs]
    try:
        cf.wait(futures, return_when=cf.FIRST_EXCEPTION)
        for f in futures:
            if f.done() and f.exception() is not None:
                cancel.set()  # the first failure stops the others (their outputs are removed)
    except BaseException:
        cancel.set()
        raise
    finally:
        while True:
            try:
                pool.shutdown(wait=True, cancel_futures=True)
                break
            except KeyboardInterrupt:  # a second Ctrl-C: still wait, the outputs are being removed
                cancel.set()
    failed = [f.exception() for f in futures if not f.cancelled() and f.exception() is not None]
    if failed:
        real = [e for e in failed if not isinstance(e, _Cancelled)]
        raise (real or failed)[0]
    return [f.result() for f in futures]


class _Cancelled(MechaError):
    """This merge stopped because another merge of the sweep failed."""


def _run_job(job: kit.MergeJob, cancel: threading.Event) -> str:
    # each worker plans the job again from its recipe text and discovers its own plugins
    if job.folder:
        return kit.write_folder(job, write_shards=lambda plan, targets: _write_shards(
            plan, targets, job, ray.put(kit.portable(job, plan)), cancel))
    return kit.write_file(job, fill=lambda plan, pwrite: _fill_file(
        plan, pwrite, job, ray.put(kit.portable(job, plan)), cancel))


# -- the driver ----------------------------------------------------------------------------------
def _in_flight_limit() -> int:
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(2, 2 * cpus)


def _pieces(plan: kit.Plan, units: list[kit.Unit], limit: int) -> list[list[int]]:
    """Consecutive units (their indices) grouped up to a byte size that keeps ``limit`` pieces in
    flight within the memory budget."""
    target = max(1, min(PIECE_BYTES, plan.options.memory_budget // limit))
    pieces: list[list[int]] = []
    size = 0
    for i, unit in enumerate(units):
        n = kit.unit_output_bytes(plan, unit)
        if pieces and size + n <= target:
            pieces[-1].append(i)
            size += n
        else:
            pieces.append([i])
            size = n
    return pieces


def _fill_file(plan: kit.Plan, pwrite: Callable[[int, bytes], None], job: kit.MergeJob, job_ref: Any,
               cancel: threading.Event) -> None:
    units = kit.work_units(plan)
    fingerprint = kit.plan_fingerprint(plan)
    limit = _in_flight_limit()
    pieces = _pieces(plan, units, limit)
    progress = kit.progress_line(len(plan.output), sum(kit.unit_output_bytes(plan, u) for u in units), job.progress)

    def submit(piece: list[int]) -> Any:
        return _compute.remote(job_ref, fingerprint, piece)

    def done(piece: list[int], results: list[tuple[int, bytes]]) -> None:
        for position, data in results:
            pwrite(position, data)
        progress.update(sum(len(d) for _, d in results), False)
        for i in piece:
            if units[i].last:
                progress.update(0, True)

    try:
        _run_tasks(pieces, submit, done, limit, cancel, lambda piece: units[piece[0]].key)
    finally:
        progress.close()


def _write_shards(plan: kit.Plan, targets: list[tuple[kit.Shard, str]], job: kit.MergeJob, job_ref: Any,
                  cancel: threading.Event) -> None:
    fingerprint = kit.plan_fingerprint(plan)
    total = sum(s.size - len(s.header) for s, _ in targets)
    progress = kit.progress_line(len(plan.output), total, job.progress)

    def submit(target: tuple[kit.Shard, str]) -> Any:
        return _shard.remote(job_ref, fingerprint, target[0], target[1])

    def done(target: tuple[kit.Shard, str], written: int) -> None:
        progress.update(written, False)
        for _ in target[0].keys:
            progress.update(0, True)

    try:
        _run_tasks(targets, submit, done, _in_flight_limit(), cancel,
                   lambda target: target[0].keys[0] if target[0].keys else target[0].name)
    finally:
        progress.close()


def _run_tasks(items: Sequence[Any], submit: Callable[[Any], Any], done: Callable[[Any, Any], None], limit: int,
               cancel: threading.Event, first_key: Callable[[Any], str]) -> None:
    """Submit a task per item with at most ``limit`` in flight, handing each result to ``done`` as
    it comes (one at a time: the driver holds one result). Any failure or interruption cancels
    the tasks in flight and waits until none runs (a worker must not write into a folder being
    removed)."""
    todo = collections.deque(items)
    in_flight: dict[Any, Any] = {}
    try:
        while todo or in_flight:
            while todo and len(in_flight) < limit:
                item = todo.popleft()
                in_flight[submit(item)] = item
            ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.5)
            if cancel.is_set():
                raise _Cancelled("stopped: another merge of the sweep failed")
            for ref in ready:
                item = in_flight.pop(ref)
                done(item, _result(ref, first_key(item)))
    except BaseException:
        _cancel(list(in_flight))
        raise


def _result(ref: Any, key: str) -> Any:
    """A task's result; its failure as one line (a task raising a MechaError names its key and
    node; a task Ray gave up on names where its piece starts)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, MechaError):
            raise cause from None
        raise MergeError(f"key '{key}': a Ray task failed: {_first_line(cause or exc)}") from None
    except ray.exceptions.RayError as exc:  # retries used up, the object lost, the node gone
        raise MergeError(f"key '{key}': a Ray task failed: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _cancel(refs: list[Any]) -> None:
    for ref in refs:
        with contextlib.suppress(Exception):
            ray.cancel(ref, force=True)
    pending = list(refs)
    while pending:
        try:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=10)
            break
        except KeyboardInterrupt:  # keep waiting: the folder is removed after this
            continue
        except Exception:  # noqa: BLE001  (a cancelled task reports its cancellation: it is no longer running)
            break


# -- the workers ---------------------------------------------------------------------------------
#: plans open in this worker process: fingerprint -> (exit stack, plan, units, unit writer)
_PLANS: collections.OrderedDict[str, tuple[contextlib.ExitStack, Any, list, Any]] = collections.OrderedDict()
_PLANS_KEPT = 4
_plans_lock = threading.Lock()


def _node() -> str:
    context = ray.get_runtime_context()
    return f"node {ray.util.get_node_ip_address()} ({context.get_node_id()[:12]})"


def _worker_plan(job: kit.MergeJob, fingerprint: str) -> tuple[Any, list, Any]:
    """The job's plan in this worker, made once per process and checked against the driver's."""
    with _plans_lock:
        if fingerprint in _PLANS:
            _PLANS.move_to_end(fingerprint)
            _, plan, units, writer = _PLANS[fingerprint]
            return plan, units, writer
        if os.path.isdir(job.cwd):  # relative model paths are relative to the driver's folder
            os.chdir(job.cwd)
        stack = contextlib.ExitStack()
        try:
            plan = stack.enter_context(kit.open_plan(job))
            if kit.plan_fingerprint(plan, job.metadata) != fingerprint:
                raise MergeError(f"{_node()}: the merge plans differently here than on the driver; the "
                                 f"inputs must be the same files under the same paths on every node")
            units = kit.work_units(plan)
            writer = None if job.folder else kit.unit_writer(plan, job.metadata)
        except BaseException:
            stack.close()
            raise
        _PLANS[fingerprint] = (stack, plan, units, writer)
        while len(_PLANS) > _PLANS_KEPT:
            _PLANS.popitem(last=False)[1][0].close()
        return plan, units, writer


def _on_node(exc: BaseException, key: str) -> MechaError:
    """``exc`` (raised computing ``key``) as one line that names the node too."""
    if isinstance(exc, MechaError):
        message = str(exc) if f"'{key}'" in str(exc) else f"key '{key}': {exc}"
        error = MergeError(f"{message} (on {_node()})")
    else:
        error = MergeError(f"key '{key}': {_first_line(exc)} (on {_node()})")
    return error


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1)
def _compute(job: kit.MergeJob, fingerprint: str, piece: list[int]) -> list[tuple[int, bytes]]:
    """A piece of a single-file output: each unit's position in the file and its bytes."""
    _, units, writer = _worker_plan(job, fingerprint)
    results = []
    with kit.single_threaded():
        for i in piece:
            try:
                results.append(writer(units[i]))
            except Exception as exc:  # noqa: BLE001  (every failure becomes one line with the key and node)
                raise _on_node(exc, units[i].key) from None
    return results


@ray.remote(max_retries=MAX_RETRIES, retry_exceptions=False, num_cpus=1)
def _shard(job: kit.MergeJob, fingerprint: str, shard: kit.Shard, path: str) -> int:
    """One shard of a folder output, written at ``path`` (in the output's temporary folder)."""
    plan, _, _ = _worker_plan(job, fingerprint)
    try:
        kit.write_shard_file(plan, shard, path)
    except Exception as exc:  # noqa: BLE001  (every failure becomes one line with the key and node)
        with contextlib.suppress(OSError):
            os.unlink(path)
        key = next((k for k in shard.keys if f"'{k}'" in str(exc)), shard.keys[0] if shard.keys else shard.name)
        raise _on_node(exc, key) from None
    return shard.size - len(shard.header)
