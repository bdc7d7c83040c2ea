"""Hyperparameters bound when a merge is planned, so the runner never reads recipe nodes.

A plain value is passed to every call as it is. A block/class map (``blocks("sd1-ldm", ...)``)
is resolved once, for every key its architecture lists, into a :class:`PerKey` table: the runner
then looks a key's value up instead of consulting the architecture (or the plugin host) per key.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import attrs

from ..recipe.nodes import LiteralNode, Node
from ..recipe.values import WeightMap, layer_position

if TYPE_CHECKING:
    from ..method import MergeMethod
    from ..plugins import PluginHost


@attrs.frozen(eq=False)
class PerKey:
    """A hyperparameter whose value depends on the key: a block/class map, resolved."""

    values: Mapping[str, Any] = attrs.field(repr=False)
    """The value for each key the map's architecture lists."""
    other: Any
    """The value for a key the architecture does not list (the map's default, else the method's)."""

    def at(self, key: str) -> Any:
        return self.values.get(key, self.other)


@attrs.frozen(eq=False)
class BoundHyperparameters:
    """A call's hyperparameters: the same value for every key, or one looked up per key."""

    constant: Mapping[str, Any]
    """Name -> the value every key gets (given in the recipe, or the method's default)."""
    per_key: tuple[tuple[str, PerKey], ...] = ()
    """Name -> the table of per-key values, for hyperparameters given as block/class maps."""

    def for_key(self, key: str) -> dict[str, Any]:
        """The keyword arguments of the call for ``key``."""
        kwargs = dict(self.constant)
        for name, table in self.per_key:
            kwargs[name] = table.at(key)
        return kwargs


def _resolve(value: WeightMap, key_blocks: tuple[str, ...], key_class: str | None, default: Any,
             kind: type | None, position: float | None = None) -> Any:
    resolved = value.resolve(key_blocks, key_class, default, position)
    if kind is int and isinstance(resolved, float):
        # a key in several blocks takes the mean of their values; an int hyperparameter (a seed,
        # an iteration count) gets it rounded, half to even
        return round(resolved)
    return resolved


def per_key(value: WeightMap, default: Any, kind: type | None, host: PluginHost) -> PerKey:
    """``value`` resolved for every key of its architecture (named by its name or an alias)."""
    arch = host.architecture(value.arch)
    layer_index = {block: i for i, block in enumerate(arch.layers)}  # a layer gradient's positions

    def position(key_blocks: tuple[str, ...]) -> float | None:
        index = next((layer_index[b] for b in key_blocks if b in layer_index), None)
        return None if index is None else layer_position(index, len(arch.layers))

    values = {key: _resolve(value, spec.blocks, spec.klass, default, kind, position(spec.blocks))
              for key, spec in arch.keys.items()}
    return PerKey(values, _resolve(value, (), None, default, kind))


def bind(method: MergeMethod, kwargs: tuple[tuple[str, Node], ...], host: PluginHost,
         cache: dict[tuple[Node, Any, str], PerKey]) -> BoundHyperparameters:
    """Every hyperparameter of a call, bound: the recipe's literal, else the method's default.

    ``cache`` shares the tables of equal maps between the calls of one plan (a recipe often
    gives many calls the same map).
    """
    given = dict(kwargs)
    constant: dict[str, Any] = {}
    tables: list[tuple[str, PerKey]] = []
    for h in method.hyperparameters:
        node = given.get(h.name)
        raw = node.value if isinstance(node, LiteralNode) else h.default
        if isinstance(raw, WeightMap):
            # the literal node, not the map, is the key: its equality tells 1 from 1.0
            memo = (node, h.kind, repr(h.default))
            if memo not in cache:
                cache[memo] = per_key(raw, h.default, h.kind, host)
            tables.append((h.name, cache[memo]))
        else:
            constant[h.name] = raw
    return BoundHyperparameters(constant, tuple(tables))
