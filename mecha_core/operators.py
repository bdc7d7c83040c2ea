"""The core's own operators: the methods recipe arithmetic builds (``a - b``, ``a + b``,
``a * x``, ``a | b``), so a core with no plugin at all can build and run them.

The plugin host registers them as provided by ``mecha-core``; ``mecha methods`` lists them with
the plugins' methods. The recipe nodes get them from :func:`set_core_operators` below rather
than by importing this module (which imports method.py, which imports the nodes).
"""

from __future__ import annotations

from .method import merge_method
from .recipe.nodes import set_core_operators
from .specs import DELTA, WEIGHT


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


#: The core's methods, in the order ``mecha methods`` and docs/methods.md list them.
CORE_METHODS = (subtract, add, scale, fallback)

set_core_operators(*CORE_METHODS)

__all__ = ["CORE_METHODS", "add", "fallback", "scale", "subtract"]
