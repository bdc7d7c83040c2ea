"""Running merges through an executor (:class:`mecha_core.specs.Executor`), and what one is
built on (public to plugins as :mod:`mecha_core.kit.executors`).

A merge to run is a :class:`MergeJob`, checked by ``mecha_core.merge`` before any tensor is read.
An executor writes it with :func:`write_file` (a single ``.safetensors``) or :func:`write_folder`
(a Hugging Face folder): the core plans the merge, opens the output (a temporary beside the
target, allocated, its header written), lets the executor compute the keys, and commits the
output atomically, so a failure leaves nothing behind and the bytes are the local executor's.

Where the keys are computed is the executor's choice. Anywhere that holds the same job (the
same recipe, options and input files under the same paths) can :func:`open_plan` it again,
check it is the same plan (:func:`plan_fingerprint`), and compute any of its :func:`work_units`
to bytes (:func:`unit_writer`) or write any shard of a folder (:func:`write_shard_file`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

import attrs

from .engine.plan import MergeOptions, Plan, make_plan
from .engine.run import execute, unit_bytes
from .engine.run_folder import copy_source, execute_folder, write_shard
from .engine.safetensors_io import ITEMSIZE, build_header
from .engine.schedule import Progress, Unit, units
from .engine.shards import Shard
from .output import TerminateAsInterrupt
from .plugins import get_host
from .recipe import dump_recipe, load_recipe
from .recipe.nodes import Node, relocate
from .specs import Executor



def _version() -> str:
    from .about import version

    return version()


def plugins_used(plan: Plan) -> dict[str, str]:
    """Plugin name -> distribution version, for every plugin the merge relied on (recorded by
    the plan as it was made)."""
    return plan.plugins_used()


def merge_metadata(plan: Plan) -> dict[str, str]:
    """What a merged file records: the recipe, and the versions of mecha and its plugins."""
    return {
        "mecha_recipe": dump_recipe(plan.root),
        "mecha_version": _version(),
        "mecha_plugins": json.dumps(plugins_used(plan), sort_keys=True),
    }


@attrs.frozen
class MergeJob:
    """One merge to run, checked (output name, options, recipe) before any tensor is read."""

    recipe: Node | str = attrs.field(repr=False)
    """The recipe, its parameters filled (``.mecha`` text in a :func:`portable` job)."""
    output: str
    """The output path as given (a folder output ends with ``/`` or is an existing folder)."""
    options: MergeOptions
    """How the merge runs (threads, memory budget, dtypes, models folder ...)."""
    folder: bool = False
    """Whether the output is a Hugging Face folder (else a single ``.safetensors`` file)."""
    max_shard_size: int = 0
    """A folder output's largest shard in bytes."""
    copy_files_from: str | None = None
    """A folder output: the model whose non-weight files it takes (``None``: the first folder)."""
    protect: Mapping[str, str | None] = attrs.field(factory=dict, repr=False)
    """Paths the output may not be (the recipe files), with how errors name them."""
    progress: bool = False
    """Show the progress line on stderr."""
    cwd: str = attrs.field(factory=os.getcwd)
    """The working folder the job was made in: relative model paths are relative to it."""
    settings: Mapping[str, Any] = attrs.field(factory=dict)
    """The executor's settings (``{"address": ...}`` for Ray), as the executor declares them."""
    label: Mapping[str, str] = attrs.field(factory=dict)
    """For a sweep: the swept parameters' values that made this output (for reports)."""
    metadata: Mapping[str, str] | None = None
    """Set on a job sent to another process (:func:`portable`): the driver's merge metadata, which
    the output header records, used instead of this process's own."""
    host: Any = attrs.field(default=None, repr=False, eq=False)
    """The plugin host to plan with (``None``: the process-wide one; an executor sending the job
    to another process drops it, since each process discovers its own plugins)."""


@contextlib.contextmanager
def open_plan(job: MergeJob) -> Iterator[Plan]:
    """The job's plan (headers only; the inputs are open until the block ends)."""
    host = job.host or get_host()
    recipe = job.recipe if isinstance(job.recipe, Node) else load_recipe(job.recipe, host=host)
    with make_plan(recipe, job.options, host) as plan:
        yield plan


def portable(job: MergeJob, plan: Plan) -> MergeJob:
    """``job`` as another process needs it to plan the same merge (planned here as ``plan``):
    the recipe as ``.mecha`` text with model paths relative to ``job.cwd`` (recipe nodes hold
    plugin objects that do not pickle), this process's merge metadata, no host."""
    text = dump_recipe(relocate(plan.root, job.cwd))
    return attrs.evolve(job, recipe=text, host=None, progress=False, metadata=merge_metadata(plan))


