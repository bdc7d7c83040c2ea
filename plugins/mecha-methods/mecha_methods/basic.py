"""Linear methods: weighted sums, averages, added differences. All are element-wise and exact in the work dtype.

Each sums into a temporary it made itself (``+=`` on a fresh product) instead of allocating one
more tensor per operation: the same floating-point operations in the same order, so the same
bits, and about 0.6-1.4 ns per element less on slices the size the engine uses (a fresh tensor is
a fresh allocation to fault in and one more pass through memory). ``weighted_sum`` and
``add_difference`` first try one compiled loop over the slice (:mod:`._linear_native`), which
gives these expressions' bits; where it does not apply they run as written here."""

from __future__ import annotations

from typing import Any

from mecha_core import WEIGHT, merge_method

from . import _linear_native


@merge_method(elementwise=True, formula="(1 - alpha) * a + alpha * b")
def weighted_sum(a, b, *, alpha: float = 0.5):
    """Linear interpolation: alpha = 0 gives a, alpha = 1 gives b."""
    fused = _linear_native.weighted_sum(a, b, alpha)  # one C loop where it applies, the same bits
    return fused if fused is not None else _add_into(a * (1 - alpha), b * alpha)


@merge_method(elementwise=True, formula="mean(models)")
def n_average(*models):
    """The mean of any number of models (all in the same merge space)."""
    first = models[0]
    if len(models) > 1 and all(_same_kind(first, m) for m in models[1:]):
        out = first + models[1]
        for m in models[2:]:
            out += m
        return out.div_(len(models))
    out = first.clone()  # mixed dtypes: the sum keeps the first model's, as it always has
    for m in models[1:]:
        out += m
    return out / len(models)


def _same_kind(x, y) -> bool:
    import torch  # here: listing or describing methods must not import torch (tests/test_first_contact.py)

    return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape and x.dtype == y.dtype


def _add_into(fresh, other):
    """``fresh + other``, in ``fresh`` (a temporary of the caller's) when that gives the same tensor."""
    return fresh.add_(other) if _same_kind(fresh, other) else fresh + other


def _add_difference_spaces(spaces: dict[str, Any]) -> None:
    if "c" not in spaces and spaces.get("b") == WEIGHT:
        raise ValueError("with two inputs, b must be a delta (for example subtract(b, c) or a LoRA); "
                         "got weights — pass c as well")


@merge_method(elementwise=True, spaces={"a": WEIGHT}, returns=WEIGHT, check_spaces=_add_difference_spaces,
              formula="a + alpha * (b - c); with two inputs a + alpha * b (b a delta)")
def add_difference(a, b, c=None, *, alpha: float = 1.0):
    """Add the difference b - c (or the delta b) to a, scaled by alpha."""
    fused = _linear_native.add_difference(a, b, c, alpha)  # one C loop where it applies, the same bits
    if fused is not None:
        return fused
    diff = b - c if c is not None else b
    return _add_into(diff * alpha, a)  # a + x and x + a are the same IEEE sum


# subtract, add, scale and fallback (the operators -, +, * and |) are the core's own methods:
# mecha_core/operators.py.
BASIC = [weighted_sum, n_average, add_difference]
