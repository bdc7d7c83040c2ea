"""Hyperparameter values that vary over an architecture's blocks, classes or layers.

``blocks("sd1-ldm", default=0.3, IN02=0.75)`` gives every key of block IN02 the value 0.75 and
every other key 0.3. ``classes(...)`` does the same by layer type. ``layers("llama", [0, 0.5, 1],
self_attn=[0, 1], mlp=0.3)`` is a layer gradient as mergekit writes it: a list of anchors spread
evenly over the layers and linearly interpolated, per class filter, keys outside the layers taking
the first anchor. Maps of one architecture
combine with ``|``: for a key, the left map's entries win when one matches the key, then the
right map's entries, then the left map's default (or, where the left has none, the right's),
then the method's default. A key that an architecture lists in several blocks takes the mean of
one map's entries for them. docs/recipe-format.md has the full rules.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import attrs

from ..errors import RecipeError

Scalar = bool | int | float | str | None

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def check_int64(value: Any, what: str) -> None:
    """Integers must fit int64 (what a tensor or a method argument can hold)."""
    if isinstance(value, int) and not isinstance(value, bool) and not INT64_MIN <= value <= INT64_MAX:
        text = str(value) if abs(value) < 10 ** 40 else f"an integer of {len(str(abs(value)))} digits"
        raise RecipeError(f"{what} must fit in 64 bits (at most {INT64_MAX}), got {text}")


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{what} must be a number, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise RecipeError(f"{what} must be a number, got NaN")
    check_int64(value, what)
    return value


def _entries(values: dict[str, Any], gradients: bool = False) -> tuple[tuple[str, Any], ...]:
    out = []
    for name, value in values.items():
        if not _IDENT.fullmatch(name):
            raise RecipeError(f"block/class name {name!r} must be a name (letters, digits, _)")
        what = f"block/class value for '{name}'"
        out.append((name, _gradient(value, what) if gradients else _number(value, what)))
    return tuple(sorted(out))


def _gradient(value: Any, what: str) -> int | float | tuple[int | float, ...]:
    """A number, or a list of anchor numbers (a gradient over the layers)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise RecipeError(f"{what} must be a number or a non-empty list of numbers, got []")
        return tuple(_number(v, what) for v in value)
    return _number(value, what)


def gradient_at(value: Any, t: float) -> Any:
    """A gradient's value at ``t`` in [0, 1], as mergekit computes it: the anchors sit at
    ``i / (len - 1)`` and ``t`` falls between two of them, linearly interpolated. A number is the
    same everywhere."""
    if not isinstance(value, tuple):
        return value
    scaled = t * (len(value) - 1)
    i0 = int(scaled)
    i1 = min(len(value) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * value[i0] + frac * value[i1]


def layer_position(index: int | None, count: int) -> float:
    """Where layer ``index`` of ``count`` sits on a gradient (mergekit: ``index / (count - 1)``, a
    single layer at 1); keys outside the layers (embeddings, final norm, head) sit at 0."""
    if index is None:
        return 0.0
    return index / (count - 1) if count > 1 else 1.0


def class_matches(entry: str, key_class: str | None) -> bool:
    """Whether a layers() filter names a key's class: whole ``_``-separated parts of it, as
    mergekit's filters are parts of a tensor name (``self_attn`` and ``q_proj`` both cover
    ``self_attn_q_proj``; ``attn`` does not)."""
    return key_class is not None and f"_{entry}_" in f"_{key_class}_"


@attrs.frozen(eq=False, repr=False)
class WeightMap:
    """A per-block or per-class hyperparameter value over one architecture."""

    arch: str
    """The architecture whose blocks or classes are named."""
    kind: str
    """``blocks``, ``classes`` or ``layers`` (a gradient over the architecture's layers)."""
    entries: tuple[tuple[str, Any], ...]
    """``(name, value)`` pairs, sorted by name; in a ``layers`` map, a name is a class filter and
    a value a number or a tuple of gradient anchors."""
    default: Any = None
    """The value for keys no entry matches (a ``layers`` map's may be a gradient); ``None``: the
    method's default."""
    gradient: Any = None
    """A ``layers`` map's own gradient (its positional argument): the value of the layers' keys no
    filter matches, and, when the map has no ``default``, of every other key (at the gradient's
    start, as in mergekit); ``None`` for the other kinds."""
    then: "WeightMap | None" = None
    """The map consulted next (built by ``|``)."""

    # Equality, hashing and printing walk the ``then`` chain in a loop (attrs' generated ones
    # recurse through it, one level per map).
    def _parts(self) -> tuple[tuple[str, str, tuple, float | None], ...]:
        return tuple((m.arch, m.kind, m.entries, m.default, m.gradient) for m in self.chain())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, WeightMap):
            return NotImplemented
        return self._parts() == other._parts()

    def __ne__(self, other: object) -> bool:
        return not self == other if isinstance(other, WeightMap) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._parts())

    def __repr__(self) -> str:
        return f"WeightMap({format_value(self)})"

    def __or__(self, other: "WeightMap") -> "WeightMap":
        if not isinstance(other, WeightMap):
            return NotImplemented
        return join_maps([self, other])

    def chain(self) -> list["WeightMap"]:
        """The maps of the chain, in order, each without its ``then``."""
        out, node = [], self
        while node is not None:
            out.append(attrs.evolve(node, then=None) if node.then is not None else node)
            node = node.then
        return out

    def with_archs(self, canonical: Any) -> "WeightMap":
        """The same chain with every architecture name replaced by ``canonical(name)``."""
        return join_maps([attrs.evolve(m, arch=canonical(m.arch)) for m in self.chain()])

    def resolve(self, key_blocks: tuple[str, ...], key_class: str | None, method_default: Any,
                position: float | None = None) -> Any:
        """The value for one key, given the key's blocks and class (and, for ``layers`` maps,
        its place on the gradient, :func:`layer_position`; ``None`` for a key in no layer)."""
        chain = self.chain()
        at = 0.0 if position is None else position  # keys outside the layers: the gradient's start
        for m in chain:
            if m.kind == "layers":  # the most specific filter wins (mlp_gate_proj over mlp)
                named = [(len(name), name, v) for name, v in m.entries if class_matches(name, key_class)]
                if named:  # the longest; of equal lengths, the first by name (entries are sorted)
                    return gradient_at(max(named, key=lambda e: (e[0], [-ord(c) for c in e[1]]))[2], at)
                if m.gradient is not None and position is not None:
                    return gradient_at(m.gradient, at)
                continue
            wanted = key_blocks if m.kind == "blocks" else ((key_class,) if key_class else ())
            values = [v for name, v in m.entries if name in wanted]
            if values:
                return values[0] if len(values) == 1 else sum(values) / len(values)
        for m in chain:
            fallback = m.default if m.default is not None else m.gradient
            if fallback is not None:
                return gradient_at(fallback, at)
        return method_default


