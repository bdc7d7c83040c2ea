"""mergekit 0.1.5's merge methods, with its own definitions (``mergekit/merge_methods``,
``mergekit/sparsify.py``), so a config read by this plugin computes what mergekit computes.

Every method takes the tensors mergekit's would (the base first where mergekit needs one) and
one text hyperparameter, ``settings``: the config's global and per-model ``parameters`` as JSON
(see :mod:`.params`), resolved per key with mergekit's filters and gradients. Random methods draw
their masks from ``seed`` and the key (mergekit draws from torch's global generator, so only the
distribution matches). Names start with ``mergekit_``: they never hide a mecha method.
"""

from __future__ import annotations

import math

from mecha_core.lazy import torch

from mecha_core import WEIGHT, Total, merge_method

from .gta import GTA_METHODS
from .gta import work as _work
from .params import Settings, as_bool, as_float, evaluate

_SETTINGS_NOTE = ("``settings``: the config's parameters (global and per model) as JSON, resolved per key as "
                  "mergekit does.")


def _per_input(copies: int):
    """A ``working_set`` for a method that takes whole keys (mergekit's definitions stack the
    deltas, sort them, draw whole-tensor masks): ``copies`` float32 copies of the key per input,
    as measured by bench/bench_methods_memory.py (rounded up). The scheduler then admits such
    keys within the memory budget, one at a time when one alone exceeds it."""

    def working_set(info, inputs: int, itemsize: int) -> int:
        return copies * max(inputs, 1) * info.numel * max(itemsize, 4)

    return working_set


#: float32 copies per input each whole-key method holds at its peak (32M-element key, 4 inputs)
_COPIES = {"model_stock": 3, "sce": 6, "nuslerp": 4, "multislerp": 5, "karcher": 5, "arcee_fusion": 5}


# -- the others ---------------------------------------------------------------------------------------
@merge_method(spaces=WEIGHT, elementwise=True, formula="Σ wᵢθᵢ / Σ wᵢ  (no division without normalize)")
def mergekit_linear(*models, settings: str = "{}", ctx=None):
    """mergekit's ``linear``: every input weighted by its ``weight`` (required), divided by the
    sum of the weights when ``normalize`` (default true); float32 compute.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    tensors = _work(models)
    weights = [cfg.per_input(i, "weight", as_float) for i in range(len(tensors))]
    result = torch.zeros_like(tensors[0])
    for tensor, weight in zip(tensors, weights):
        result.add_(tensor * weight)
    if cfg.shared("normalize", as_bool, True):
        result = result / sum(weights)
    return result


def _slerp_statistics(ctx, inputs, **_):
    return [Total("aa", lambda ctx, a, b: a * a), Total("bb", lambda ctx, a, b: b * b),
            Total("ab", lambda ctx, a, b: a * b)]


@merge_method(spaces=WEIGHT, elementwise=True, statistics=_slerp_statistics,
              formula="(sin((1−t)Ω)·a + sin(tΩ)·b) / sin Ω on the raw tensors,  cos Ω = â·b̂")
def mergekit_slerp(base, other, *, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``slerp``: the sine coefficients computed from the normalised, flattened
    tensors and applied to the raw ones (no norm interpolation); linear when |cos Ω| > 0.9995.
    The norms and the dot product are summed in float64 over slices of the key (mergekit's
    float32 sums drift with the tensor's size), so large keys run in bounded memory.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    t = cfg.shared("t", as_float)
    a, b = _work((base, other))
    if ctx is None or ctx.info.numel == 0:
        return (1 - t) * a + t * b
    eps = 1e-8
    na, nb = math.sqrt(stats["aa"]), math.sqrt(stats["bb"])
    na = na if na > eps else 1.0
    nb = nb if nb > eps else 1.0
    dot = min(max(stats["ab"] / (na * nb), -1.0), 1.0)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b


def _nuslerp(t: float, v0, v1, row_wise: bool, flatten: bool):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x):
        return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    result = torch.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten:
        result = result.transpose(0, -1)
    return result.reshape(shape)


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["nuslerp"]),
              formula="slerp(t, a, b) on the raw tensors (or their deltas from base),  t = w₂/(w₁+w₂)")
def mergekit_nuslerp(first, second, base=None, *, settings: str = "{}", ctx=None):
    """mergekit's ``nuslerp``: two models weighted ``weight``; with a base, their deltas are
    slerped and added to it. ``nuslerp_flatten`` (default true) treats the tensor as one vector,
    else rows (``nuslerp_row_wise``: columns of dim 0) are slerped separately.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    w0, w1 = cfg.per_input(0, "weight", as_float), cfg.per_input(1, "weight", as_float)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise = cfg.shared("nuslerp_row_wise", as_bool, False)
    flatten = cfg.shared("nuslerp_flatten", as_bool, True)
    if base is None:
        a, b = _work((first, second))
        return _nuslerp(t, a, b, row_wise, flatten)
    a, b, c = _work((first, second, base))
    return c + _nuslerp(t, a - c, b - c, row_wise, flatten)


