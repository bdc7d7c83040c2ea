"""What ``mecha diff`` found: value objects the CLI renders as a table, JSON or a plot.

Every number is computed in float64 from sums accumulated over the elements of a group (a block,
a key, or all keys); :mod:`mecha_core.difference.measure` says how.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

#: The ``schema`` field of the JSON output; bumped when a field changes meaning or goes away.
SCHEMA = "mecha-diff/1"


@attrs.frozen
class Measures:
    """How the second model of a pair differs from the first over one group of elements."""

    keys: int
    """Keys of the group both models hold (with one shape), i.e. the keys these numbers cover."""
    elements: int
    """Elements compared."""
    cosine: float | None
    """Cosine similarity of the weights, ``<A, B> / (‖A‖ ‖B‖)``; ``None`` when either side is all
    zeros (or nothing was compared)."""
    relative_l2: float | None
    """``‖B − A‖ / ‖A‖``; ``0.0`` when both are all zeros, ``None`` when only ``A`` is (or nothing
    was compared)."""
    max_abs_change: float | None
    """The largest ``|B − A|`` of any element; ``None`` when nothing was compared."""
    task_cosine: float | None = None
    """With a base: the cosine of the task vectors ``A − BASE`` and ``B − BASE`` (over the keys the
    base holds too); ``None`` without a base or when either task vector is all zeros."""
    sign_agreement: float | None = None
    """With a base: among the elements where both task vectors are non-zero, the fraction whose
    signs agree (the vote TIES takes); elements where either is exactly zero are not counted.
    ``None`` without a base or when no element has both non-zero."""

    def as_json(self) -> dict[str, Any]:
        """The JSON form; a non-finite value (inputs holding NaN or Inf) is ``null``, since JSON
        has no NaN."""
        return {"keys": self.keys, "elements": self.elements, "cosine": _finite(self.cosine),
                "relative_l2": _finite(self.relative_l2), "max_abs_change": _finite(self.max_abs_change),
                "task_cosine": _finite(self.task_cosine), "sign_agreement": _finite(self.sign_agreement)}


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


@attrs.frozen
class PairDiff:
    """The comparison of two of the models, group by group."""

    first: int
    """The index of ``A`` in :attr:`DiffResult.models`."""
    second: int
    """The index of ``B`` in :attr:`DiffResult.models`."""
    groups: tuple[Measures, ...]
    """One entry per :attr:`DiffResult.groups` name, in that order (``keys == 0`` where the pair
    shares no key of the group)."""
    total: Measures
    """Over every key the pair compared."""
    unmatched_keys: int
    """Floating-point keys only one of the two holds, or that they hold in different shapes
    (not compared)."""


@attrs.frozen
class DiffResult:
    """``mecha diff``'s answer: per group (block or key) measures for each pair of models."""

    models: tuple[str, ...]
    """The compared inputs, as they were named (a path, or a recipe's description)."""
    base: str | None
    """The base the task vectors are taken against, or ``None``."""
    architecture: str | None
    """The detected (or named) architecture whose blocks group the keys, or ``None``."""
    grouping: str
    """``block`` (blocks, then components for keys in no block) or ``key`` (one group per key)."""
    groups: tuple[str, ...]
    """The group names, in architecture order (blocks, components, then ``(other)``)."""
    pairs: tuple[PairDiff, ...]
    """The compared pairs, in order: (0, 1), (0, 2), ..., (1, 2), ... unless chosen otherwise."""

    def pair_label(self, pair: PairDiff) -> str:
        return f"{self.models[pair.first]} vs {self.models[pair.second]}"

    def as_json(self) -> dict[str, Any]:
        """The stable JSON form (docs/diff.md describes every field)."""
        return {
            "schema": SCHEMA,
            "models": list(self.models),
            "base": self.base,
            "architecture": self.architecture,
            "grouping": self.grouping,
            "groups": list(self.groups),
            "pairs": [{
                "first": self.models[p.first], "second": self.models[p.second],
                "first_index": p.first, "second_index": p.second,
                "unmatched_keys": p.unmatched_keys,
                "total": p.total.as_json(),
                "groups": [{"name": name, **m.as_json()} for name, m in zip(self.groups, p.groups)],
            } for p in self.pairs],
        }