def join_maps(maps: list[WeightMap]) -> WeightMap:
    """``maps[0] | maps[1] | ...`` in one pass (a chain of n maps costs n, not n squared)."""
    parts = [m for whole in maps for m in whole.chain()]
    for m in parts[1:]:
        if m.arch != parts[0].arch:  # a key's blocks and class come from one architecture
            raise RecipeError(f"'|' joins maps of one architecture; got '{parts[0].arch}' and '{m.arch}'")
    out = None
    for m in reversed(parts):
        out = attrs.evolve(m, then=out)
    assert out is not None
    return out


def _make(kind: str, arch: Any, default: Any, values: dict[str, Any]) -> WeightMap:
    """The architecture stays as written: the recipe readers resolve an alias through the
    plugin host they are given, and the planner through its own (recipes consult no plugin)."""
    if not isinstance(arch, str) or not arch:
        raise RecipeError(f"{kind}() takes an architecture name first, got {arch!r}")
    if default is not None:
        default = _number(default, f"{kind}() default")
    return WeightMap(arch, kind, _entries(values), default)


def blocks(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A block-wise hyperparameter: ``blocks("sd1-ldm", default=0.3, IN02=0.75)``."""
    return _make("blocks", arch, default, values)


def classes(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A class-wise hyperparameter: ``classes("sd1-ldm", default=0.5, attn1_to_k=1.0)``."""
    return _make("classes", arch, default, values)


def layers(arch: str, gradient: Any = None, /, default: Any = None, **filters: Any) -> WeightMap:
    """A layer gradient, as mergekit writes one: ``layers("llama", [0, 0.5, 1])``, or per class
    filter ``layers("llama", self_attn=[0, 0.5, 0.3, 0.7, 1], mlp=[1, 0.5, 0.7, 0.3, 0], default=0.5)``.

    ``gradient`` (positional) covers the layers' keys no filter matches; ``default`` every key
    nothing else covers (``layers("llama", [0, 1], default=0.5)``: the embeddings, final norm and
    head get 0.5). Without ``default``, the gradient covers those keys too, at its start.

    A list's anchors are spread evenly over the architecture's layers (layer ``i`` of ``n`` sits at
    ``i / (n - 1)``) and linearly interpolated; a number is constant. A filter names whole
    ``_``-separated parts of classes (``self_attn`` and ``q_proj`` both cover ``self_attn_q_proj``);
    the longest one that matches a key wins (of equal lengths, the first by name), ``default``
    covers the rest. Keys outside the layers (embeddings, final
    norm, LM head) take the value at the gradient's start, as in mergekit."""
    if not isinstance(arch, str) or not arch:
        raise RecipeError(f"layers() takes an architecture name first, got {arch!r}")
    if default is not None:
        default = _gradient(default, "layers() default")
    if gradient is not None:
        gradient = _gradient(gradient, "layers() gradient")
    return WeightMap(arch, "layers", _entries(filters, gradients=True), default, gradient=gradient)


# -- canonical text of a value (the .mecha printer, and literal equality, use it) --------------
_UNSAFE_IN_LINE = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def format_string(text: str) -> str:
    """A double-quoted string with JSON escapes; never holds a character that ends a line."""
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: the recipe could not be stored in a merged file
        raise RecipeError(f"cannot write the string {ascii(text)[:80]} in a recipe (it is not valid "
                          f"Unicode: a lone surrogate)") from None
    out = json.dumps(text, ensure_ascii=False)
    for raw, escaped in _UNSAFE_IN_LINE.items():
        out = out.replace(raw, escaped)
    return out


def format_number(value: int | float) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if math.isnan(value):
            raise RecipeError("NaN cannot be written in a recipe")
        return repr(value)  # shortest text that reads back to the same float
    return str(value)


def format_value(value: Any) -> str:
    """The value as .mecha text: ``null``, ``true``, ``0.5``, ``"text"``, ``[1, 2]``, ``blocks(...)``."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, (int, float)):
        return format_number(value)
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    if isinstance(value, WeightMap):
        parts = []
        for m in value.chain():
            args = [format_string(m.arch)]
            if m.gradient is not None:
                args.append(format_value(m.gradient))
            if m.default is not None:
                args.append(f"default={format_value(m.default)}")
            args += [f"{name}={format_value(v)}" for name, v in m.entries]
            parts.append(f"{m.kind}({', '.join(args)})")
        return " | ".join(parts)
    raise RecipeError(f"cannot write {value!r} in a recipe")
