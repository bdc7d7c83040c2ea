"""mergekit 0.1.5's merge methods, with its own definitions (``mergekit/merge_methods``,
``mergekit/sparsify.py``), so a config read by this plugin computes what mergekit computes.

Every method takes the tensors mergekit's would (the base first where mergekit needs one) and
one text hyperparameter, ``settings``: the config's global and per-model ``parameters`` as JSON
(see :mod:`.params`), resolved per key with mergekit's filters and gradients. Random methods draw
their masks from ``seed`` and the key (mergekit draws from torch's global generator, so only the
distribution matches). Names start with ``mergekit_``: they never hide a mecha method.

Every method runs over slices of a key, so any key merges in bounded memory: the element-wise
ones directly, the others in statistics passes then an element-wise pass (the generalized task
arithmetic family in :mod:`.gta`; the norm-, angle- and selection-based ones as staged
algorithms, :mod:`.staged`, in :mod:`.spherical` and :mod:`.selective`).
"""

from __future__ import annotations

import math

from mecha_core.lazy import torch

from mecha_core import WEIGHT, Total, merge_method

from . import selective, spherical
from .gta import GTA_METHODS
from .gta import work as _work
from .params import Settings, as_bool, as_float, evaluate
from .staged import replay, statistics_of

_SETTINGS_NOTE = ("``settings``: the config's parameters (global and per model) as JSON, resolved per key as "
                  "mergekit does.")


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


@merge_method(spaces=WEIGHT, rowwise=True, statistics=statistics_of(spherical.nuslerp),
              formula="slerp(t, a, b) on the raw tensors (or their deltas from base),  t = w₂/(w₁+w₂)")
def mergekit_nuslerp(first, second, base=None, *, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``nuslerp``: two models weighted ``weight``; with a base, their deltas are
    slerped and added to it. ``nuslerp_flatten`` (default true) treats the tensor as one vector,
    else rows (``nuslerp_row_wise``: columns of dim 0) are slerped separately. Runs over slices
    of whole rows: norms and dot products are float64 sums over the key (per column when
    row-wise).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(spherical.nuslerp, (first, second, base), {"settings": settings}, ctx, stats)


@merge_method(spaces=WEIGHT, rowwise=True, statistics=statistics_of(spherical.model_stock),
              formula="t·mean(θᵢ) + (1 − t)·base,  t = N·cos / (1 + (N − 1)·cos), cos the mean pairwise")
def mergekit_model_stock(base, *models, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``model_stock``: the mean pairwise cosine of the deltas (whole tensor, or per
    row with ``filter_wise``) sets how far the mean of the models moves from the base. Runs over
    slices of whole rows: the norms and dot products are float64 sums over the key.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(spherical.model_stock, (base, *models), {"settings": settings}, ctx, stats)


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


@merge_method(spaces=WEIGHT, elementwise=True, statistics=statistics_of(spherical.multislerp),
              formula="exp_μ(Σ wᵢ(uᵢ − (uᵢ·μ)μ))·Σ wᵢ‖xᵢ‖ (+ base),  uᵢ = xᵢ/‖xᵢ‖, xᵢ = θᵢ (− base)")
def mergekit_multislerp(*models, with_base: bool = False, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``multislerp``: barycentric interpolation on the hypersphere of the models (their
    deltas from the first input when ``with_base``) with ``weight`` per model (normalised to sum 1
    unless ``normalize_weights: false``; ``eps`` 1e-8). Runs over slices: the norms and dot
    products are float64 sums over the key (four passes).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(spherical.multislerp, models, {"settings": settings, "with_base": with_base}, ctx, stats)


@merge_method(spaces=WEIGHT, elementwise=True, statistics=statistics_of(spherical.karcher),
              formula="the Fréchet mean of θᵢ/‖θᵢ‖ on the sphere (equal weights), times mean ‖θᵢ‖")
def mergekit_karcher(*models, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``karcher``: the equal-weight Karcher mean of every input (the base too) on the
    unit sphere, at most ``max_iter`` (10) steps until the tangent is below ``tol`` (1e-5),
    scaled by the mean norm. Runs over slices: each step's dot products and norms are float64
    sums over the key (three passes a step).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(spherical.karcher, models, {"settings": settings}, ctx, stats)


@merge_method(spaces=WEIGHT, elementwise=True, statistics=statistics_of(selective.sce),
              formula="base + Σ eᵢsᵢτᵢ / max(Σ eᵢsᵢ, 1e-6),  τᵢ top-variance entries, sᵢ ∝ mean τᵢ², eᵢ sign election")
def mergekit_sce(base, *models, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``sce``: the deltas kept where their variance across models is in the top
    ``select_topk`` fraction (of the entries whose variance is not zero; an exact selection over
    slices), weighted by their mean square (normalised), sign-elected (sum).

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(selective.sce, (base, *models), {"settings": settings}, ctx, stats)


@merge_method(spaces=WEIGHT, rowwise=True, statistics=statistics_of(selective.arcee_fusion),
              formula="base + (θ − base)·[|θ − base|·KL_row(softmax θ ‖ softmax base) ≥ median + 1.5·IQR]")
def mergekit_arcee_fusion(base, other, *, settings: str = "{}", stats=None, ctx=None):
    """mergekit's ``arcee_fusion``: the other model's changes where their importance (|change|
    times the row's KL divergence of the softmaxes) reaches median + 1.5 × the interquartile
    range; the quartiles are exact selections over every entry (mergekit samples a million
    entries of larger tensors). Runs over slices of whole rows.

    ``settings``: the config's parameters (global and per model) as JSON, resolved per key as mergekit does.
    """
    return replay(selective.arcee_fusion, (base, other), {"settings": settings}, ctx, stats)


MERGEKIT_METHODS = [*GTA_METHODS, mergekit_linear, mergekit_slerp, mergekit_nuslerp, mergekit_nearswap,
                    mergekit_model_stock, mergekit_passthrough, mergekit_multislerp,
                    mergekit_karcher, mergekit_sce, mergekit_arcee_fusion]
