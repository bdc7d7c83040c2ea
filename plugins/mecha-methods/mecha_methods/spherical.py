"""Interpolation on the sphere: slerp, multi-slerp and the Karcher mean.

Each tensor is flattened to one vector; directions are interpolated on the unit sphere and the
norm separately (linearly), so a merge of two similar models keeps their scale.
"""

from __future__ import annotations

import math

from mecha_core.lazy import torch

from mecha_core import Total, merge_method
from mecha_core.errors import MergeError

from ._checks import at_least, per_model_weights, positive_int
from ._precision import in_float32


def _slerp_statistics(ctx, inputs, **_):
    return [Total("aa", lambda ctx, a, b: a * a), Total("bb", lambda ctx, a, b: b * b),
            Total("ab", lambda ctx, a, b: a * b)]


@merge_method(elementwise=True, statistics=_slerp_statistics,
              formula="(sin((1−α)Ω)·â + sin(αΩ)·b̂) / sin Ω · ((1−α)‖a‖ + α‖b‖),  Ω = arccos(â·b̂)")
@in_float32
def slerp(a, b, *, alpha: float = 0.5, parallel: float = 0.9995, stats=None):
    """Spherical linear interpolation of the flattened tensors.

    The unit directions â, b̂ are interpolated along the great circle through them (Ω the angle
    between them) and the result is given the norm (1 − alpha)·‖a‖ + alpha·‖b‖. When the
    directions are nearly parallel or opposite (|cos Ω| > parallel) or a tensor is zero, the
    circle is ill-defined and the result is the plain weighted_sum (1 − alpha)·a + alpha·b.
    The norms and the dot product are summed in float64 over slices of the key, so the result
    is c_a·a + c_b·b computed element-wise, in bounded memory for any size.
    """
    if not 0 <= parallel < 1:  # 1 or more would divide by sin 0 for (anti)parallel inputs
        raise MergeError(f"slerp(parallel={parallel!r}): must be in [0, 1)")
    na, nb = math.sqrt(stats["aa"]), math.sqrt(stats["bb"])
    if na == 0 or nb == 0:
        return (1 - alpha) * a + alpha * b
    cos = min(max(stats["ab"] / (na * nb), -1.0), 1.0)
    if abs(cos) > parallel:
        return (1 - alpha) * a + alpha * b
    omega = math.acos(cos)
    sin = math.sin(omega)
    scale = (1 - alpha) * na + alpha * nb
    return a * (math.sin((1 - alpha) * omega) / sin / na * scale) + b * (math.sin(alpha * omega) / sin / nb * scale)


#: Below this length of the weighted mean of the unit directions they cancel out (x and −x),
#: and the spherical methods fall back to the plain weighted mix, as slerp does for opposite inputs.
_OPPOSED = 1e-6


def gram_statistics(ctx, inputs, **_):
    """Every dot product xᵢ·xⱼ (i ≤ j) of the flattened inputs, summed in float64 over slices:
    multislerp and karcher only ever combine the inputs linearly, so their whole computation
    runs on this matrix and the result is Σ cᵢxᵢ, element-wise given it."""
    return [Total(f"{i},{j}", lambda ctx, *xs, i=i, j=j: xs[i] * xs[j])
            for i in range(inputs) for j in range(i, inputs)]


