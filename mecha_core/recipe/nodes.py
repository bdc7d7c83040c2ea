"""Recipe graph nodes. A recipe is a DAG of these; building one never touches the disk.

Recipes are plain data: nothing here consults the plugin host. What needs plugin knowledge (a
method's name, an architecture's aliases, a plugin model type's merge space) is resolved by the
readers from the host they are given (``format.load_v1``, a plugin recipe format's reader) or left
for the planner.

Every graph operation here is iterative (hashing, equality, merge spaces, walks, rewrites), so
a chain of 10^5 steps never hits Python's recursion limit.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Callable, Iterator

import attrs

from ..errors import MergeSpaceError, RecipeError
from ..specs import DELTA, MERGE_SPACES, WEIGHT
from .values import WeightMap, check_int64, format_value

if TYPE_CHECKING:
    from ..method import MergeMethod

_SCALARS = (bool, int, float, str, type(None))


@attrs.frozen
class Location:
    """Where a node was written in a recipe file, for errors found later (when planning)."""

    file: str | None
    """The recipe file as it was given; ``None`` for recipe text not read from a file."""
    line: int
    """The line, from 1."""
    column: int
    """The column, from 1."""

    def __str__(self) -> str:
        return f"{self.file or '<recipe>'}:{self.line}:{self.column}"


def located(message: str, where: Location | None, cls: type[RecipeError] = RecipeError) -> RecipeError:
    """A recipe error pointing at ``where`` (``FILE:LINE:COL: message``), or unplaced."""
    if where is None:
        return cls(message)
    return cls(message, source=where.file, line=where.line, column=where.column)


# -- the core's operators ---------------------------------------------------------------------
# ``a - b``, ``a + b``, ``a * x`` and ``a | b`` build calls of the core's own methods, defined in
# mecha_core/operators.py. That module imports method.py, which imports this one (a method call
# builds a CallNode), so importing the operators here would be a cycle. Instead operators.py
# hands them over when it is imported (mecha_core/__init__ imports it, so they are set before
# any recipe can be built): the dependency stays one-way, and no plugin host is involved.
_OPERATORS: dict[str, "MergeMethod"] = {}


def set_core_operators(*methods: "MergeMethod") -> None:
    """Called by mecha_core.operators: the methods ``-``, ``+``, ``*`` and ``|`` build."""
    for m in methods:
        _OPERATORS[m.name] = m


def core_operators() -> dict[str, "MergeMethod"]:
    """The core's operator methods by name (``subtract``, ``add``, ``scale``, ``fallback``)."""
    return dict(_OPERATORS)


class Node:
    """Base of every recipe node. Arithmetic builds method calls (see docs/recipe-format.md)."""

    @staticmethod
    def _method(name: str) -> "MergeMethod":
        found = _OPERATORS.get(name)
        if found is None:  # only when mecha_core.operators was never imported
            raise RecipeError(f"the core operator '{name}' is not loaded; import mecha_core first")
        return found

    def __sub__(self, other: Any) -> "CallNode":
        """``a - b`` is ``subtract(a, b)``: the delta from b to a."""
        return call(self._method("subtract"), (self, other), {})

    def __add__(self, other: Any) -> "CallNode":
        """``a + b`` is ``add(a, b)``: a delta added to weights (or two deltas summed)."""
        return call(self._method("add"), (self, other), {})

    def __mul__(self, alpha: Any) -> "CallNode":
        """``a * 0.5`` is ``scale(a, alpha=0.5)``."""
        return call(self._method("scale"), (self,), {"alpha": alpha})

    __rmul__ = __mul__

    def __or__(self, other: Any) -> "CallNode":
        """``a | b`` is ``fallback(a, b)``: a's value where a has the key, else b's."""
        return call(self._method("fallback"), (self, other), {})

    @property
    def space(self) -> str | None:
        """The node's merge space when known without reading files, else ``None``."""
        return None


#: which keys outside the layers a layer view keeps (see :class:`LayerView`)
OUTSIDE = ("all", "none", "before", "after")


