"""``diff``: stream the compared models through their compiled plans, one pass, bounded memory.

Each input (a model file, a LoRA as its converter makes it, a recipe computed on the fly) is
planned like a merge (:func:`~mecha_core.engine.plan.make_plan`) and evaluated key by key with
the merge's :class:`~mecha_core.engine.evaluate.Evaluator`; nothing is written. Large keys are
read in flat slices (when every input can be: stored tensors and element-wise methods), so
memory holds a few slices per worker thread, never a whole model.
"""

from __future__ import annotations

import os
from itertools import combinations
from typing import Any, Sequence

import attrs

from ..errors import MechaError
from ..lazy import torch
from ..plugins import PluginHost, get_host
from ..recipe.nodes import CallNode, ModelNode, Node
from ..specs import Architecture, TensorInfo
from ..engine.evaluate import Evaluator
from ..engine.plan import MergeOptions, Plan, make_plan
from ..engine.safetensors_io import ITEMSIZE, is_float
from ..engine.schedule import chunkable
from . import grouping, measure
from .stream import Progress, run_units
from .result import DiffResult, PairDiff

#: What one flat slice of a key may use (rows in float64, differences, task vectors, signs).
SLICE_BYTES = 16 << 20


@attrs.frozen
class _KeyWork:
    """One key to compare: which models take part (same shape) and how it is cut."""

    key: str
    """The key."""
    members: tuple[int, ...]
    """The models holding the key in the shape of the first of them, in argument order."""
    with_base: bool
    """The base holds the key in that shape too."""
    numel: int
    """Elements of the key."""
    chunk: int | None
    """Elements per slice, or ``None`` to compare the key whole."""


def _as_node(value: Any, host: PluginHost) -> Node:
    if isinstance(value, Node):
        return value
    from ..recipe import as_fill

    if not isinstance(value, (str, os.PathLike)):
        raise MechaError(f"diff: cannot compare {value!r}; give a model path, a .mecha recipe or a recipe node")
    return as_fill(value, host=host)


def _label(value: Any) -> str:
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if isinstance(value, ModelNode):
        return value.path
    if isinstance(value, CallNode):
        return f"{value.method.name}(...)"
    return repr(value)


def diff(*models: Any, base: Any = None, keys: bool = False, pairs: Sequence[tuple[int, int]] | None = None,
         labels: Sequence[str] | None = None, threads: int | None = None, memory_budget: int | None = None,
         models_dir: str | os.PathLike[str] | None = None, progress: bool = False,
         host: PluginHost | None = None) -> DiffResult:
    """Compare ``models`` (paths of model files or ``.mecha`` recipes, or recipe nodes) block by
    block; returns a :class:`~mecha_core.difference.result.DiffResult`.

    ``base``: also compare the task vectors ``model - base``. ``keys``: one group per key instead
    of per block. ``pairs``: which (index, index) pairs to compare (default: every pair, in
    order). ``labels``: how the models are named (default: as given). Errors found from the
    headers (a missing file, no key in common) are raised before any tensor is read; a failure
    while reading is marked as failed (exit code 1).
    """
    host = host or get_host()
    if len(models) < 2:
        raise MechaError("diff needs at least two models to compare")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise MechaError(f"threads must be a whole number of at least 1; got {threads!r}")
    chosen = list(pairs) if pairs is not None else list(combinations(range(len(models)), 2))
    for i, j in chosen:
        if not (0 <= i < len(models) and 0 <= j < len(models)) or i == j:
            raise MechaError(f"diff: pair ({i}, {j}) does not name two of the {len(models)} models")
    names = list(labels) if labels is not None else [_label(m) for m in models]
    nodes = [_as_node(m, host) for m in models]
    base_node = _as_node(base, host) if base is not None else None
    options = MergeOptions(threads=threads, models_dir=os.fspath(models_dir) if models_dir is not None else None,
                           **({"memory_budget": int(memory_budget)} if memory_budget else {}))
    plans: list[Plan] = []
    try:
        for node in [*nodes, *([base_node] if base_node is not None else [])]:
            plans.append(make_plan(node, options, host))
        return _run(plans, names, _label(base) if base is not None else None, chosen, keys, options, progress)
    finally:
        for plan in plans:
            plan.close()


