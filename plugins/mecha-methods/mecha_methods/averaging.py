"""Averages of several models around a base: task arithmetic, Model Stock, geometric median."""

from __future__ import annotations

import math
from typing import Literal

from mecha_core.lazy import torch

from mecha_core import WEIGHT, Total, merge_method
from mecha_core.errors import MergeError

from ._checks import at_least, choice, model_weights, positive_int
from ._precision import in_float32
from .spherical import combine

_SPACES = {"base": WEIGHT, "models": WEIGHT}


@merge_method(elementwise=True, spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * Σ wᵢ·(θᵢ − base)")
def task_arithmetic(base, *models, alpha: float = 1.0, weights: tuple = None):
    """Task arithmetic (Ilharco et al. 2023): the base plus alpha times the summed task vectors.

    Every model's task vector θᵢ − base is added to the base, scaled by alpha. With one model
    this is base + alpha · (model − base), i.e. weighted_sum(base, model, alpha=alpha).
    weights: one per model after the base (a recipe list such as [0.7, 0.3]), multiplying its
    task vector; not normalised (mergekit's task_arithmetic); the default (null) is 1 each.
    """
    w = model_weights("task_arithmetic", weights, len(models))
    total = torch.zeros_like(base)
    for i, m in enumerate(models):
        if w is None:
            total += m - base
        else:
            total += w[i] * (m - base)
    return base + alpha * total


def _stock_pairs(pairs: str, n: int) -> list[tuple[int, int]]:
    pairs = choice("model_stock", "pairs", pairs, ("all", "consecutive"))
    if pairs == "all":
        return [(i, j) for i in range(n) for j in range(i + 1, n)]
    return [(i, i + 1) for i in range(n - 1)]


def _stock_statistics(ctx, inputs, *, pairs="all", **_):
    """The dot products of the task vectors model_stock's cosines need (norms included)."""
    wanted = sorted({p for i, j in _stock_pairs(pairs, inputs - 1) for p in ((i, i), (j, j), (i, j))})
    return [Total(f"{i},{j}", lambda ctx, base, *models, i=i, j=j: (models[i] - base) * (models[j] - base))
            for i, j in wanted]


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(2, "models"), elementwise=True,
              statistics=_stock_statistics,
              formula="t·mean(θᵢ) + (1 − t)·base,  t = N·cosθ / (1 + (N − 1)·cosθ)")
@in_float32
def model_stock(base, *models, pairs: Literal["all", "consecutive"] = "all", eps: float = 1e-6, clamp: bool = False,
                stats=None):
    """Model Stock (Jang et al. 2024, arXiv 2403.19522), per tensor.

    cosθ is the mean cosine similarity of the flattened task vectors δᵢ = θᵢ − base, over all
    pairs i < j with pairs="all" (the default, the paper's and mergekit's), or over consecutive
    pairs (δ₁, δ₂), (δ₂, δ₃), ... with pairs="consecutive" (sd-mecha's cheaper variant). With N
    models, t = N·cosθ / (1 + (N − 1)·cosθ) and the result is t·mean(θᵢ) + (1 − t)·base. For
    cosθ ≥ 0 (the usual case) t lies in [0, 1]. A negative mean cosine (fine-tunes pulling apart)
    gives a negative t, as in the paper and mergekit (the default); clamp=true keeps t in [0, 1]
    instead (the base is kept). Where 1 + (N − 1)·cosθ is within eps of 0, t is unbounded: an
    error without clamp. eps also guards the cosines' denominators (a zero task vector has
    cosine 0). Needs at least 2 models. The dot products are summed in float64 over slices of
    the key, so the result is element-wise given them (bounded memory for any size).
    """
    if not isinstance(clamp, bool):
        raise MergeError(f"model_stock(clamp={clamp!r}): must be true or false")
    n = len(models)
    index = _stock_pairs(pairs, n)
    # the dot products and norms were summed in float64 over the whole key (slice by slice)
    cos = sum(stats[f"{i},{j}"] / max(math.sqrt(stats[f"{i},{i}"] * stats[f"{j},{j}"]), eps)
              for i, j in index) / len(index)
    denominator = 1 + (n - 1) * cos
    if clamp:  # the denominator is only ever ≤ 0 where the clamped t is 0 or 1 anyway
        t = min(max(n * cos / max(denominator, eps), 0.0), 1.0)
    elif abs(denominator) < eps:
        raise MergeError(f"model_stock: the task vectors' mean cosine is {cos:.4g}, where t is "
                         f"unbounded; use clamp=true")
    else:
        t = n * cos / denominator
    mean = sum(models) / n
    return t * mean + (1 - t) * base


def _centred_gram(ctx, inputs, **_):
    """(xᵢ − x₀)·(xⱼ − x₀) for 1 ≤ i ≤ j, summed in float64 over slices: the distances between
    combinations of the inputs without the cancellation of ‖xᵢ‖² − 2xᵢ·m + ‖m‖²."""
    return [Total(f"{i},{j}", lambda ctx, *xs, i=i, j=j: (xs[i] - xs[0]) * (xs[j] - xs[0]))
            for i in range(1, inputs) for j in range(i, inputs)]


@merge_method(formula="argmin_m Σ ‖xᵢ − m‖ (Weiszfeld iterations)", check_spaces=at_least(1, "model"),
              elementwise=True, statistics=_centred_gram)
@in_float32
def geometric_median(*models, eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20, stats=None):
    """The geometric median of the inputs: robust to an outlier model, unlike the mean.

    The median is the point minimising the sum of Euclidean distances to the flattened inputs.

    Weiszfeld's algorithm from the mean: each step is the average of the inputs weighted by
    1 / max(‖xᵢ − m‖, eps); it stops after maxiter steps, or when the sum of distances improves
    by at most ftol times its value. Every iterate is a weighted mean of the inputs, so the
    distances come from the dot products of the differences xᵢ − x₀, summed in float64 over
    slices of the key (bounded memory for any size), and the result Σ cᵢxᵢ is element-wise.
    """
    maxiter = positive_int("geometric_median", "maxiter", maxiter)
    if not eps > 0:  # the weights are 1 / max(distance, eps): 0 divides by zero, < 0 flips signs
        raise MergeError(f"geometric_median(eps={eps!r}): must be greater than 0")
    n = len(models)
    g = torch.zeros((n, n), dtype=torch.float64)  # row and column 0: x₀ − x₀ = 0
    for i in range(1, n):
        for j in range(i, n):
            g[i, j] = g[j, i] = stats[f"{i},{j}"]
    eye = torch.eye(n, dtype=torch.float64)

    def distances(c: torch.Tensor) -> torch.Tensor:
        # ‖xᵢ − Σ cⱼxⱼ‖ = ‖(eᵢ − c)·(x − x₀)‖ when Σ cⱼ = 1
        diff = eye - c
        return torch.einsum("ij,jk,ik->i", diff, g, diff).clamp(min=0).sqrt()

    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    d = distances(c)
    objective = float(d.sum())
    for _ in range(maxiter):
        weights = 1 / torch.clamp(d, min=eps)
        c = weights / weights.sum()
        d = distances(c)
        previous, objective = objective, float(d.sum())
        if abs(previous - objective) <= ftol * objective:
            break
    return combine(models, c)


AVERAGING = [task_arithmetic, model_stock, geometric_median]
