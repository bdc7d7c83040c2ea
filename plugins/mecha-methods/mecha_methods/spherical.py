"""Interpolation on the sphere: slerp, multi-slerp and the Karcher mean.

Each tensor is flattened to one vector; directions are interpolated on the unit sphere and the
norm separately (linearly), so a merge of two similar models keeps their scale.
"""

from __future__ import annotations

import math

from mecha_core.lazy import torch

from mecha_core import Total, merge_method
from mecha_core.errors import MergeError
from mecha_core.kit.reductions import dot64, norm64

from ._checks import at_least, per_model_weights, positive_int
from ._precision import in_float32


def _unit(x: torch.Tensor, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    # the norm accumulates in float64: torch's float32 norm drifts with the tensor's size
    norm = norm64(x)
    return x / torch.clamp(norm, min=eps).to(x.dtype), norm.to(x.dtype)


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


@merge_method(formula="exp_μ(Σ wᵢ (uᵢ − (uᵢ·μ)μ)) · Σ wᵢ‖xᵢ‖,  uᵢ = xᵢ/‖xᵢ‖, μ = normalised Σ wᵢuᵢ",
              check_spaces=at_least(1, "model"))
@in_float32
def multislerp(*models, weights: tuple = None, eps: float = 1e-8):
    """Spherical interpolation of any number of tensors (mergekit's multi-SLERP).

    weights: one per input (a recipe list such as [0.3, 0.7]); the default (null) means equal
    weights; they are normalised to sum 1. Each flattened input is normalised, uᵢ = xᵢ/‖xᵢ‖;
    μ is the normalised weighted mean of the uᵢ; the tangent vectors at μ are
    vᵢ = uᵢ − (uᵢ·μ)μ and τ = Σ wᵢvᵢ; the direction is the exponential map
    μ·cos‖τ‖ + τ·sin‖τ‖/‖τ‖ (μ itself when ‖τ‖ < eps), and the result has norm Σ wᵢ‖xᵢ‖. When
    the weighted mean of the uᵢ is shorter than 1e-6 (directions that cancel, such as x and −x)
    there is no μ, and the result is the plain weighted mix Σ wᵢxᵢ. For
    task-vector interpolation, give it deltas (e.g. subtract(model, base)) and add the result to
    the base.
    """
    w = per_model_weights("multislerp", weights, len(models))
    flat = [m.reshape(-1) for m in models]
    units, norms = zip(*(_unit(x, eps) for x in flat))
    mu, spread = _unit(sum(wi * u for wi, u in zip(w, units)), eps)
    if spread < _OPPOSED:  # the directions cancel (x and −x): no mean direction, as in slerp
        return sum(wi * m for wi, m in zip(w, models))
    tau = sum(wi * (u - dot64(u, mu).to(u.dtype) * mu) for wi, u in zip(w, units))
    tn = norm64(tau).to(tau.dtype)
    direction = mu if tn < eps else mu * torch.cos(tn) + tau * (torch.sin(tn) / tn)
    direction, _ = _unit(direction, eps)
    scale = sum(wi * n for wi, n in zip(w, norms))
    return (direction * scale).reshape(models[0].shape)


@merge_method(formula="the weighted Fréchet mean of xᵢ/‖xᵢ‖ on the unit sphere, times Σ wᵢ‖xᵢ‖",
              check_spaces=at_least(1, "model"))
@in_float32
def karcher(*models, weights: tuple = None, maxiter: int = 10, tol: float = 1e-5):
    """The Karcher (Riemannian) mean of the flattened tensors' directions, given their mean norm.

    weights: one per input (recipe list), default null = equal; normalised to sum 1. Starting from
    the normalised weighted mean μ of the unit vectors uᵢ, each step maps every uᵢ to the tangent
    space at μ (log map: θᵢ/sin θᵢ · (uᵢ − cos θᵢ·μ), θᵢ = arccos(uᵢ·μ)), averages them with the
    weights and moves μ along the exponential map; it stops after maxiter steps or when the
    averaged tangent vector is shorter than tol. The result is μ·Σ wᵢ‖xᵢ‖. Directions that
    cancel (a weighted mean of the uᵢ shorter than 1e-6) give the plain weighted mix Σ wᵢxᵢ.
    """
    w = per_model_weights("karcher", weights, len(models))
    maxiter = positive_int("karcher", "maxiter", maxiter)
    flat = [m.reshape(-1) for m in models]
    units, norms = zip(*(_unit(x) for x in flat))
    mu, spread = _unit(sum(wi * u for wi, u in zip(w, units)))
    if spread < _OPPOSED:  # the directions cancel: no starting point on the sphere
        return sum(wi * m for wi, m in zip(w, models))
    for _ in range(maxiter):
        tangent = torch.zeros_like(mu)
        for wi, u in zip(w, units):
            cos = torch.clamp(dot64(u, mu), -1.0, 1.0).to(u.dtype)
            theta = torch.arccos(cos)
            if theta > 1e-7:
                tangent += wi * (theta / torch.sin(theta)) * (u - cos * mu)
        step = norm64(tangent).to(tangent.dtype)
        if step < tol:
            break
        mu, _ = _unit(mu * torch.cos(step) + tangent * (torch.sin(step) / step))
    scale = sum(wi * n for wi, n in zip(w, norms))
    return (mu * scale).reshape(models[0].shape)


SPHERICAL = [slerp, multislerp, karcher]
