"""Planning a merge from headers alone: which keys come out, their shapes and dtypes, and how.

Nothing but headers is read here. Every error the inputs can cause (missing files, keys that are
not in every input, shapes that disagree, merge spaces that do not fit) is raised before the
output file is created.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import attrs

from ..errors import MechaError, PlanError, RecipeError, UnfilledParameterError
from ..method import MergeMethod
from ..plugins import PluginHost, get_host
from ..recipe.nodes import CallNode, LiteralNode, ModelNode, Node, ParameterNode, origin, walk
from ..recipe.values import WeightMap, class_matches
from ..specs import DELTA, Architecture, TensorInfo
from .hyper import BoundHyperparameters, PerKey, bind
from .safetensors_io import is_float
from .families import concrete_map
from .layer_view import view_source
from .sources import ConvertedSource, Source, open_source, resolve_path
from .vocab import fit_vocabularies, vocab_keeper, vocabulary_mismatch
from .vocab_map import apply_vocab_maps

GiB = 1024 ** 3
#: the provider name of what the core registers itself (the base and delta model types)
CORE = "mecha-core"


@attrs.frozen
class MergeOptions:
    """How a merge runs. Every option has a default that suits a desktop machine."""

    threads: int | None = None
    """Worker threads; default: the number of CPU cores."""
    memory_budget: int = 1 * GiB
    """Bytes of tensors in flight at once (a single key larger than this runs alone)."""
    work_dtype: str = "float32"
    """The dtype methods compute in."""
    output_dtype: str | None = None
    """The dtype of float keys in the output; default: each key's dtype in the first input."""
    device: str = "cpu"
    """``cpu``, or ``cuda`` (``cuda:N``) when present."""
    allow_missing: bool = False
    """Keys missing from some inputs take the first input that has them, instead of failing."""
    allow_nonfinite: bool = False
    """Write NaN/Inf values instead of failing on them."""
    models_dir: str | None = None
    """Where relative model paths are looked up first."""
    slice_bytes: int = 16 << 20
    """Working memory one slice of an element-wise key may use (inputs, temporaries, result);
    a slice's length is this divided by the bytes per element of all its inputs, so memory does
    not grow with the number of models."""
    chunk_elements: int | None = None
    """Fixed elements per slice, overriding ``slice_bytes`` (tests use it)."""


@attrs.define(eq=False)
class Step:
    """One node of the recipe graph, compiled for evaluation: a model input or a method call with
    its inputs and hyperparameters bound (the runner reads these fields, never the node)."""

    index: int
    """The step's position in :attr:`Plan.steps` (inputs always come first)."""
    node: Node
    """The recipe node it was planned from (for planning and its messages only)."""
    inputs: list[int] = attrs.field(factory=list)
    """The indices of the steps whose results the method takes, in argument order."""
    table: dict[str, TensorInfo] = attrs.field(factory=dict)
    """The keys the step produces, with shapes and dtypes."""
    take: dict[str, int] = attrs.field(factory=dict)
    """Key -> the input position passed through unchanged (integer buffers, --allow-missing)."""
    source: Source | None = None
    """The file a model step reads."""
    space: str | None = None
    """The merge space of the step's values."""
    archs: dict[str, str] = attrs.field(factory=dict)
    """Architecture name -> a file of it, among the inputs below this step (at most one name)."""
    method: MergeMethod | None = None
    """The method a call step runs."""
    hyper: BoundHyperparameters | None = None
    """A call's hyperparameters, bound for every key."""
    provider: str | None = None
    """The plugin that provides the method (named when the method fails)."""
    plugins: frozenset[str] = frozenset()
    """The plugins this step itself relies on: the method's provider; a model's architecture,
    model type and converters (recorded in the output's metadata)."""