def _widened(value: torch.Tensor) -> torch.Tensor:
    """``value`` flat, half-precision widened to float32 first: torch's float16 -> float64 cast
    is about 3x slower than float16 -> float32 -> float64."""
    flat = value.reshape(-1)
    return flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat


def _architecture(plans: Sequence[Plan]) -> Architecture | None:
    return next((p.architecture for p in plans if p.architecture is not None), None)


def _key_work(key: str, members: tuple[int, ...], shape: tuple[int, ...], plans: list[Plan], model_count: int,
              has_base: bool) -> _KeyWork:
    """How ``key`` is compared among ``members``: with the base or not, whole or in slices."""
    base_info = plans[model_count].output.get(key) if has_base else None
    with_base = base_info is not None and base_info.shape == shape and is_float(base_info.dtype)
    involved = [plans[i] for i in members] + ([plans[model_count]] if with_base else [])
    numel = plans[members[0]].output[key].numel
    per_element = 8 * (len(members) + 2) + (9 * len(members) + 8 if with_base else 0) \
        + 4 * sum(len(p.steps) for p in involved)
    chunk = max(1 << 16, SLICE_BYTES // per_element)
    sliceable = numel > chunk and all(chunkable(p, key) for p in involved)
    return _KeyWork(key, members, with_base, numel, chunk if sliceable else None)


def _plan_keys(plans: list[Plan], model_count: int, pairs: list[tuple[int, int]], names: list[str],
               has_base: bool, arch: Architecture | None) -> tuple[list[_KeyWork], list[int]]:
    """The keys to compare, and for each pair the number of keys it cannot compare."""
    tables: list[dict[str, TensorInfo]] = [p.output for p in plans]
    seen: dict[str, None] = {}
    for table in tables[:model_count]:
        seen.update(dict.fromkeys(k for k, info in table.items() if is_float(info.dtype)))
    work: list[_KeyWork] = []
    unmatched = [0] * len(pairs)
    for key in grouping.key_order(seen, arch):
        holders = [i for i in range(model_count) if key in tables[i] and is_float(tables[i][key].dtype)]
        for n, (i, j) in enumerate(pairs):
            if (i in holders or j in holders) and not (
                    i in holders and j in holders and tables[i][key].shape == tables[j][key].shape):
                unmatched[n] += 1
        # models holding the key in one shape are compared with each other (usually all of them)
        for shape in dict.fromkeys(tables[i][key].shape for i in holders):
            members = tuple(i for i in holders if tables[i][key].shape == shape)
            if any(i in members and j in members for i, j in pairs):
                work.append(_key_work(key, members, shape, plans, model_count, has_base))
    if not work:
        sample = ", ".join(f"{names[i]} and {names[j]}" for i, j in pairs[:2])
        raise MechaError(f"diff: {sample} have no floating-point key of the same shape in common; "
                         f"are they models of one architecture? (`mecha inspect FILE` shows one's keys)")
    return work, unmatched


def _run(plans: list[Plan], names: list[str], base_name: str | None, pairs: list[tuple[int, int]],
         per_key: bool, options: MergeOptions, progress: bool) -> DiffResult:
    model_count = len(names)
    has_base = base_name is not None
    arch = _architecture(plans)
    work, unmatched = _plan_keys(plans, model_count, pairs, names, has_base, arch)
    evaluators = [Evaluator(p) for p in plans]
    units: list[tuple[_KeyWork, int, int | None]] = []
    for item in work:
        if item.chunk is None:
            units.append((item, 0, None))
        else:
            units.extend((item, s, min(s + item.chunk, item.numel)) for s in range(0, item.numel, item.chunk))

    def read_bytes(item: _KeyWork, start: int, stop: int | None) -> int:
        n = (stop - start) if stop is not None else item.numel
        readers = list(item.members) + ([model_count] if item.with_base else [])
        return sum(n * ITEMSIZE[plans[i].output[item.key].dtype] for i in readers)

    def job(unit: tuple[_KeyWork, int, int | None]) -> list[list[float]]:
        item, start, stop = unit
        n = (stop - start) if stop is not None else item.numel
        rows = torch.empty((len(item.members), n), dtype=torch.float64)
        for r, i in enumerate(item.members):
            rows[r].copy_(_widened(evaluators[i].evaluate(item.key, start, stop)))
        base = _widened(evaluators[model_count].evaluate(item.key, start, stop)).to(torch.float64) \
            if item.with_base else None
        position = {m: r for r, m in enumerate(item.members)}
        local = [(position[i], position[j]) for i, j in pairs if i in position and j in position]
        sums = iter(measure.unit_sums(rows, local, base, first_slice=start == 0))
        return [next(sums) if i in position and j in position else measure.zero() for i, j in pairs]

    results: list[list[list[float]] | None] = [None] * len(units)
    report = Progress(len({item.key for item in work}), sum(read_bytes(*u) for u in units), progress,
                      verb="diffing")
    run_units(units, job, results, report, read_bytes, options, plans)

    # fold in a fixed order: keys as planned, slices in order
    with_base = has_base
    group_names: list[str] = []
    group_sums: dict[str, list[list[float]]] = {}
    totals = [measure.zero() for _ in pairs]
    key_sums: dict[str, list[list[float]]] = {}
    for (item, _, _), sums in zip(units, results):
        assert sums is not None
        into = key_sums.setdefault(item.key, [measure.zero() for _ in pairs])
        for n, part in enumerate(sums):
            measure.add(into[n], part)
    for key in key_sums:  # each key once, in planned order
        for n, part in enumerate(key_sums[key]):
            measure.add(totals[n], part)
        for name in ((key,) if per_key else grouping.key_groups(key, arch)):
            if name not in group_sums:
                group_sums[name] = [measure.zero() for _ in pairs]
                group_names.append(name)
            for n, part in enumerate(key_sums[key]):
                measure.add(group_sums[name][n], part)
    order = group_names if per_key else grouping.group_order(arch, group_names)
    return DiffResult(
        models=tuple(names), base=base_name, architecture=arch.name if arch is not None else None,
        grouping="key" if per_key else "block", groups=tuple(order),
        pairs=tuple(PairDiff(first=i, second=j,
                             groups=tuple(measure.measures(group_sums[g][n], with_base) for g in order),
                             total=measure.measures(totals[n], with_base), unmatched_keys=unmatched[n])
                    for n, (i, j) in enumerate(pairs)))


def merge_report(recipe: Node, output: str | os.PathLike[str], *, models_dir: str | os.PathLike[str] | None = None,
                 threads: int | None = None, progress: bool = False, host: PluginHost | None = None) -> DiffResult:
    """How far a merge's written ``output`` moved from each of the recipe's model inputs, per
    block: a diff of every weight-space input (A) against the output (B). Delta inputs (LoRAs,
    differences) are left out: a weight is not comparable with a change. The output is read back
    from disk, so this costs one more pass over the inputs and the output."""
    from ..specs import DELTA

    host = host or get_host()
    options = MergeOptions(models_dir=os.fspath(models_dir) if models_dir is not None else None)
    inputs: list[ModelNode] = []
    for node in dict.fromkeys(n for n in _walk_models(recipe)):
        with make_plan(node, options, host) as plan:
            if plan.steps[-1].space != DELTA:
                inputs.append(node)
    if not inputs:
        raise MechaError("--report: the recipe has no weight-space model input to compare the output with")
    out = ModelNode(os.path.abspath(os.fspath(output)))
    return diff(*inputs, out, pairs=[(i, len(inputs)) for i in range(len(inputs))],
                labels=[*(n.path for n in inputs), os.fspath(output)], threads=threads, models_dir=models_dir,
                progress=progress, host=host)


def _walk_models(root: Node) -> list[ModelNode]:
    from ..recipe.nodes import walk

    return [n for n in walk(root) if isinstance(n, ModelNode)]
