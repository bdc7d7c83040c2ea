"""Checks of hyperparameter values shared by the methods.

The engine calls a method once per key, so a bad value is reported at the first key, before
anything is renamed into place; the message names the method and the hyperparameter.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from mecha_core.errors import MergeError


def choice(method: str, name: str, value: Any, options: tuple[str, ...]) -> str:
    """``value`` if it is one of ``options``, else a MergeError listing them."""
    if value not in options:
        listed = ", ".join(repr(o) for o in options)
        raise MergeError(f"{method}({name}={value!r}): use one of {listed}")
    return value


def fraction(method: str, name: str, value: Any, *, zero_ok: bool = True) -> float:
    """A number in [0, 1] (or (0, 1] when ``zero_ok`` is false)."""
    v = float(value)
    low_ok = v >= 0 if zero_ok else v > 0
    if not (low_ok and v <= 1):
        interval = "[0, 1]" if zero_ok else "(0, 1]"
        raise MergeError(f"{method}({name}={value!r}): must be in {interval}")
    return v


def positive_int(method: str, name: str, value: Any) -> int:
    v = int(value)
    if v < 1 or v != float(value):
        raise MergeError(f"{method}({name}={value!r}): must be a whole number >= 1")
    return v


def per_model_weights(method: str, weights: Any, n: int) -> list[float]:
    """Per-input weights from a recipe list; ``()`` means equal weights. Normalised to sum 1."""
    if weights is None or (isinstance(weights, (tuple, list)) and len(weights) == 0):
        return [1.0 / n] * n
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = (weights,)
    if not isinstance(weights, (tuple, list)) or len(weights) != n:
        raise MergeError(f"{method}(weights={weights!r}): give one weight per input ({n} inputs), "
                         f"e.g. weights=[{', '.join(['1'] * n)}], or leave it out for equal weights")
    total = float(sum(weights))
    if total == 0:
        raise MergeError(f"{method}(weights={list(weights)!r}): the weights sum to 0")
    return [float(w) / total for w in weights]


def model_weights(method: str, weights: Any, n: int) -> list[float] | None:
    """mergekit-style weights, one per fine-tune (not normalised); ``None`` when not given
    (every weight 1, which the methods skip multiplying by)."""
    if weights is None or (isinstance(weights, (tuple, list)) and len(weights) == 0):
        return None
    if isinstance(weights, (int, float)) and not isinstance(weights, bool):
        weights = (weights,)
    if not isinstance(weights, (tuple, list)) or len(weights) != n or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise MergeError(f"{method}(weights={weights!r}): give one finite weight per model after the base "
                         f"({n} models), e.g. weights=[{', '.join(['1'] * n)}], or leave it out for weight 1 each")
    return [float(w) for w in weights]


def at_least(count: int, what: str) -> Callable[[dict[str, Any]], None]:
    """A ``check_spaces`` hook that refuses fewer than ``count`` variadic inputs when the recipe
    is built (the core's arity check only counts the fixed inputs)."""

    def check(spaces: dict[str, Any]) -> None:
        given = sum(1 for label in spaces if "[" in label)
        if given < count:
            raise ValueError(f"needs at least {count} {what}, got {given}")

    return check