@merge_method(spaces=WEIGHT, elementwise=True, formula="w·b + (1 − w)·a,  w = clamp(t / max(|a − b|, 1e-6), 0, 1)")
def mergekit_nearswap(base, other, *, settings: str = "{}", ctx=None):
    """mergekit's ``nearswap``: entries where the base and the other model are close take the
    other's value, far ones keep the base's.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    t = cfg.shared("t", as_float)
    a, b = _work((base, other))
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(min=0, max=1)
    return weight * b + (1 - weight) * a


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["model_stock"]),
              formula="t·mean(θᵢ) + (1 − t)·base,  t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise")
def mergekit_model_stock(base, *models, settings: str = "{}", ctx=None):
    """mergekit's ``model_stock``: the mean pairwise cosine of the deltas (whole tensor, or per
    row with ``filter_wise``) sets how far the mean of the models moves from the base.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    filter_wise = cfg.shared("filter_wise", as_bool, False)
    w0, *ws = _work((base, *models))
    shape = w0.shape
    if filter_wise:
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, oa in enumerate(offsets):
        for ob in offsets[i + 1:]:
            norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
            cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), n * cos / safe)
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(shape)


@merge_method(spaces=WEIGHT, elementwise=True, formula="θ · scale  (scale absent: θ)")
def mergekit_passthrough(model, *, settings: str = "{}", ctx=None):
    """mergekit's ``passthrough``: the one input, times its ``scale`` parameter when set.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    own = cfg.inputs[0] if cfg.inputs else {}
    scopes = [own or {}, *cfg.outer, cfg.global_]
    for scope in scopes:
        if "scale" in scope:
            value = evaluate(cfg.input_key(0), scope["scale"], cfg.t, as_float)
            if value is not None:
                return model * value
    return model


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["multislerp"]),
              formula="exp_μ(Σ wᵢ(uᵢ − (uᵢ·μ)μ))·Σ wᵢ‖xᵢ‖ (+ base),  uᵢ = xᵢ/‖xᵢ‖, xᵢ = θᵢ (− base)")
def mergekit_multislerp(*models, with_base: bool = False, settings: str = "{}", ctx=None):
    """mergekit's ``multislerp``: barycentric interpolation on the hypersphere of the models (their
    deltas from the first input when ``with_base``) with ``weight`` per model (normalised to sum 1
    unless ``normalize_weights: false``; ``eps`` 1e-8).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    base, models = (models[0], models[1:]) if with_base else (None, models)
    eps = cfg.shared("eps", as_float, 1e-8)
    if len(models) == 1:
        return models[0]
    xs = torch.stack(_work(models))
    shape = xs.shape[1:]
    if base is not None:
        xs = xs - base.to(xs.dtype)
    flat = xs.reshape(xs.shape[0], -1)
    weights = torch.tensor([cfg.per_input(i, "weight", as_float) for i in range(len(models))], dtype=xs.dtype)
    if cfg.shared("normalize_weights", as_bool, True):
        weights = weights / weights.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    mean_norm = torch.norm(mean)
    if mean_norm < eps:
        if xs.shape[0] != 2:
            raise ValueError("multislerp: the weighted sum of the inputs is zero")
        result = (xs[0] * weights[0] + xs[1] * weights[1]).reshape(shape)
        return result + base.to(xs.dtype) if base is not None else result
    mean = mean / mean_norm
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    tangent_norm = torch.norm(tangent) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).reshape(shape)
    return result + base.to(xs.dtype) if base is not None else result


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["karcher"]),
              formula="the Fréchet mean of θᵢ/‖θᵢ‖ on the sphere (equal weights), times mean ‖θᵢ‖")
