"""Which group each key is counted in: the blocks of the detected architecture, then, for keys
in no block, their component, then ``(other)`` for keys the architecture does not list; without
an architecture every key is in ``(all keys)``. With ``--keys`` each key is its own group."""

from __future__ import annotations

from typing import Iterable

from ..specs import Architecture

OTHER = "(other)"
ALL_KEYS = "(all keys)"


def component_label(component: str) -> str:
    """A component's group name, in parentheses so it never reads as a block name."""
    return f"({component})"


def key_groups(key: str, arch: Architecture | None) -> tuple[str, ...]:
    """The groups ``key`` is counted in (a key in several blocks counts in each)."""
    if arch is None:
        return (ALL_KEYS,)
    spec = arch.keys.get(key)
    if spec is None:
        return (OTHER,)
    if spec.blocks:
        return tuple(spec.blocks)
    return (component_label(spec.component),)


def group_order(arch: Architecture | None, used: Iterable[str]) -> list[str]:
    """The groups in ``used``, in architecture order: blocks, components, ``(other)``."""
    used = set(used)
    if arch is None:
        return [g for g in (ALL_KEYS,) if g in used]
    order = [*arch.blocks, *(component_label(c) for c in arch.components), OTHER]
    known = [g for g in order if g in used]
    return known + sorted(used - set(known))  # a block a key names but the list lacks: last


def key_order(keys: Iterable[str], arch: Architecture | None) -> list[str]:
    """Keys in the architecture's layout order, keys it does not list after them (as given)."""
    keys = list(keys)
    if arch is None:
        return keys
    position = {k: i for i, k in enumerate(arch.keys)}
    return sorted(keys, key=lambda k: (0, position[k]) if k in position else (1, 0))