@attrs.define(eq=False)
class Plan:
    """Everything known before the first tensor is read."""

    root: Node
    """The recipe that was planned."""
    steps: list[Step]
    """The compiled graph in topological order; the last step is the root."""
    output: dict[str, TensorInfo]
    """The output's keys, with shapes and output dtypes."""
    sources: list[Source]
    """Every opened input (closed by :meth:`close`)."""
    options: MergeOptions
    """How the merge runs."""
    host: PluginHost
    """The plugins the plan was made with."""
    architecture: Architecture | None
    """The architecture of the merge's keys, when one was detected or named."""
    vocab_from: str | None = None
    """The path of the model whose vocabulary the output keeps (``model(..., keep_vocab=true)``):
    the tokenizer files to copy beside a folder output are that model's; or the folder of
    tokenizer files the recipe's vocabulary maps name (``model(..., vocab=...)``); ``None`` when
    the recipe names none."""

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __enter__(self) -> "Plan":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def input_paths(self) -> list[str]:
        return [s.path for s in self.sources]

    def plugins_used(self) -> dict[str, str]:
        """Plugin name -> distribution version, for every plugin the merge relies on (the core
        itself is not listed)."""
        names: set[str] = set()
        for step in self.steps:
            names |= step.plugins
        versions = {r.name: r.version or "unknown" for r in self.host.records}
        return {n: versions.get(n, "unknown") for n in sorted(names)}


def _describe(node: Node, steps_by_node: dict[Node, Step]) -> str:
    if isinstance(node, ModelNode):
        step = steps_by_node.get(node)
        return os.path.basename(step.source.path) if step and step.source else node.path
    if isinstance(node, CallNode):
        return f"the result of {node.method.name}"
    return repr(node)


def _fits(value: Any, kind: type) -> bool:
    """Whether a literal suits a hyperparameter annotated ``kind`` (maps hold numbers)."""
    if kind is float:
        return isinstance(value, WeightMap) or (isinstance(value, (int, float)) and not isinstance(value, bool))
    if kind is int:
        if isinstance(value, WeightMap):  # every number the map can give must be whole
            return all(_fits(v, int) for m in value.chain()
                       for v in (*(v for _, v in m.entries), *(x for x in (m.default, m.gradient) if x is not None)))
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _check_hyper(node: CallNode, name: str, value: Node, host: PluginHost) -> None:
    if isinstance(value, ParameterNode):
        raise UnfilledParameterError(f"recipe parameter '{value.name}' ({node.method.name}'s {name}) "
                                     f"is not filled; fill it with `mecha merge -p {value.name}=VALUE` "
                                     f"or `mecha compose`")
    spec = node.method.hyperparameter(name)
    if isinstance(value, LiteralNode) and spec.kind is not None and not _fits(value.value, spec.kind):
        raise RecipeError(f"{node.method.name}: hyperparameter '{name}' must be {spec.kind.__name__}, "
                          f"got {value.value!r}")
    if isinstance(value, LiteralNode) and isinstance(value.value, WeightMap):
        for m in value.value.chain():
            arch = host.architecture(m.arch)
            known = arch.blocks if m.kind == "blocks" else arch.classes
            if m.kind == "layers":
                if not arch.layers:
                    raise RecipeError(f"{node.method.name}({name}=...): {m.arch} has no layers for a "
                                      f"layer gradient; use blocks() or classes()")
                # a filter names whole _-separated parts of classes (self_attn, q_proj: self_attn_q_proj)
                known = [e for e, _ in m.entries if any(class_matches(e, c) for c in arch.classes)]
            for entry, _ in m.entries:
                if entry not in known:
                    import difflib

                    hint = difflib.get_close_matches(entry, arch.classes if m.kind == "layers" else known, n=1)
                    raise RecipeError(f"{node.method.name}({name}=...): {m.arch} has no "
                                      f"{'block' if m.kind == 'blocks' else 'class'} "
                                      f"'{entry}'" + (f"; did you mean '{hint[0]}'?" if hint else ""))


def _check_map_matches(step: Step, host: PluginHost, name: str, value: Node) -> None:
    """A block/class map must name the architecture of the keys it weights: another one (SDXL's
    map on SD1 models) would silently give keys the method's default, or another layout's blocks."""
    node = step.node
    assert isinstance(node, CallNode)
    if not (isinstance(value, LiteralNode) and isinstance(value.value, WeightMap)) or not step.table:
        return
    model_archs = set(step.archs)
    arch = host.architecture(value.value.arch)
    if model_archs:
        wrong = arch.name not in model_archs
    else:  # files of no detected architecture: the map's must hold their keys best of all
        covered = {a.name: sum(key in a.keys for key in step.table) for a in host.architectures.values()}
        wrong = covered[arch.name] == 0 or covered[arch.name] < max(covered.values())
    if wrong:
        found = ", ".join(sorted(model_archs)) or "no known architecture"
        raise PlanError(f"{node.method.name}({name}=...): the map names {arch.name}, but the keys of "
                        f"this merge are not {arch.name}'s (its models: {found}); name the models' "
                        f"architecture (`mecha inspect FILE` shows it)")


