"""Recipe graph nodes. A recipe is a DAG of these; building one never touches the disk."""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any, Iterator

import attrs

from ..errors import RecipeError
from ..specs import DELTA, MERGE_SPACES, WEIGHT
from .values import WeightMap, format_value

if TYPE_CHECKING:
    from ..method import MergeMethod

_SCALARS = (bool, int, float, str, type(None))


class Node:
    """Base of every recipe node. Arithmetic builds method calls (see docs/recipe-format.md)."""

    def _method(self, name: str) -> "MergeMethod":
        from ..plugins import get_host

        return get_host().method(name)

    def __sub__(self, other: Any) -> "CallNode":
        """``a - b`` is ``subtract(a, b)``: the delta from b to a."""
        return self._method("subtract")(self, other)

    def __add__(self, other: Any) -> "CallNode":
        """``a + b`` is ``add(a, b)``: a delta added to weights (or two deltas summed)."""
        return self._method("add")(self, other)

    def __mul__(self, alpha: Any) -> "CallNode":
        """``a * 0.5`` is ``scale(a, alpha=0.5)``."""
        return self._method("scale")(self, alpha=alpha)

    __rmul__ = __mul__

    def __or__(self, other: Any) -> "CallNode":
        """``a | b`` is ``fallback(a, b)``: a's value where a has the key, else b's."""
        return self._method("fallback")(self, other)

    @property
    def space(self) -> str | None:
        """The node's merge space when known without reading files, else ``None``."""
        return None


# Nodes are immutable and compared structurally; hashes are cached because recipes share
# sub-results, and an uncached hash of a DAG recomputes every shared branch.
@attrs.frozen(eq=True, cache_hash=True)
class ModelNode(Node):
    """A model file input. Its keys and merge space are read when the merge is planned."""

    path: str
    """As written: absolute, or relative to the models directory / the recipe's folder."""
    arch: str | None = None
    """The architecture, when given; else detected from the header."""
    type: str | None = None
    """The model type (``base``, ``delta``, a LoRA type ...), when given; else detected."""
    base_dir: str | None = attrs.field(default=None, eq=False, repr=False)
    """The folder of the recipe file this came from (relative paths are also looked up there)."""
    where: str | None = attrs.field(default=None, eq=False, repr=False)
    """``recipe.mecha:LINE:COLUMN`` where it was written, for errors found when it is opened."""

    @property
    def space(self) -> str | None:
        if self.type == "base":
            return WEIGHT
        if self.type == "delta":
            return DELTA
        if self.type is not None:
            from ..plugins import get_host

            mt = get_host().model_types.get(self.type)
            return mt.space if mt is not None else None
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


@attrs.frozen(eq=True, cache_hash=True)
class ParameterNode(Node):
    """A named hole in a template, filled by ``compose`` (or ``mecha merge -p``)."""

    name: str
    """The parameter's name."""
    space: str | None = None  # type: ignore[assignment]
    """The merge space a fill must be in, when declared."""


@attrs.frozen(eq=True, cache_hash=True)
class CallNode(Node):
    """A merge method applied to inputs, with hyperparameters."""

    method: "MergeMethod"
    """The method (compared by name)."""
    args: tuple[Node, ...]
    """Input nodes, in order."""
    kwargs: tuple[tuple[str, Node], ...]
    """Hyperparameters given explicitly, sorted by name (each a literal or a parameter)."""

    _space_memo: tuple | None = attrs.field(default=None, init=False, eq=False, hash=False, repr=False)

    @property
    def space(self) -> str | None:
        # Remembered: a deep chain would otherwise recompute every input's space at every level.
        memo = self._space_memo
        if memo is None:
            memo = (self.method.result_space([a.space for a in self.args],
                                             origins=[origin(a) for a in self.args]),)
            object.__setattr__(self, "_space_memo", memo)
        return memo[0]


def origin(node: Node) -> str:
    """Where a node's value comes from, for messages: a method's name, a file's name, a parameter."""
    if isinstance(node, CallNode):
        return node.method.name
    if isinstance(node, ModelNode):
        return os.path.basename(node.path)
    if isinstance(node, ParameterNode):
        return f"parameter '{node.name}'"
    return ""


def _as_input(value: Any, method: "MergeMethod", position: int) -> Node:
    if isinstance(value, Node) and not isinstance(value, LiteralNode):
        return value
    if isinstance(value, (str, os.PathLike)):
        return ModelNode(os.fspath(value))
    raise RecipeError(f"{method.name}: input {position + 1} must be a model or a recipe, got {value!r}")


def as_literal(value: Any, *, where: str = "") -> Node:
    """Wrap a hyperparameter value as a node (scalars, strings, block maps, parameters)."""
    if isinstance(value, (LiteralNode, ParameterNode)):
        return value
    if isinstance(value, float) and value != value:
        raise RecipeError(f"{where}NaN is not a valid hyperparameter value")
    if isinstance(value, _SCALARS) or isinstance(value, WeightMap):
        return LiteralNode(value)
    if isinstance(value, (list, tuple)) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return LiteralNode(tuple(value))  # per-input weights, e.g. multislerp(weights=[...])
    raise RecipeError(f"{where}hyperparameter must be a number, string, bool or block map, got {value!r}")


