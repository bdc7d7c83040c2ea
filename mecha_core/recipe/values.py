"""Hyperparameter values that vary over an architecture's blocks or classes.

``blocks("sd1-ldm", default=0.3, IN02=0.75)`` gives every key of block IN02 the value 0.75 and
every other key 0.3. ``classes(...)`` does the same by layer type. Maps combine with ``|``: for a
key, the left map's entries win when one matches the key, then the right map's entries, then the
left map's default (or, where the left has none, the right's). A key that belongs to several
blocks of one map (SD's ``time_embed``) takes the mean of their values.
"""

from __future__ import annotations

from typing import Any

import attrs

from ..errors import RecipeError

Scalar = bool | int | float | str | None


def _entries(values: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    out = []
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"block/class value for '{name}' must be a number, got {value!r}")
        out.append((name, value))
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


def blocks(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A block-wise hyperparameter: ``blocks("sd1-ldm", default=0.3, IN02=0.75)``."""
    return WeightMap(arch, "blocks", _entries(values), default)


def classes(arch: str, default: float | None = None, **values: float) -> WeightMap:
    """A class-wise hyperparameter: ``classes("sd1-ldm", default=0.5, attn1_to_k=1.0)``."""
    return WeightMap(arch, "classes", _entries(values), default)
