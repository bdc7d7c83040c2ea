"""Linear methods: weighted sums, averages, added differences. All are element-wise and exact in the work dtype."""

from __future__ import annotations

from typing import Any


from mecha_core import WEIGHT, merge_method


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


# subtract, add, scale and fallback (the operators -, +, * and |) are the core's own methods:
# mecha_core/operators.py.
BASIC = [weighted_sum, n_average, add_difference]
