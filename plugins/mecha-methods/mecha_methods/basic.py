"""Linear methods: sums, differences, averages. All are element-wise and exact in the work dtype."""

from __future__ import annotations

from typing import Any

from mecha_core.lazy import torch

from mecha_core import DELTA, WEIGHT, merge_method


@merge_method(elementwise=True, formula="(1 - alpha) * a + alpha * b")
def weighted_sum(a, b, *, alpha: float = 0.5):
    """Linear interpolation: alpha = 0 gives a, alpha = 1 gives b."""
    return a * (1 - alpha) + b * alpha


@merge_method(elementwise=True, formula="mean(models)")
def n_average(*models):
    """The mean of any number of models (all in the same merge space)."""
    out = models[0].clone()
    for m in models[1:]:
        out += m
    return out / len(models)


def _add_difference_spaces(spaces: dict[str, Any]) -> None:
    if "c" not in spaces and spaces.get("b") == WEIGHT:
        raise ValueError("with two inputs, b must be a delta (for example subtract(b, c) or a LoRA); "
                         "got weights — pass c as well")


@merge_method(elementwise=True, spaces={"a": WEIGHT}, returns=WEIGHT, check_spaces=_add_difference_spaces,
              formula="a + alpha * (b - c); with two inputs a + alpha * b (b a delta)")
def add_difference(a, b, c=None, *, alpha: float = 1.0):
    """Add the difference b - c (or the delta b) to a, scaled by alpha."""
    diff = b - c if c is not None else b
    return a + diff * alpha


@merge_method(elementwise=True, spaces=WEIGHT, returns=DELTA, formula="a - b")
def subtract(a, b):
    """The delta from b to a (weights in, delta out)."""
    return a - b


@merge_method(elementwise=True, spaces={"b": DELTA}, formula="a + b")
def add(a, b):
    """Weights plus a delta (giving weights), or the sum of two deltas (giving a delta).

    b must be a delta: adding two checkpoints is almost never meant (weighted_sum averages them).
    """
    return a + b


@merge_method(elementwise=True, formula="alpha * a")
def scale(a, *, alpha: float = 1.0):
    """Multiply by alpha (most useful on deltas)."""
    return a * alpha


@merge_method(elementwise=True, accepts_missing=True, formula="a where a has the key, else b")
def fallback(a, b):
    """a's value for keys a has; b's for the rest (lets a recipe cover keys missing from a)."""
    return a if a is not None else b


BASIC = [weighted_sum, n_average, add_difference, subtract, add, scale, fallback]
