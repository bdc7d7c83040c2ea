"""Hyperparameter values that vary over an architecture's blocks or classes.

``blocks("sd1-ldm", default=0.3, IN02=0.75)`` gives every key of block IN02 the value 0.75 and
every other key 0.3. ``classes(...)`` does the same by layer type. Maps of one architecture
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


def _number(value: Any, what: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{what} must be a number, got {value!r}")
    if isinstance(value, float) and math.isnan(value):
        raise RecipeError(f"{what} must be a number, got NaN")
    return value


def _entries(values: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    out = []
    for name, value in values.items():
        if not _IDENT.fullmatch(name):
            raise RecipeError(f"block/class name {name!r} must be a name (letters, digits, _)")
        out.append((name, _number(value, f"block/class value for '{name}'")))
    return tuple(sorted(out))


@attrs.frozen
class WeightMap:
    """A per-block or per-class hyperparameter value over one architecture."""

    arch: str
    """The architecture whose blocks or classes are named."""
    kind: str
    """``blocks`` or ``classes``."""
    entries: tuple[tuple[str, float], ...]
    """``(name, value)`` pairs, sorted by name."""
    default: float | None = None
    """The value for keys no entry matches; ``None``: the method's default."""
    then: "WeightMap | None" = None
    """The map consulted next (built by ``|``)."""

    def __or__(self, other: "WeightMap") -> "WeightMap":
        if not isinstance(other, WeightMap):
            return NotImplemented
        if other.arch != self.arch:  # a key's blocks and class come from one architecture
            raise RecipeError(f"'|' joins maps of one architecture; got '{self.arch}' and '{other.arch}'")
        if self.then is None:
            return attrs.evolve(self, then=other)
        return attrs.evolve(self, then=self.then | other)

    def chain(self) -> list["WeightMap"]:
        out, node = [], self
        while node is not None:
            out.append(attrs.evolve(node, then=None))
            node = node.then
        return out

    def resolve(self, key_blocks: tuple[str, ...], key_class: str | None, method_default: Any) -> Any:
        """The value for one key, given the key's blocks and class."""
        chain = self.chain()
        for m in chain:
            wanted = key_blocks if m.kind == "blocks" else ((key_class,) if key_class else ())
            values = [v for name, v in m.entries if name in wanted]
            if values:
                return values[0] if len(values) == 1 else sum(values) / len(values)
        for m in chain:
            if m.default is not None:
                return m.default
        return method_default


def _make(kind: str, arch: Any, default: Any, values: dict[str, Any]) -> WeightMap:
    if not isinstance(arch, str) or not arch:
        raise RecipeError(f"{kind}() takes an architecture name first, got {arch!r}")
    if default is not None:
        default = _number(default, f"{kind}() default")
    return WeightMap(_canonical_arch(arch), kind, _entries(values), default)


def _canonical_arch(name: str) -> str:
    """An installed architecture's own name for an alias (sd-mecha's ``sd1`` is ``sd1-ldm``), so
    maps written with either spelling are one value; unknown names stay as written (checked when
    the merge is planned)."""
    from ..plugins import get_host

    try:
        return get_host().architecture(name).name
    except RecipeError:
        return name


def blocks(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A block-wise hyperparameter: ``blocks("sd1-ldm", default=0.3, IN02=0.75)``."""
    return _make("blocks", arch, default, values)


def classes(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A class-wise hyperparameter: ``classes("sd1-ldm", default=0.5, attn1_to_k=1.0)``."""
    return _make("classes", arch, default, values)


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
            if m.default is not None:
                args.append(f"default={format_number(m.default)}")
            args += [f"{name}={format_number(v)}" for name, v in m.entries]
            parts.append(f"{m.kind}({', '.join(args)})")
        return " | ".join(parts)
    raise RecipeError(f"cannot write {value!r} in a recipe")