def mergekit_karcher(*models, settings: str = "{}", ctx=None):
    """mergekit's ``karcher``: the equal-weight Karcher mean of every input (the base too) on the
    unit sphere, at most ``max_iter`` (10) steps until the tangent is below ``tol`` (1e-5),
    scaled by the mean norm.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    max_iter = int(cfg.shared("max_iter", as_float, 10))
    tol = cfg.shared("tol", as_float, 1e-5)
    xs = _work(models)
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [torch.linalg.vector_norm(x) for x in xs]
    units = [torch.zeros_like(x) if float(n) == 0.0 else x / n for x, n in zip(xs, norms)]
    valid = [i for i, n in enumerate(norms) if float(n) > tol]
    if not valid:
        return sum(x * 0 for x in xs)
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    vunits = [units[i] for i in valid]
    mean = torch.zeros_like(vunits[0])
    for w, u in zip(weights, vunits):
        mean = mean + w * u
    mean_norm = torch.linalg.vector_norm(mean)
    mean = vunits[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for w, u in zip(weights, vunits):
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent = tangent + w * (theta / torch.sin(theta)) * (u - dot * mean)
        tangent_norm = torch.linalg.vector_norm(tangent)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        unit_norm = torch.linalg.vector_norm(mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["sce"]),
              formula="base + Σ eᵢsᵢτᵢ / max(Σ eᵢsᵢ, 1e-6),  τᵢ top-variance entries, sᵢ ∝ mean τᵢ², eᵢ sign election")
def mergekit_sce(base, *models, settings: str = "{}", ctx=None):
    """mergekit's ``sce``: the deltas kept where their variance across models is in the top
    ``select_topk`` fraction, weighted by their mean square (normalised), sign-elected (sum).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    base, *models = _work((base, *models))
    if not models:
        return base
    tvs = torch.stack([m - base for m in models])
    topk = cfg.shared("select_topk", as_float, 1.0)
    if topk < 1:
        if topk <= 0:
            mask = torch.zeros_like(tvs[0])
        else:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * topk)
            mask = torch.zeros_like(var)
            if k > 0:
                mask.view(-1)[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = (tvs.sign() == majority).to(tvs.dtype)
    weights = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(weights.sum())
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights.reshape(-1, *([1] * base.dim())) * erase
    return base + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


@merge_method(spaces=WEIGHT, working_set=_per_input(_COPIES["arcee_fusion"]),
              formula="base + (θ − base)·[|θ − base|·KL_row(softmax θ ‖ softmax base) ≥ median + 1.5·IQR]")
def mergekit_arcee_fusion(base, other, *, settings: str = "{}", ctx=None):
    """mergekit's ``arcee_fusion``: the other model's changes where their importance (|change|
    times the row's KL divergence of the softmaxes) reaches median + 1.5 × the interquartile
    range; quantiles over every entry (mergekit samples a million entries of larger tensors).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    base, other = _work((base, other))
    eps = 1e-8
    p = torch.softmax(other, dim=-1) + eps
    q = torch.softmax(base, dim=-1) + eps
    importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered = torch.sort(importance.reshape(-1)).values
    at = (torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()
    q1, median, q3 = ordered[at]
    mask = (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * mask


MERGEKIT_METHODS = [*GTA_METHODS, mergekit_linear, mergekit_slerp, mergekit_nuslerp, mergekit_nearswap,
                    mergekit_model_stock, mergekit_passthrough, mergekit_multislerp,
                    mergekit_karcher, mergekit_sce, mergekit_arcee_fusion]