def gram(stats, n: int) -> torch.Tensor:
    """The n×n float64 matrix of the dot products :func:`gram_statistics` summed."""
    g = torch.empty((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = stats[f"{i},{j}"]
    return g


class _Span:
    """Vectors of the inputs' span as coefficients c (the vector Σ cᵢxᵢ), with the Gram matrix
    giving their dot products and norms in float64."""

    def __init__(self, g: torch.Tensor):
        self.g = g

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(a @ self.g @ b)

    def norm(self, a: torch.Tensor) -> float:
        return math.sqrt(max(self.dot(a, a), 0.0))

    def unit(self, a: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, float]:
        n = self.norm(a)
        return a / max(n, eps), n


def combine(xs, coefficients) -> torch.Tensor:
    """Σ cᵢxᵢ, element by element in the inputs' dtype."""
    out = xs[0] * float(coefficients[0])
    for x, c in zip(xs[1:], coefficients[1:]):
        out += x * float(c)
    return out


@merge_method(formula="exp_μ(Σ wᵢ (uᵢ − (uᵢ·μ)μ)) · Σ wᵢ‖xᵢ‖,  uᵢ = xᵢ/‖xᵢ‖, μ = normalised Σ wᵢuᵢ",
              check_spaces=at_least(1, "model"), elementwise=True, statistics=gram_statistics)
@in_float32
def multislerp(*models, weights: tuple = None, eps: float = 1e-8, stats=None):
    """Spherical interpolation of any number of tensors (mergekit's multi-SLERP).

    weights: one per input (a recipe list such as [0.3, 0.7]); the default (null) means equal
    weights; they are normalised to sum 1. Each flattened input is normalised, uᵢ = xᵢ/‖xᵢ‖;
    μ is the normalised weighted mean of the uᵢ; the tangent vectors at μ are
    vᵢ = uᵢ − (uᵢ·μ)μ and τ = Σ wᵢvᵢ; the direction is the exponential map
    μ·cos‖τ‖ + τ·sin‖τ‖/‖τ‖ (μ itself when ‖τ‖ < eps), and the result has norm Σ wᵢ‖xᵢ‖. When
    the weighted mean of the uᵢ is shorter than 1e-6 (directions that cancel, such as x and −x)
    there is no μ, and the result is the plain weighted mix Σ wᵢxᵢ. For
    task-vector interpolation, give it deltas (e.g. subtract(model, base)) and add the result to
    the base. Every vector involved is a combination of the inputs, so the norms and dot products
    come from the inputs' dot products, summed in float64 over slices of the key (bounded memory
    for any size), and the result is Σ cᵢxᵢ computed element-wise.
    """
    w = per_model_weights("multislerp", weights, len(models))
    n = len(models)
    space = _Span(gram(stats, n))
    eye = torch.eye(n, dtype=torch.float64)
    units, norms = zip(*(space.unit(eye[i], eps) for i in range(n)))
    mu, spread = space.unit(sum(wi * u for wi, u in zip(w, units)), eps)
    if spread < _OPPOSED:  # the directions cancel (x and −x): no mean direction, as in slerp
        return combine(models, w)
    tau = sum(wi * (u - space.dot(u, mu) * mu) for wi, u in zip(w, units))
    tn = space.norm(tau)
    direction = mu if tn < eps else mu * math.cos(tn) + tau * (math.sin(tn) / tn)
    direction, _ = space.unit(direction, eps)
    scale = sum(wi * nrm for wi, nrm in zip(w, norms))
    return combine(models, direction * scale)


@merge_method(formula="the weighted Fréchet mean of xᵢ/‖xᵢ‖ on the unit sphere, times Σ wᵢ‖xᵢ‖",
              check_spaces=at_least(1, "model"), elementwise=True, statistics=gram_statistics)
@in_float32
def karcher(*models, weights: tuple = None, maxiter: int = 10, tol: float = 1e-5, stats=None):
    """The Karcher (Riemannian) mean of the flattened tensors' directions, given their mean norm.

    weights: one per input (recipe list), default null = equal; normalised to sum 1. Starting from
    the normalised weighted mean μ of the unit vectors uᵢ, each step maps every uᵢ to the tangent
    space at μ (log map: θᵢ/sin θᵢ · (uᵢ − cos θᵢ·μ), θᵢ = arccos(uᵢ·μ)), averages them with the
    weights and moves μ along the exponential map; it stops after maxiter steps or when the
    averaged tangent vector is shorter than tol. The result is μ·Σ wᵢ‖xᵢ‖. Directions that
    cancel (a weighted mean of the uᵢ shorter than 1e-6) give the plain weighted mix Σ wᵢxᵢ.
    μ stays a combination of the inputs, so the iteration runs on their dot products (summed in
    float64 over slices of the key) and the result is Σ cᵢxᵢ, element-wise given them.
    """
    w = per_model_weights("karcher", weights, len(models))
    maxiter = positive_int("karcher", "maxiter", maxiter)
    n = len(models)
    space = _Span(gram(stats, n))
    eye = torch.eye(n, dtype=torch.float64)
    units, norms = zip(*(space.unit(eye[i]) for i in range(n)))
    mu, spread = space.unit(sum(wi * u for wi, u in zip(w, units)))
    if spread < _OPPOSED:  # the directions cancel: no starting point on the sphere
        return combine(models, w)
    for _ in range(maxiter):
        tangent = torch.zeros(n, dtype=torch.float64)
        for wi, u in zip(w, units):
            cos = min(max(space.dot(u, mu), -1.0), 1.0)
            theta = math.acos(cos)
            if theta > 1e-7:
                tangent += wi * (theta / math.sin(theta)) * (u - cos * mu)
        step = space.norm(tangent)
        if step < tol:
            break
        mu, _ = space.unit(mu * math.cos(step) + tangent * (math.sin(step) / step))
    scale = sum(wi * nrm for wi, nrm in zip(w, norms))
    return combine(models, mu * scale)


SPHERICAL = [slerp, multislerp, karcher]