def work_units(plan: Plan) -> list[Unit]:
    """The plan's units of work in output order (a key, or a slice of a large element-wise key);
    the same list in every process that holds the same plan."""
    return units(plan)


def unit_output_bytes(plan: Plan, unit: Unit) -> int:
    """Bytes ``unit`` writes to the output."""
    info = plan.output[unit.key]
    n = info.numel if unit.stop is None else unit.stop - unit.start
    return n * ITEMSIZE[info.dtype]


def plan_fingerprint(plan: Plan, metadata: Mapping[str, str] | None = None) -> str:
    """A digest of what decides the output's bytes and its units: the output header (keys,
    shapes, dtypes, offsets, the recorded recipe and versions) and the units. Two processes with
    the same fingerprint write the same bytes; a node whose inputs differ gets another one."""
    header, _ = build_header(plan.output, metadata if metadata is not None else merge_metadata(plan))
    digest = hashlib.sha256(header)
    for unit in units(plan):
        digest.update(f"{unit.key}\0{unit.start}\0{unit.stop}\n".encode())
    return digest.hexdigest()


def unit_writer(plan: Plan, metadata: Mapping[str, str] | None = None) -> Callable[[Unit], tuple[int, bytes]]:
    """For a single-file output: a function giving a unit's position in the output file and its
    bytes (evaluated, checked and cast as the local executor does). Call it inside
    :func:`single_threaded`, as the local executor's workers run, so the bytes never depend on
    a host's core count."""
    compute = unit_bytes(plan, dict(metadata) if metadata is not None else merge_metadata(plan))

    def write(unit: Unit) -> tuple[int, bytes]:
        position, data = compute(unit)
        return position, bytes(data)

    return write


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One torch intra-op thread inside the block, as the local executor's workers use."""
    from .lazy import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def write_shard_file(plan: Plan, shard: Shard, path: str) -> None:
    """Write one shard of a folder output at ``path``; a file left there by an earlier attempt
    (a worker that died) is replaced."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    with single_threaded():
        write_shard(plan, shard, path)


def progress_line(total_keys: int, total_bytes: int, enabled: bool) -> Progress:
    """The progress line on stderr (keys, bytes, rate, ETA): ``update(bytes, key_done)``, ``close()``."""
    return Progress(total_keys, total_bytes, enabled)


def write_file(job: MergeJob, fill: Callable[[Plan, Callable[[int, bytes], None]], None] | None = None) -> str:
    """Plan ``job`` and write its single-file output atomically; returns its absolute path.

    ``fill(plan, pwrite)`` computes every unit and writes its bytes with ``pwrite(position,
    data)`` (positions from :func:`unit_writer`); ``None``: the local thread pool."""
    with open_plan(job) as plan, TerminateAsInterrupt():
        return execute(plan, job.output, merge_metadata(plan), progress=job.progress, protect=job.protect, fill=fill)


def write_folder(job: MergeJob, write_shards: Callable[[Plan, list[tuple[Shard, str]]], None] | None = None) -> str:
    """Plan ``job`` and write its folder output atomically (shards, index last, recipe, copied
    files); returns its absolute path.

    ``write_shards(plan, [(shard, path), ...])`` writes every shard as a new file at its path
    (:func:`write_shard_file`) before returning; ``None``: the local thread pool."""
    with open_plan(job) as plan, TerminateAsInterrupt():
        return execute_folder(plan, job.output, merge_metadata(plan), max_shard_size=job.max_shard_size,
                              copy_from=copy_source(plan, job.copy_files_from), progress=job.progress,
                              protect=job.protect, write_shards=write_shards)


def run_locally(job: MergeJob) -> str:
    """The ``local`` executor: the job in this process's thread pool."""
    return write_folder(job) if job.folder else write_file(job)


def _run_local(jobs: Sequence[MergeJob]) -> list[str]:
    return [run_locally(job) for job in jobs]


#: The default executor, the core's own: each merge in this process's thread pool, a sweep's
#: merges one after another.
LOCAL_EXECUTOR = Executor("local", run=_run_local,
                          description="this machine's thread pool; a sweep's merges one after another")


def find_executor(name: str, host: Any = None) -> Executor:
    """The executor called ``name``: ``local``, or one an installed plugin provides."""
    return LOCAL_EXECUTOR if name == LOCAL_EXECUTOR.name else (host or get_host()).executor(name)