def _check_one_file_per_model(root: Node, models_dir: str | None) -> None:
    """Equal model nodes are one input, but a relative path in recipes from two folders can name
    two files: refuse that rather than read one of them twice (a recipe can keep only one)."""
    dirs: dict[ModelNode, dict[str | None, ModelNode]] = {}
    seen: set[int] = set()
    stack: list[Node] = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, ModelNode):
            dirs.setdefault(node, {}).setdefault(node.base_dir, node)
        elif isinstance(node, CallNode):
            stack.extend(node.args)
    for node, variants in dirs.items():
        if len(variants) > 1:
            files = {os.path.realpath(resolve_path(v, models_dir)) for v in variants.values()}
            if len(files) > 1:
                raise PlanError(f"model '{node.path}' names {len(files)} different files ("
                                f"{', '.join(sorted(files))}) in recipes from different folders; "
                                f"give one of them another path (`mecha compose` writes paths that "
                                f"stay apart)")


def make_plan(root: Node, options: MergeOptions | None = None, host: PluginHost | None = None) -> Plan:
    """Open every input's header and work out the output; raises before anything is written."""
    options = options or MergeOptions()
    host = host or get_host()
    if not isinstance(root, (CallNode, ModelNode)):
        if isinstance(root, ParameterNode):
            raise UnfilledParameterError(f"the recipe is only the parameter '{root.name}'; fill it first")
        raise RecipeError("a recipe to merge must be a model or a method call")
    _check_one_file_per_model(root, options.models_dir)
    steps: list[Step] = []
    optional_cache: dict[str, frozenset[str]] = {}
    map_cache: dict[tuple[Node, Any, str], PerKey] = {}
    by_node: dict[Node, Step] = {}
    sources: list[Source] = []
    opened: dict[Node, Source] = {}
    try:
        keeper = vocab_keeper(root)
        mapped = [n for n in walk(root) if isinstance(n, ModelNode) and n.vocab is not None]
        if keeper is not None and mapped:
            with _located(mapped[0]):
                raise RecipeError("a recipe gives models either keep_vocab or vocab maps, not both")
        files_from: str | None = None
        if keeper is not None or mapped:  # every input is opened first: the others are fitted to its vocabulary
            for node in walk(root):
                if isinstance(node, ModelNode):
                    with _located(node):
                        opened[node] = _open(node, resolve_path(node, options.models_dir), host,
                                             options.allow_missing)
                    sources.append(opened[node])
            if keeper is not None:
                with _located(keeper):
                    opened = fit_vocabularies(opened, keeper, host)
            else:
                with _located(*mapped):
                    opened, files_from = apply_vocab_maps(opened, host)
            sources[:] = list(opened.values())
        for node in walk(root):
            if isinstance(node, LiteralNode):
                continue
            if isinstance(node, ParameterNode):
                with _located(node):
                    raise UnfilledParameterError(f"recipe parameter '{node.name}' is not filled; fill it "
                                                 f"with `mecha compose` (or `-p {node.name}=PATH`)")
            step = Step(len(steps), node)
            if isinstance(node, ModelNode):
                if node in opened:
                    step.source = opened[node]
                    path = step.source.path
                else:
                    with _located(node):  # say which recipe line names the model
                        path = resolve_path(node, options.models_dir)
                        step.source = _open(node, path, host, options.allow_missing)
                    sources.append(step.source)
                step.table = dict(step.source.keys)
                step.space = step.source.space
                step.plugins = _source_plugins(step.source, host)
                if step.source.arch is not None:
                    step.archs = {step.source.arch: path}
            elif isinstance(node, CallNode):
                _plan_call_step(step, node, steps, by_node, options, host, optional_cache, map_cache)
            steps.append(step)
            by_node[node] = step
        root_step = by_node[root]
        output = {}
        for key, info in root_step.table.items():
            dtype = info.dtype
            if options.output_dtype is not None and is_float(dtype):
                dtype = options.output_dtype
            output[key] = TensorInfo(info.shape, dtype)
        # every call checked that its inputs share one architecture, and the root is above them all
        arch = next((s.arch for s in sources if s.arch is not None), None)
        return Plan(root, steps, output, sources, options, host, _known_architecture(host, arch),
                    opened[keeper].path if keeper is not None else files_from)
    except BaseException:
        for s in sources:
            s.close()
        raise