@attrs.frozen
class LayerView:
    """A model's layers ``start:stop`` seen as the layers ``at ... at + (stop - start) - 1`` of a
    stack of ``total`` layers (layer stacking, "frankenmerges"): ``model("b", layers="8:16",
    at=24, of=40)``. Nothing else changes: a layer keeps its tensors, only its number does."""

    start: int
    """The model's first layer the view takes (from 0)."""
    stop: int
    """One past the model's last layer the view takes."""
    at: int = 0
    """The number the first of them gets in the output."""
    total: int | None = None
    """The output's layer count (its architecture's, and config.json's ``num_hidden_layers``);
    ``None``: ``at + stop - start`` (the view ends the stack)."""
    outside: str = "all"
    """Which keys outside the layers the view keeps: ``all``, ``none``, ``before`` (the ones
    before the layers: embeddings) or ``after`` (the rest: final norm, LM head). Joining views
    with ``|`` takes each key from the first view that has it."""

    def __attrs_post_init__(self) -> None:
        if not 0 <= self.start < self.stop:
            raise RecipeError(f"model(..., layers=\"{self.start}:{self.stop}\"): the range must be "
                              f"START:STOP with 0 <= START < STOP")
        if self.at < 0 or self.stop - self.start + self.at > self.count:
            raise RecipeError(f"model(..., at={self.at}, of={self.count}): layers {self.start}:{self.stop} "
                              f"do not fit in a stack of {self.count} layers at {self.at}")
        if self.outside not in OUTSIDE:
            raise RecipeError(f"model(..., outside={self.outside!r}): must be one of {', '.join(OUTSIDE)}")

    @property
    def count(self) -> int:
        """The output's layer count."""
        return self.total if self.total is not None else self.at + self.stop - self.start

    @staticmethod
    def parse(text: str, at: int = 0, total: int | None = None, outside: str = "all") -> "LayerView":
        """``"8:16"`` (and the other fields) as a view; a one-line error when malformed."""
        found = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text) if isinstance(text, str) else None
        if found is None:
            raise RecipeError(f"model(..., layers={text!r}): must be \"START:STOP\" (layers START to "
                              f"STOP - 1, from 0)")
        for name, value in (("at", at), ("of", total)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise RecipeError(f"model(..., {name}=...) must be a whole number, got {value!r}")
        return LayerView(int(found.group(1)), int(found.group(2)), at, total, outside)

    def text(self) -> str:
        """The ``layers=`` text: ``"START:STOP"``."""
        return f"{self.start}:{self.stop}"


# Nodes are immutable and compared structurally; hashes are cached because recipes share
# sub-results, and an uncached hash of a DAG recomputes every shared branch.
@attrs.frozen(eq=True, cache_hash=True)
class ModelNode(Node):
    """A model file input. Its keys and merge space are read when the merge is planned."""

    path: str
    """As written: absolute, or relative to the models directory / the recipe's folder."""
    arch: str | None = None
    """The architecture as written (an alias is resolved when the merge is planned), when given;
    else detected from the header."""
    type: str | None = None
    """The model type (``base``, ``delta``, a LoRA type ...), when given; else detected."""
    keep_vocab: bool = False
    """The output keeps this model's vocabulary (its rows of the token embeddings and LM head,
    and its tokenizer files): inputs with other vocabulary sizes are cut or filled to it."""
    vocab: str | None = None
    """A vocabulary map (a JSON file, :mod:`mecha_core.engine.vocab`): this model's rows of the
    vocabulary keys are gathered into another vocabulary (a merged tokenizer's) as the map says,
    and the output takes the tokenizer files the map names."""
    layers: LayerView | None = None
    """Only these layers, renumbered (layer stacking); ``None``: the whole model."""
    base_dir: str | None = attrs.field(default=None, eq=False, repr=False)
    """The folder of the recipe file this came from (relative paths are also looked up there)."""
    where: Location | None = attrs.field(default=None, eq=False, hash=False, repr=False)
    """Where it was written, for errors found when it is opened; ``None`` when built in Python."""

    @property
    def space(self) -> str | None:
        """``weight`` for ``type="base"``, ``delta`` for ``type="delta"``; a plugin model type's
        space is not known here (recipes do not consult plugins): ``None`` until planned."""
        if self.type == "base":
            return WEIGHT
        if self.type == "delta":
            return DELTA
        return None


def _literal_key(value: Any) -> str:
    # Two literals are equal when they print the same: 1, 1.0 and true stay distinct (Python
    # says 1 == 1.0 == True), so equal graphs always print the same bytes.
    return format_value(value)


@attrs.frozen(eq=True, cache_hash=True)
class LiteralNode(Node):
    """A hyperparameter value: a scalar, a string, or a block/class map."""

    value: bool | int | float | str | None | WeightMap | tuple = attrs.field(eq=_literal_key)
    """The value (a tuple holds numbers, e.g. per-input weights)."""
    where: Location | None = attrs.field(default=None, eq=False, hash=False, repr=False)
    """Where the value was written; ``None`` when built in Python."""


@attrs.frozen(eq=True, cache_hash=True)
class ParameterNode(Node):
    """A named hole in a template, filled by ``compose`` (or ``mecha merge -p``)."""

    name: str
    """The parameter's name."""
    space: str | None = None  # type: ignore[assignment]
    """The merge space a fill must be in, when declared."""
    where: Location | None = attrs.field(default=None, eq=False, hash=False, repr=False)
    """Where it was declared; ``None`` when built in Python."""


def _children(node: "CallNode") -> list[Node]:
    return [*node.args, *(v for _, v in node.kwargs)]


def _missing_below(root: "CallNode", missing: Callable[["CallNode"], bool]) -> list["CallNode"]:
    """The calls at or below ``root`` for which ``missing`` holds, inputs before their users,
    found without recursion (a memo is then filled bottom-up, each step one level deep)."""
    out: list[CallNode] = []
    seen: set[int] = {id(root)}
    stack: list[tuple[CallNode, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            out.append(node)
            continue
        stack.append((node, True))
        for child in reversed(_children(node)):
            if isinstance(child, CallNode) and id(child) not in seen and missing(child):
                seen.add(id(child))
                stack.append((child, False))
    return out


@attrs.frozen(eq=False)
class CallNode(Node):
    """A merge method applied to inputs, with hyperparameters."""

    method: "MergeMethod"
    """The method (compared by name)."""
    args: tuple[Node, ...]
    """Input nodes, in order."""
    kwargs: tuple[tuple[str, Node], ...]
    """Hyperparameters given explicitly, sorted by name (each a literal or a parameter)."""
    where: Location | None = attrs.field(default=None, kw_only=True, repr=False)
    """Where the call was written (its method name); ``None`` when built in Python. Not part of
    the node's identity: equal calls written on two lines are one node."""

    _space_memo: tuple | None = attrs.field(default=None, init=False, repr=False)
    _hash_memo: int | None = attrs.field(default=None, init=False, repr=False)

    # Structural equality and hashing, computed bottom-up without recursion (attrs' generated
    # ones recurse through the inputs: a deep chain would exceed Python's stack).
    def __hash__(self) -> int:
        h = self._hash_memo
        if h is None:
            ready = all(not isinstance(c, CallNode) or c._hash_memo is not None for c in self.args)
            for node in [self] if ready else _missing_below(self, lambda n: n._hash_memo is None):
                object.__setattr__(node, "_hash_memo", hash((
                    "CallNode", node.method, tuple(hash(a) for a in node.args),
                    tuple((k, hash(v)) for k, v in node.kwargs))))
            h = self._hash_memo
        return h  # type: ignore[return-value]

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, CallNode):
            return NotImplemented
        return _same_graph(self, other)

    def __ne__(self, other: object) -> bool:
        result = self.__eq__(other)
        return result if result is NotImplemented else not result

    def __repr__(self) -> str:  # bounded: a deep chain prints its top only
        args = ", ".join(f"CallNode({a.method.name!r}, ...)" if isinstance(a, CallNode) else repr(a)
                         for a in self.args)
        kwargs = ", ".join(f"{k}={v!r}" for k, v in self.kwargs)
        return f"CallNode({self.method.name!r}, args=({args}), kwargs=({kwargs}))"

    @property
    def space(self) -> str | None:
        # Remembered, and filled bottom-up: a deep chain would otherwise recompute every
        # input's space at every level, and recurse as deep as the chain.
        memo = self._space_memo
        if memo is None:
            ready = all(not isinstance(c, CallNode) or c._space_memo is not None for c in self.args)
            for node in [self] if ready else _missing_below(self, lambda n: n._space_memo is None):
                object.__setattr__(node, "_space_memo", (node.method.result_space(
                    [a.space for a in node.args], origins=[origin(a) for a in node.args]),))
            memo = self._space_memo
        return memo[0]  # type: ignore[index]


def _same_graph(left: CallNode, right: CallNode) -> bool:
    """Structural equality of two recipe graphs, pair by pair without recursion; each pair of
    nodes is compared once, so shared sub-results cost nothing more."""
    compared: set[tuple[int, int]] = set()
    stack: list[tuple[Node, Node]] = [(left, right)]
    while stack:
        a, b = stack.pop()
        if a is b or (id(a), id(b)) in compared:
            continue
        compared.add((id(a), id(b)))
        if not (isinstance(a, CallNode) and isinstance(b, CallNode)):
            if isinstance(a, CallNode) or isinstance(b, CallNode) or a != b:
                return False
            continue
        if hash(a) != hash(b) or a.method != b.method or len(a.args) != len(b.args) \
                or [k for k, _ in a.kwargs] != [k for k, _ in b.kwargs]:
            return False
        stack.extend(zip(a.args, b.args))
        stack.extend((v, w) for (_, v), (_, w) in zip(a.kwargs, b.kwargs))
    return True


def origin(node: Node) -> str:
    """Where a node's value comes from, for messages: a method's name, a file's name, a parameter."""
    if isinstance(node, CallNode):
        return node.method.name
    if isinstance(node, ModelNode):
        return os.path.basename(node.path)
    if isinstance(node, ParameterNode):
        return f"parameter '{node.name}'"
    return ""


def _as_input(value: Any, method: "MergeMethod", position: int, where: Location | None) -> Node:
    if isinstance(value, Node) and not isinstance(value, LiteralNode):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ModelNode(os.fspath(value))
    raise located(f"{method.name}: input {position + 1} must be a model or a recipe, got {value!r}", where)


def _check_literal(node: LiteralNode, prefix: str) -> None:
    """Values every hyperparameter refuses: NaN, and integers beyond 64 bits (no tensor or
    method argument can hold them; they would fail mid-merge)."""
    value = node.value
    if isinstance(value, float) and value != value:
        raise located(f"{prefix}NaN is not a valid hyperparameter value", node.where)
    numbers = value if isinstance(value, tuple) else (value,)
    for v in numbers:
        try:
            check_int64(v, "an integer hyperparameter")
        except RecipeError as exc:
            raise located(f"{prefix}{exc}", node.where) from None


def as_literal(value: Any, *, where: str = "") -> Node:
    """Wrap a hyperparameter value as a node (scalars, strings, block maps, parameters).

    ``where`` prefixes error messages (``method(name=...): ``). NaN and integers beyond int64
    are refused; a literal parsed from text points at its own line and column.
    """
    if isinstance(value, ParameterNode):
        return value
    if isinstance(value, LiteralNode):
        _check_literal(value, where)
        return value
    if isinstance(value, _SCALARS) or isinstance(value, WeightMap):
        node = LiteralNode(value)
    elif isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        node = LiteralNode(tuple(value))  # per-input weights, e.g. multislerp(weights=[...])
    else:
        raise RecipeError(f"{where}hyperparameter must be a number, string, bool or block map, got {value!r}")
    _check_literal(node, where)
    return node


_KIND_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def check_hyper(method: "MergeMethod", name: str, node: Node) -> None:
    """A literal must suit the hyperparameter's annotated kind (``None`` kind: anything) and,
    for a hyperparameter with fixed choices (``typing.Literal``), be one of them."""
    if not isinstance(node, LiteralNode):
        return  # a parameter: checked when it is filled
    hyper = method.hyperparameter(name)
    kind, value = hyper.kind, node.value
    if value is None and hyper.default is None:
        return
    if kind is not None:
        if kind is float:
            ok = isinstance(value, (int, float, WeightMap)) and not isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, (int, WeightMap)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, kind)
        if not ok:
            what = _KIND_WORDS.get(kind, kind.__name__)
            extra = " or a blocks()/classes() map" if kind in (float, int) else ""
            raise RecipeError(f"{method.name}({name}=...) expects {what}{extra}, got {format_value(value)}")
    choices = getattr(hyper, "choices", None)
    if choices is not None and value not in choices:
        listed = ", ".join(format_value(c) for c in choices)
        try:
            shown = format_value(value)[:80]
        except RecipeError:  # a string no recipe can hold (a lone surrogate)
            shown = ascii(value)[:80]
        raise located(f"{method.name}({name}={shown}): use one of {listed}", node.where)


def call(method: "MergeMethod", args: tuple[Any, ...], kwargs: dict[str, Any], *,
         where: Location | None = None) -> CallNode:
    """Build a CallNode, checking arity, keyword names, hyperparameter values and known merge
    spaces. ``where``: the call's place in a recipe file (errors about a value parsed from
    text point at the value itself)."""
    method.bind(len(args), list(kwargs))
    inputs = tuple(_as_input(a, method, i, where) for i, a in enumerate(args))
    hypers = tuple(sorted((k, as_literal(v, where=f"{method.name}({k}=...): ")) for k, v in kwargs.items()))
    for k, v in hypers:
        check_hyper(method, k, v)
    node = CallNode(method, inputs, hypers, where=where)
    _ = node.space  # raises MergeSpaceError on known spaces that do not fit
    return node


def model(path: str | os.PathLike[str], arch: str | None = None, type: str | None = None, *,
          keep_vocab: bool = False, vocab: str | os.PathLike[str] | None = None, layers: str | None = None,
          at: int = 0, of: int | None = None, outside: str = "all") -> ModelNode:
    """A model input. Nothing is read until the merge is planned. ``keep_vocab=True``: the output
    keeps this model's vocabulary (and tokenizer) when the inputs' vocabularies differ.
    ``layers="8:16"``: only the model's layers 8 to 15, numbered from ``at`` in a stack of ``of``
    layers, with the keys outside the layers that ``outside`` names (:class:`LayerView`)."""
    if not isinstance(keep_vocab, bool):
        raise RecipeError(f"model(..., keep_vocab=...) must be true or false, got {keep_vocab!r}")
    return ModelNode(os.fspath(path), arch, type, keep_vocab, None if vocab is None else os.fspath(vocab),
                     layer_view(layers, at, of, outside))


def layer_view(layers: str | None, at: int = 0, of: int | None = None, outside: str = "all") -> LayerView | None:
    """``model()``'s ``layers=``, ``at=``, ``of=`` and ``outside=`` as a :class:`LayerView`
    (``None`` without ``layers``)."""
    if layers is not None:
        return LayerView.parse(layers, at, of, outside)
    if at != 0 or of is not None or outside != "all":
        raise RecipeError("model(..., at=/of=/outside=) go with layers=\"START:STOP\"")
    return None


def literal(value: Any) -> Node:
    """A literal hyperparameter value."""
    return as_literal(value)


def parameter(name: str, space: str | None = None, *, where: Location | None = None) -> ParameterNode:
    """A named hole in a template recipe; ``space`` optionally constrains what may fill it."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise RecipeError(f"parameter name {name!r} must be a name (letters, digits and _, not "
                          f"starting with a digit)")
    if space is not None and space not in MERGE_SPACES:
        raise RecipeError(f"unknown merge space {space!r}; use one of {', '.join(MERGE_SPACES)}")
    return ParameterNode(name, space, where=where)


def walk(root: Node) -> Iterator[Node]:
    """Every node reachable from ``root``, each once, inputs before the nodes that use them."""
    # deduplicate equal nodes (structurally identical sub-recipes are one node)
    unique: dict[Node, None] = {}
    for node in _reachable(root):
        unique.setdefault(node, None)
    return iter(unique)


def _reachable(root: Node) -> list[Node]:
    """Every node object reachable from ``root``, each once (by identity), inputs first."""
    seen: set[int] = set()
    order: list[Node] = []
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            if id(node) not in seen:
                seen.add(id(node))
                order.append(node)
            continue
        if id(node) in seen:
            continue
        stack.append((node, True))
        if isinstance(node, CallNode):
            for child in reversed(_children(node)):
                if id(child) not in seen:
                    stack.append((child, False))
    return order


def parameters(root: Node) -> list[ParameterNode]:
    """The parameters (unfilled holes) of a recipe, in order of first appearance."""
    return [n for n in walk(root) if isinstance(n, ParameterNode)]


def check_parameters(root: Node) -> None:
    """One name, one parameter: two declarations of a name with different merge spaces, or a
    name used both as a method's input and as a hyperparameter, could never be filled (a fill is
    either a recipe or a value), so they are refused when the recipe is built."""
    clash = parameter_clash(root)
    if clash is not None:
        raise RecipeError(clash[1])


def parameter_clash(root: Node) -> tuple[str, str] | None:
    """The first parameter :func:`check_parameters` refuses, as (name, why), or ``None``."""
    spaces: dict[str, set[str | None]] = {}
    as_input: set[str] = set()
    as_hyper: set[str] = set()
    for node in _reachable(root):  # equal nodes need not be merged: the sets below do that
        if isinstance(node, ParameterNode):
            spaces.setdefault(node.name, set()).add(node.space)
        elif isinstance(node, CallNode):
            as_input.update(a.name for a in node.args if isinstance(a, ParameterNode))
            as_hyper.update(v.name for _, v in node.kwargs if isinstance(v, ParameterNode))
    for name, found in spaces.items():
        if len(found) > 1:
            listed = " and ".join(sorted(str(s or "no space") for s in found))
            return name, f"parameter '{name}' is declared twice, with different merge spaces ({listed}); rename one"
    both = sorted(as_input & as_hyper)
    if both:
        return both[0], (f"parameter '{both[0]}' is both a method's input and a hyperparameter; "
                         f"no fill can be both, rename one")
    return None


def _rebuild(root: Node, leaf: Callable[[Node], Node], rebuild_call: Callable[[CallNode, Callable[[Node], Node]], Node],
             key: Callable[[Node], Any]) -> Node:
    """Rewrite a graph bottom-up without recursion: ``leaf`` maps a non-call node, and
    ``rebuild_call(node, done)`` a call whose inputs are rewritten already (``done(child)`` gives
    a child's rewrite). Each node (by ``key``) is rewritten once; inputs are visited left to
    right, depth first, so errors come in the order a recursive rewrite would raise them."""
    memo: dict[Any, Node] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        k = key(node)
        if k in memo:
            continue
        if isinstance(node, CallNode):
            if not expanded:
                stack.append((node, True))
                for child in reversed(_children(node)):
                    if key(child) not in memo:
                        stack.append((child, False))
                continue
            memo[k] = rebuild_call(node, lambda child: memo[key(child)])
        else:
            memo[k] = leaf(node)
    return memo[key(root)]


def substitute(root: Node, fills: dict[str, Node]) -> Node:
    """A copy of ``root`` with parameters replaced by ``fills`` (unknown names stay holes)."""

    def leaf(node: Node) -> Node:
        return fills[node.name] if isinstance(node, ParameterNode) and node.name in fills else node

    def input_fill(param: Node, out: Node) -> Node:
        if not isinstance(param, ParameterNode) or param.name not in fills:
            return out
        if isinstance(out, LiteralNode):
            raise RecipeError(f"parameter '{param.name}' is an input of a method; fill it with a "
                              f"model or a recipe, not {format_value(out.value)}")
        if param.space is not None and out.space is not None and out.space != param.space:
            raise MergeSpaceError(f"parameter '{param.name}' expects {param.space} space; the fill is {out.space}")
        return out

    def rebuild_call(node: CallNode, done: Callable[[Node], Node]) -> Node:
        args = tuple(input_fill(a, done(a)) for a in node.args)
        kwargs = tuple((k, hyper(node, k, v)) for k, v in node.kwargs)
        out = attrs.evolve(node, args=args, kwargs=kwargs)
        _ = out.space  # raises MergeSpaceError when a fill's space does not fit
        return out

    def hyper(owner: CallNode, name: str, value: Node) -> Node:
        if not (isinstance(value, ParameterNode) and value.name in fills):
            return value
        fill = fills[value.name]
        if not isinstance(fill, (LiteralNode, ParameterNode)):
            raise RecipeError(f"parameter '{value.name}' is {owner.method.name}'s hyperparameter "
                              f"'{name}'; fill it with a value (a number, string or block map), "
                              f"not a model or recipe")
        check_hyper(owner.method, name, fill)
        return fill

    return input_fill(root, _rebuild(root, leaf, rebuild_call, key=lambda n: n))


def replace_models(root: Node, change: Callable[[ModelNode], Node]) -> Node:
    """A copy of ``root`` with every model node ``m`` replaced by ``change(m)``."""

    def leaf(node: Node) -> Node:
        return change(node) if isinstance(node, ModelNode) else node

    def rebuild_call(node: CallNode, done: Callable[[Node], Node]) -> Node:
        return attrs.evolve(node, args=tuple(done(a) for a in node.args))

    return _rebuild(root, leaf, rebuild_call, key=id)


def canonical_map_archs(root: Node, canonical: Callable[[str], str]) -> Node:
    """A copy of ``root`` whose block/class maps name architectures by ``canonical(name)``.

    Maps built in Python keep the architecture as written (``blocks("sd1", ...)``); the planner
    passes ``lambda name: host.architecture(name).name`` so an alias and the architecture's own
    name become one value (and print as the recipe format reader would read them back).
    """

    def fix(value: Node) -> Node:
        if not (isinstance(value, LiteralNode) and isinstance(value.value, WeightMap)):
            return value
        renamed = value.value.with_archs(canonical)
        return value if renamed == value.value else attrs.evolve(value, value=renamed)

    def rebuild_call(node: CallNode, done: Callable[[Node], Node]) -> Node:
        args = tuple(done(a) for a in node.args)
        kwargs = tuple((k, fix(v)) for k, v in node.kwargs)
        if all(x is y for x, y in zip(args, node.args)) and all(x[1] is y[1] for x, y in zip(kwargs, node.kwargs)):
            return node
        return attrs.evolve(node, args=args, kwargs=kwargs)

    return _rebuild(root, lambda n: n, rebuild_call, key=id)


def relocate(root: Node, folder: str) -> Node:
    """Rewrite relative model paths found beside their recipe so they hold from ``folder``.

    Used when a composed recipe is written elsewhere than its parts: a path that named a file
    relative to the recipe it came from (``ModelNode.base_dir``) is rewritten relative to
    ``folder``. Paths not found there are left as written (they are meant for --models-dir).
    """
    folder = os.path.abspath(folder)

    def change(node: ModelNode) -> ModelNode:
        raw = os.path.expanduser(node.path)
        if os.path.isabs(raw) or node.base_dir is None:
            return node
        full = os.path.join(node.base_dir, raw)
        if not (os.path.exists(full) or (not os.path.splitext(raw)[1] and os.path.exists(full + ".safetensors"))):
            return node
        try:
            new = os.path.relpath(full, folder)
        except ValueError:  # another drive (Windows): only an absolute path works
            new = os.path.abspath(full)
        return attrs.evolve(node, path=new.replace(os.sep, "/"), base_dir=folder)

    return replace_models(root, change)
