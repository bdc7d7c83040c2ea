"""Running a plan into a Hugging Face folder: shards written one by one, the index last.

The shard layout (:func:`mecha_core.engine.shards.plan_shards`) is fixed by the plan before any
tensor is computed, and :func:`write_shard` writes one shard from the plan and that layout
alone, so shards can be written by separate workers; :func:`execute_folder` writes them all in
this process, then the index, the recipe and the files copied from an input folder, into a
temporary folder renamed over the target at the end.
"""

from __future__ import annotations

import errno
import os
from typing import Callable, Mapping

import attrs

from ..errors import MechaError, OutputError, PlanError, mark_failed
from ..lazy import torch
from ..output import Protected
from ..output_folder import INDEX_NAME, RECIPE_NAME, OutputFolder, copy_file, files_to_copy, write_bytes
from ..recipe.nodes import ModelNode
from .allocator import reuse_freed_memory
from .direct_write import OutputWriter, RegionPool, staging_memory
from .folders import is_pipeline_folder
from .layer_view import rewrite_config
from .plan import Plan
from .run import _writer
from .schedule import run_units, worker_count
from .shards import Shard, ShardLayout, plan_shards

#: Added to every shard's metadata: transformers refuses a safetensors file whose metadata
#: lacks ``format`` (``save_pretrained`` writes ``pt``).
SHARD_FORMAT = {"format": "pt"}


def shard_layout(plan: Plan, max_shard_size: int, metadata: Mapping[str, str]) -> ShardLayout:
    """The plan's output as shards (keys in the plan's order: the first input's)."""
    return plan_shards(plan.output, max_shard_size, {**SHARD_FORMAT, **metadata})