def _open(node: ModelNode, path: str, host: PluginHost, allow_missing: bool) -> Source:
    """A model input: the file's weights, seen through its layer view when the node has one."""
    source = open_source(node, path, host, allow_missing)
    if node.layers is None:
        return source
    try:
        return view_source(source, node.layers, host, node.path)
    except BaseException:
        source.close()
        raise


def _known_architecture(host: PluginHost, name: str | None) -> Architecture | None:
    """The installed architecture ``name`` (a converter may name one no plugin provides)."""
    if name is None:
        return None
    try:
        return host.architecture(name)
    except MechaError:
        return None


@contextlib.contextmanager
def _located(*nodes: Node) -> Iterator[None]:
    """Prefix a MechaError raised about ``nodes`` with the recipe line of the first of them that
    has one (``recipe.mecha:3:18: ...``); nodes built in Python have none."""
    try:
        yield
    except MechaError as exc:
        where = next((w for w in (getattr(n, "where", None) for n in nodes) if w is not None), None)
        if where is None or getattr(exc, "line", None) is not None:
            raise
        # keep the cause: --debug shows the traceback of the plugin code that failed
        raise type(exc)(f"{where}: {exc}") from exc.__cause__


def _plan_call_step(step: Step, node: CallNode, steps: list[Step], by_node: dict[Node, Step],
                    options: MergeOptions, host: PluginHost, optional_cache: dict[str, frozenset[str]],
                    map_cache: dict[tuple[Node, Any, str], PerKey]) -> None:
    """Check a call's hyperparameters and inputs, work out its keys, and bind what it runs with."""
    inputs = [by_node[a] for a in node.args]
    kwargs = node.kwargs
    below = {arch: path for s in inputs for arch, path in s.archs.items()}
    if any(isinstance(v, LiteralNode) and isinstance(v.value, WeightMap) for _, v in kwargs):
        # a map naming a family (blocks("llama", ...)) names the layout of this call's inputs
        concrete = []
        for name, value in kwargs:
            with _located(value, node):
                concrete.append((name, _concrete(value, below, host, f"{node.method.name}({name}=...)")))
        kwargs = tuple(concrete)
    for name, value in kwargs:
        with _located(value, node):
            _check_hyper(node, name, value, host)
    step.inputs = [s.index for s in inputs]
    with _located(node):
        step.archs = _one_architecture(node, inputs)
        _plan_call(step, inputs, options, by_node, _optional_keys(host, step.archs, optional_cache),
                   _vocab_keys(host, step.archs))
    for name, value in kwargs:
        with _located(value, node):
            _check_map_matches(step, host, name, value)
    step.method = node.method
    step.hyper = bind(node.method, kwargs, host, map_cache)
    step.provider = host.merge_methods.provider(node.method.name)
    step.plugins = _plugins(step.provider)


def _concrete(value: Node, archs: dict[str, str], host: PluginHost, what: str) -> Node:
    if not (isinstance(value, LiteralNode) and isinstance(value.value, WeightMap)):
        return value
    concrete = concrete_map(value.value, archs, host, what)
    return value if concrete is value.value else attrs.evolve(value, value=concrete)


def _vocab_keys(host: PluginHost, archs: dict[str, str]) -> frozenset[str]:
    """The keys the (one) architecture under a call has vocabulary rows in."""
    if len(archs) != 1:
        return frozenset()
    try:
        return frozenset(host.architecture(next(iter(archs))).vocab_keys)
    except MechaError:
        return frozenset()


def _source_plugins(source: Source, host: PluginHost) -> frozenset[str]:
    """The plugins a model input relies on: its architecture's and model type's providers, and
    every converter's along the way."""
    names = {host.architecture_provider(source.arch) if source.arch else None,
             host.model_types.provider(source.type) if source.type else None}
    inner: Source | None = source
    while isinstance(inner, ConvertedSource):
        names.add(host.converters.provider(inner.converter.name))
        inner = inner.inner
    return _plugins(*names)


def _plugins(*providers: str | None) -> frozenset[str]:
    """The plugin names among registry providers (the core's own registrations are not plugins)."""
    return frozenset(p for p in providers if p and p != CORE)