_KIND_WORDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}


def _check_kind(method: "MergeMethod", name: str, node: Node) -> None:
    """A literal must suit the hyperparameter's annotated kind (``None`` kind: anything)."""
    if not isinstance(node, LiteralNode):
        return  # a parameter: checked when it is filled
    hyper = method.hyperparameter(name)
    kind, value = hyper.kind, node.value
    if kind is None or (value is None and hyper.default is None):
        return
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


def call(method: "MergeMethod", args: tuple[Any, ...], kwargs: dict[str, Any]) -> CallNode:
    """Build a CallNode, checking arity, keyword names, hyperparameter kinds and known merge spaces."""
    method.bind(len(args), list(kwargs))
    inputs = tuple(_as_input(a, method, i) for i, a in enumerate(args))
    hypers = tuple(sorted((k, as_literal(v, where=f"{method.name}({k}=...): ")) for k, v in kwargs.items()))
    for k, v in hypers:
        _check_kind(method, k, v)
    node = CallNode(method, inputs, hypers)
    node.space  # raises MergeSpaceError on known spaces that do not fit
    return node


def model(path: str | os.PathLike[str], arch: str | None = None, type: str | None = None) -> ModelNode:
    """A model input. Nothing is read until the merge is planned."""
    return ModelNode(os.fspath(path), arch, type)


def literal(value: Any) -> Node:
    """A literal hyperparameter value."""
    return as_literal(value)


def parameter(name: str, space: str | None = None) -> ParameterNode:
    """A named hole in a template recipe; ``space`` optionally constrains what may fill it."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise RecipeError(f"parameter name {name!r} must be a name (letters, digits and _, not "
                          f"starting with a digit)")
    if space is not None and space not in MERGE_SPACES:
        raise RecipeError(f"unknown merge space {space!r}; use one of {', '.join(MERGE_SPACES)}")
    return ParameterNode(name, space)


def walk(root: Node) -> Iterator[Node]:
    """Every node reachable from ``root``, each once, inputs before the nodes that use them."""
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
            children = [*node.args, *(v for _, v in node.kwargs)]
            for child in reversed(children):
                if id(child) not in seen:
                    stack.append((child, False))
    # deduplicate equal nodes (structurally identical sub-recipes are one node)
    unique: dict[Node, None] = {}
    for node in order:
        unique.setdefault(node, None)
    return iter(unique)


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
    for node in walk(root):
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


def substitute(root: Node, fills: dict[str, Node]) -> Node:
    """A copy of ``root`` with parameters replaced by ``fills`` (unknown names stay holes)."""
    memo: dict[Node, Node] = {}

    def visit(node: Node) -> Node:
        if node in memo:
            return memo[node]
        if isinstance(node, ParameterNode) and node.name in fills:
            out = fills[node.name]
            if isinstance(out, LiteralNode):
                raise RecipeError(f"parameter '{node.name}' is an input of a method; fill it with a "
                                  f"model or a recipe, not {format_value(out.value)}")
            if node.space is not None and out.space is not None and out.space != node.space:
                from ..errors import MergeSpaceError

                raise MergeSpaceError(
                    f"parameter '{node.name}' expects {node.space} space; the fill is {out.space}")
        elif isinstance(node, CallNode):
            args = tuple(visit(a) for a in node.args)
            kwargs = tuple((k, hyper(node, k, v)) for k, v in node.kwargs)
            out = CallNode(node.method, args, kwargs)
            out.space
        else:
            out = node
        memo[node] = out
        return out

    def hyper(owner: CallNode, name: str, value: Node) -> Node:
        if not (isinstance(value, ParameterNode) and value.name in fills):
            return value
        fill = fills[value.name]
        if not isinstance(fill, (LiteralNode, ParameterNode)):
            raise RecipeError(f"parameter '{value.name}' is {owner.method.name}'s hyperparameter "
                              f"'{name}'; fill it with a value (a number, string or block map), "
                              f"not a model or recipe")
        _check_kind(owner.method, name, fill)
        return fill

    return visit(root)


def replace_models(root: Node, change: "Any") -> Node:
    """A copy of ``root`` with every model node ``m`` replaced by ``change(m)``."""
    memo: dict[int, Node] = {}

    def visit(node: Node) -> Node:
        if id(node) in memo:
            return memo[id(node)]
        if isinstance(node, ModelNode):
            out = change(node)
        elif isinstance(node, CallNode):
            out = CallNode(node.method, tuple(visit(a) for a in node.args), node.kwargs)
        else:
            out = node
        memo[id(node)] = out
        return out

    return visit(root)


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