def _create_shard(shard: Shard, path: str) -> int:
    """A new shard file at ``path``, allocated at its final size, its header written; its fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
    except OSError as exc:
        raise OutputError(f"{path}: cannot create: {exc.strerror or exc}") from None
    try:
        try:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, shard.size)
            else:
                os.ftruncate(fd, shard.size)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise OutputError(f"{path}: not enough disk space for {shard.size / 1e6:,.0f} MB") from None
            os.ftruncate(fd, shard.size)
        os.pwrite(fd, shard.header, 0)
    except OSError as exc:
        os.close(fd)
        raise OutputError(f"{path}: writing failed: {exc.strerror or exc}") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_shards(plan: Plan, shards: list[tuple[Shard, str]], progress: bool,
                  write_hook: Callable[[str], None] | None, label: str) -> None:
    """Create the shard files and compute their keys in one run (one pool, one progress line);
    ``label`` names the output in errors."""
    keys = [k for shard, _ in shards for k in shard.keys]
    part = plan if len(keys) == len(plan.output) else attrs.evolve(plan, output={k: plan.output[k] for k in keys})
    fds: list[int] = []
    writers: list[OutputWriter] = []
    # one pool for every shard: all shards are open at once
    pool = RegionPool.for_merge(plan.options.memory_budget, worker_count(plan.options))
    old_threads = torch.get_num_threads()
    try:
        place: dict[str, tuple[OutputWriter, int]] = {}
        for shard, path in shards:
            fd = _create_shard(shard, path)
            fds.append(fd)
            writers.append(OutputWriter(fd, path, (len(shard.header), shard.size), pool=pool))  # past the page cache
            place.update({key: (writers[-1], len(shard.header) + offset) for key, offset in shard.offsets.items()})
        # one intra-op thread per worker, as for a single file: bytes independent of the thread count
        torch.set_num_threads(1)
        with reuse_freed_memory(plan.options.memory_budget):  # fewer page faults (engine/allocator.py)
            run_units(part, _writer(part, place, write_hook, label), progress, staging_memory(pool, writers))
        for writer in writers:  # an error of a writer's thread: the same message as a worker's
            try:
                writer.finish()
            except OSError as exc:
                raise OutputError(f"{label}: writing failed: {exc.strerror or exc}") from None
    finally:
        torch.set_num_threads(old_threads)
        for writer in writers:
            writer.close()
        for fd in fds:
            os.close(fd)


def write_shard(plan: Plan, shard: Shard, path: str, *, progress: bool = False,
                write_hook: Callable[[str], None] | None = None) -> None:
    """Compute the keys of ``shard`` and write the shard file at ``path`` (a new file).

    Only the plan and the shard are needed: the bytes are the same whoever writes them, with
    any thread count (a worker of a distributed merge writes its shards with this)."""
    _write_shards(plan, [(shard, path)], progress, write_hook, path)


#: ``write(plan, shards)``: writes every ``(shard, path)`` (each a new file, as
#: :func:`write_shard` does) before returning: another executor's way of writing a folder's
#: shards (the default computes them in this process's thread pool)
ShardWriter = Callable[[Plan, "list[tuple[Shard, str]]"], None]


def execute_folder(plan: Plan, output: str | os.PathLike[str], metadata: dict[str, str], *,
                   max_shard_size: int, copy_from: str | None = None, progress: bool = False,
                   write_hook: Callable[[str], None] | None = None, protect: Protected = (),
                   write_shards: ShardWriter | None = None) -> str:
    """Write the merge as a folder at ``output`` atomically; returns the folder's absolute path.

    ``copy_from``: the input folder whose non-weight files (config, tokenizer ...) the output
    takes. The folder must contain none of the inputs nor any path in ``protect``. Errors once
    tensors are read are marked as a failed merge (exit code 1). ``write_shards``: writes the
    shards instead of the local thread pool (see :data:`ShardWriter`)."""
    labels = dict(protect) if isinstance(protect, Mapping) else {p: None for p in protect}
    for source in plan.sources:
        labels.setdefault(source.path, f"the input {source.path}")
    out = OutputFolder(output, protect=labels)
    layout = shard_layout(plan, max_shard_size, metadata)
    with out:
        try:
            # every shard in one run: the same bytes as write_shard one by one, without an idle
            # pool at each shard's end
            targets = [(shard, out.file(shard.name)) for shard in layout.shards]
            if write_shards is not None:
                write_shards(plan, targets)
            else:
                _write_shards(plan, targets, progress, write_hook, out.given)
            if copy_from is not None:
                for name in files_to_copy(copy_from):
                    copy_file(os.path.join(copy_from, name), out.file(name))
                    rewrite_config(out.file(name), plan.sources)  # a layer stack's num_hidden_layers
            write_bytes(out.file(RECIPE_NAME), metadata["mecha_recipe"].encode("utf-8"))
            index = layout.index_json()
            if index is not None:  # last: a folder with an index has every shard
                write_bytes(out.file(INDEX_NAME), index.encode("utf-8"))
            return out.commit()
        except MechaError as exc:  # tensors were read: a failed merge (exit 1), not bad usage
            raise mark_failed(exc)  # noqa: B904 (the same exception, re-raised with its traceback)


def _folder_of(source_path: str) -> str | None:
    """The folder whose files an output may take from this input: a Hugging Face folder model,
    or the folder of a file that sits beside a config.json; not a diffusers pipeline (its files
    describe a layout the output does not have)."""
    if os.path.isdir(source_path):
        return None if is_pipeline_folder(source_path) else source_path
    folder = os.path.dirname(source_path)
    return folder if os.path.isfile(os.path.join(folder, "config.json")) else None


def copy_source(plan: Plan, name: str | os.PathLike[str] | None = None) -> str | None:
    """The input folder whose non-weight files a folder output copies: the model the recipe
    names ``name`` (as the recipe writes it, or its path), else the one whose vocabulary the
    output keeps (``model(..., keep_vocab=true)``), else the recipe's first model that has such a
    folder; ``None`` when no model has one."""
    models = [(step.node.path, step.source.path) for step in plan.steps
              if isinstance(step.node, ModelNode) and step.source is not None]
    if name is None and plan.vocab_from is not None and _folder_of(plan.vocab_from) is not None:
        return _folder_of(plan.vocab_from)  # the model whose vocabulary the output keeps: its tokenizer
    if name is None:
        return next((f for f in (_folder_of(path) for _, path in models) if f is not None), None)
    wanted = os.fspath(name)
    for written, path in models:
        if wanted in (written, path) or os.path.realpath(os.path.abspath(wanted)) == os.path.realpath(path):
            folder = _folder_of(path)
            if folder is None:
                why = ("is a diffusers pipeline" if os.path.isdir(path)
                       else "is a file whose folder has no config.json")
                raise PlanError(f"--copy-files-from {wanted}: the model {path} {why}; there are no "
                                f"model files to copy from it")
            return folder
    names = ", ".join(dict.fromkeys(w for w, _ in models))
    raise PlanError(f"--copy-files-from {wanted}: no model of the recipe is named so (its models: {names})")