def _one_architecture(node: CallNode, inputs: list[Step]) -> dict[str, str]:
    """The architectures below a call: at most one. An SDXL LoRA on SD1 weights shares some
    key names and shapes with it, so without this check --allow-missing would apply part of it."""
    found: dict[str, str] = {}
    for step in inputs:
        for arch, path in step.archs.items():
            found.setdefault(arch, path)
    if len(found) > 1:
        (a, pa), (b, pb) = list(found.items())[:2]
        # a converter that refused a file (ValueError) may be why it was read as the other one
        refused = [r for s in inputs if s.source is not None for r in getattr(s.source, "refusals", ())]
        raise PlanError(f"{node.method.name}: its inputs are of different architectures: "
                        f"{os.path.basename(pa)} is {a}, {os.path.basename(pb)} is {b}; if one was "
                        f"detected wrongly, name it with model(..., arch=...)"
                        + (f" (before that, {refused[0]})" if refused else ""))
    return found


def _optional_keys(host: PluginHost, archs: dict[str, str], cache: dict[str, frozenset[str]]) -> frozenset[str]:
    """The keys the (one) architecture under a call marks optional."""
    if len(archs) != 1:
        return frozenset()
    name = next(iter(archs))
    if name not in cache:
        try:
            arch = host.architecture(name)
            cache[name] = frozenset(k for k, spec in arch.keys.items() if spec.optional)
        except MechaError:
            cache[name] = frozenset()
    return cache[name]


def _plan_call(step: Step, inputs: list[Step], options: MergeOptions, by_node: dict[Node, Step],
               optional: frozenset[str] = frozenset(), vocab: frozenset[str] = frozenset()) -> None:
    node = step.node
    assert isinstance(node, CallNode)
    method = node.method
    step.space = method.result_space([s.space for s in inputs], origins=[
        _describe(arg, by_node) if isinstance(arg, ModelNode) else origin(arg) for arg in node.args])
    dense = [i for i, s in enumerate(inputs) if s.space != DELTA]
    union = method.accepts_missing or not dense
    keys: dict[str, None] = {}
    for i in (range(len(inputs)) if union else dense):
        keys.update(dict.fromkeys(inputs[i].table))
    missing: list[tuple[str, int]] = []
    for key in keys:
        having = [i for i, s in enumerate(inputs) if key in s.table]
        first = inputs[having[0]].table[key]
        for i in having[1:]:
            other = inputs[i].table[key]
            if other.shape != first.shape:
                if key in vocab:
                    raise PlanError(vocabulary_mismatch(key, first, _describe(node.args[having[0]], by_node),
                                                        other, _describe(node.args[i], by_node)))
                raise PlanError(f"key '{key}' has shape {list(first.shape)} in "
                                f"{_describe(node.args[having[0]], by_node)} but {list(other.shape)} in "
                                f"{_describe(node.args[i], by_node)}")
        step.table[key] = first
        if not is_float(first.dtype):
            step.take[key] = having[0]  # integer buffers are copied, never averaged
            continue
        if not union:
            absent = [i for i in dense if key not in inputs[i].table]
            if absent:
                if options.allow_missing and step.space == DELTA:
                    # a difference of weights one side lacks is no difference: passing the other
                    # side's whole weight on as a "delta" would add it to the base a second time
                    del step.table[key]
                elif options.allow_missing:
                    step.take[key] = having[0]
                else:
                    missing.append((key, absent[0]))
    if not union and not options.allow_missing:
        # a delta for a key the architecture marks optional (the last CLIP layer, which
        # exporters drop) changes nothing that exists: not worth an error
        extra = {k for i, s in enumerate(inputs) if i not in dense for k in s.table
                 if k not in keys and k not in optional}
        if extra:
            sample = ", ".join(f"'{k}'" for k in sorted(extra)[:3])
            raise PlanError(f"{method.name}: a delta input has {len(extra)} key(s) the weights do not "
                            f"have (e.g. {sample}); use --allow-missing to ignore them")
    if missing:
        sample = "; ".join(f"'{k}' is missing from {_describe(node.args[i], by_node)}" for k, i in missing[:3])
        raise PlanError(f"{method.name}: {len(missing)} key(s) are not in every input ({sample}); "
                        f"use --allow-missing (the first input that has a key wins) or fallback()")
