"""sd-mecha 1.1.8's merge methods that mecha has no same-up-to-an-option counterpart for, with
sd-mecha's own definitions (its ``extensions/builtin/merge_methods``), so a recipe read from an
sd-mecha file computes what sd-mecha computes.

Each method takes and returns what sd-mecha's does (deltas where sd-mecha's take deltas), and
follows sd-mecha's order of operations, its special cases (``alpha == 0`` returns ``a``, NaN
results replaced) and, for the random ones, its random draws (see docs/recipe-format.md for
where seeds cannot match). Names start with ``sdmecha_``: they never hide a mecha method.
"""

from __future__ import annotations

import math
from typing import Any

from mecha_core.lazy import torch

from mecha_core import DELTA, PARAM, merge_method

from .working_sets import copies

from .rotate import sdmecha_rotate

_DELTAS = {"deltas": DELTA}


def _at_least_one(spaces: dict[str, Any]) -> None:
    if not any(label.startswith("deltas") for label in spaces):
        raise ValueError("needs at least one delta")


# -- masks (sd-mecha's linear.py): param-space tensors used as add_difference's alpha -------------
@merge_method(elementwise=True, returns=PARAM,
              formula="alpha · 1.8 · nan_to_num(|b − a| / (|b − a| + |b − c|))")
def sdmecha_train_difference_mask(a, b, c, *, alpha: float = 1.0):
    """sd-mecha's ``train_difference_mask``: per entry, how much of b − c to add to a (sd-mecha 1.x
    writes train difference as ``add_difference(a, b, c, alpha=train_difference_mask(a, b, c))``);
    alpha scales the mask; 0/0 gives 0."""
    ba = (b - a).abs()
    return alpha * 1.8 * torch.nan_to_num(ba / (ba + (b - c).abs()), nan=0)


@merge_method(elementwise=True, returns=PARAM,
              formula="alpha · 2 · nan_to_num(|a − b| / (|a − b| + |a + b − 2c|))")
def sdmecha_add_opposite_mask(a, b, c, *, alpha: float = 1.0):
    """sd-mecha's ``add_opposite_mask``: a param-space mask, large where a and b moved from c in
    opposite directions; alpha scales it; 0/0 gives 0."""
    ab = (a - b).abs()
    return alpha * 2 * torch.nan_to_num(ab / (ab + (a + b - 2 * c).abs()), nan=0)


@merge_method(elementwise=True, returns=PARAM,
              formula="alpha · 2 · max(nan_to_num((c − a)(b − c) / max(|a − c|, |b − c|)²), 0)")
def sdmecha_add_strict_opposite_mask(a, b, c, *, alpha: float = 1.0):
    """sd-mecha's ``add_strict_opposite_mask``: a param-space mask, non-zero only where a and b
    moved from c in strictly opposite directions; alpha scales it; 0/0 gives 0."""
    threshold = torch.maximum(torch.abs(a - c), torch.abs(b - c))
    return alpha * torch.clamp(torch.nan_to_num((c - a) * (b - c) / threshold ** 2, nan=0), 0) * 2


@merge_method(elementwise=True, spaces={"b": DELTA, "alpha": PARAM},
              formula="a + b · alpha  (alpha a param-space tensor)")
def sdmecha_add_difference_masked(a, b, alpha):
    """sd-mecha's ``add_difference(a, b, alpha=MASK)`` where the alpha is a tensor computed by a
    mask method (``sdmecha_train_difference_mask`` ...): ``a.addcmul(b, alpha)``."""
    return a.addcmul(b, alpha)


# -- linear.py ------------------------------------------------------------------------------------
@merge_method(working_set=copies(3), formula="b − a · Σ((a/‖a‖)(b/‖a‖));  0 where that is NaN")
def sdmecha_perpendicular_component(a, b):
    """sd-mecha's ``perpendicular_component``: the part of b orthogonal to a (flattened); zeros
    when the result has a NaN (a is zero)."""
    norm_a = torch.linalg.norm(a)
    res = b - a * (a / norm_a * (b / norm_a)).sum()
    if res.isnan().any():
        return torch.zeros_like(a)
    return res


@merge_method(elementwise=True, formula="Re(a^(1 − alpha) · b^alpha)  (complex powers)")
def sdmecha_geometric_sum(a, b, *, alpha: float = 0.5):
    """sd-mecha's ``geometric_sum``: the real part of a^(1 − alpha)·b^alpha taken in complex
    numbers (so negative entries give a real part of the complex power)."""
    ca = torch.complex(a, torch.zeros_like(a))
    cb = torch.complex(b, torch.zeros_like(b))
    return (ca ** (1 - alpha) * cb ** alpha).real


# -- model stock (ties.py) ------------------------------------------------------------------------
def model_stock_t(deltas: Any, cos_eps: float) -> Any:
    """sd-mecha's ``get_model_stock_t``: the mean cosine of consecutive deltas along the last
    dimension (one per row), t = n·cos / (1 + (n − 1)·cos), with a trailing dimension of 1."""
    n = len(deltas)
    cos = torch.nn.CosineSimilarity(dim=-1, eps=cos_eps)
    cos_theta = torch.stack([cos(deltas[i], deltas[i + 1]) for i in range(n - 1)]).mean(dim=0)
    return (n * cos_theta / (1 + (n - 1) * cos_theta)).unsqueeze(-1)


@merge_method(spaces=_DELTAS, returns=DELTA, check_spaces=_at_least_one, working_set=copies(1, 1),
              formula="nan_to_num(t · mean(deltas)),  t per row from consecutive cosines, unclamped")
def sdmecha_model_stock(*deltas, cos_eps: float = 1e-6):
    """sd-mecha's ``model_stock`` on deltas: their mean scaled by t = n·cos / (1 + (n − 1)·cos),
    where cos is the mean cosine of consecutive deltas along the last dimension (one t per row,
    not clamped; cos_eps guards the norms); NaN and infinities become 0."""
    w_avg = sum(deltas) / len(deltas)
    return torch.nan_to_num(model_stock_t(deltas, cos_eps) * w_avg)


# -- geometric median (ties.py), used by ties_sum_extended -----------------------------------------
def _weighted_average(points: Any, weights: Any = None) -> Any:
    if weights is not None:
        return sum(p * weights[i] for i, p in enumerate(points)) / sum(weights)
    return sum(points) / len(points)


def _objective(median: Any, points: Any, weights: Any) -> Any:
    return torch.mean(torch.stack([torch.dist(p, median) for p in points]) * weights)


def geometric_median(models: Any, eps: float, maxiter: int, ftol: float) -> Any:
    """sd-mecha's ``geometric_median`` (Weiszfeld iterations, its stopping rule and its final
    re-weighting) on a sequence of tensors."""
    median = _weighted_average(models)
    weights = new_weights = torch.ones(len(models), device=models[0].device, dtype=models[0].dtype)
    objective = _objective(median, models, weights)
    for _ in range(max(0, maxiter)):
        previous = objective
        denom = torch.stack([torch.dist(p, median) for p in models])
        new_weights = weights / torch.clamp(denom, min=eps)
        median = _weighted_average(models, new_weights)
        objective = _objective(median, models, weights)
        if abs(previous - objective) <= ftol * objective:
            break
    return _weighted_average(models, new_weights)


# -- TIES variants (ties.py) ----------------------------------------------------------------------
def filter_top_k(a: Any, k: float) -> Any:
    """sd-mecha's TIES trim: keep every entry at least as large as the max(int((1 − k)·numel), 1)-th
    smallest magnitude (ties with that threshold included)."""
    kth = max(int((1 - k) * a.numel()), 1)
    k_value, _ = a.flatten().abs().float().kthvalue(kth)
    return a * (a.abs() >= k_value).float()


def ties_sum_deltas(models: Any, k: float, vote_sgn: bool) -> tuple[Any, Any]:
    """sd-mecha's ``ties_sum_deltas``: the trimmed deltas stacked, zeroed where their sign is not
    the elected one (by summed values when vote_sgn, else by sign count), and the agreeing counts."""
    deltas = torch.stack([filter_top_k(m, k) for m in models], dim=0)
    signs = torch.sign(deltas)
    final_sign = torch.sign(torch.sum(deltas if vote_sgn else signs, dim=0))
    delta_filters = (signs == final_sign).float()
    return deltas * delta_filters, torch.sum(delta_filters, dim=0)


def ties_extended(models: Any, k: float, vote_sgn: bool, apply_stock: bool, apply_median: bool,
                  cos_eps: float, eps: float, maxiter: int, ftol: float) -> Any:
    filtered, counts = ties_sum_deltas(models, k, vote_sgn)
    if apply_median:
        filtered = geometric_median(list(filtered), eps, maxiter, ftol)
    else:
        # sd-mecha 1.1.8 applies Model Stock's t when apply_stock is false (and t = 1 when true)
        t = 1.0 if apply_stock else model_stock_t(filtered, cos_eps)
        filtered = filtered.sum(dim=0) * t / counts
    return torch.nan_to_num(filtered, nan=0, posinf=0, neginf=0)


@merge_method(spaces=_DELTAS, returns=DELTA, check_spaces=_at_least_one, working_set=copies(2, 4),
              formula="nan_to_num(Σ agreeing trimmed δᵢ · t / count)  or their geometric median")
def sdmecha_ties_sum_extended(*deltas, k: float = 0.2, vote_sgn: bool = False, apply_stock: bool = False,
                              apply_median: bool = False, cos_eps: float = 1e-6, eps: float = 1e-6,
                              maxiter: int = 100, ftol: float = 1e-20):
    """sd-mecha's ``ties_sum_extended`` on deltas: TIES with Model Stock or a geometric median.

    k keeps, per delta, every entry at least as large as its max(int((1 − k)·numel), 1)-th
    smallest magnitude; vote_sgn elects signs by summed values (true) or by sign count (false);
    apply_median takes the geometric median of the agreeing trimmed deltas (eps, maxiter, ftol:
    its Weiszfeld settings) instead of their mean; otherwise the mean of the agreeing entries is
    scaled by Model Stock's t (per row, cos_eps) when apply_stock is false and by 1 when it is
    true — sd-mecha 1.1.8's reading of the flag.
    """
    if deltas[0].numel() == 0:
        return deltas[0]
    return ties_extended(deltas, k, vote_sgn, apply_stock, apply_median, cos_eps, eps, maxiter, ftol)


def della_dropout(delta: Any, probability: float, della_eps: float, generator: Any) -> Any:
    """sd-mecha's ``find_della_dropout``: a Bernoulli keep-mask with probability 1 − probability,
    shifted per entry by della_eps times its centred magnitude rank (ordinal ranks: ties in
    order of position), drawn from ``generator``."""
    if not math.isclose(della_eps, 0.0):
        flat = delta.abs().flatten()
        # integer ranks, as scipy's rankdata gives them: divided by an int they become float32
        # (torch's default dtype), so the probabilities — and the bernoulli draws — are sd-mecha's
        ranks = torch.empty_like(flat, dtype=torch.int64)
        ranks[torch.argsort(flat, stable=True)] = torch.arange(1, flat.numel() + 1, device=flat.device)
        ne = delta.numel()
        delta_i = (ranks.reshape(delta.shape) / ne - (ne + 1) / (ne * 2)) * della_eps
        delta_i = delta_i.nan_to_num(nan=0, posinf=0, neginf=0)
    else:
        delta_i = 0.0
    p_min = torch.ones_like(delta) - probability
    return torch.bernoulli((p_min + delta_i).clamp(min=0, max=1), generator=generator)


@merge_method(spaces=_DELTAS, returns=DELTA, check_spaces=_at_least_one, working_set=copies(2, 5),
              formula="ties_sum_extended(δᵢ ⊙ mᵢ) / (1 − probability),  mᵢ ~ Bernoulli(1 − probability ± rank)")
def sdmecha_ties_sum_with_dropout(*deltas, probability: float = 0.9, della_eps: float = 0.0, rescale: bool = True,
                                  k: float = 0.2, vote_sgn: bool = False, apply_stock: bool = False,
                                  cos_eps: float = 1e-6, apply_median: bool = False, eps: float = 1e-6,
                                  maxiter: int = 100, ftol: float = 1e-20, seed=None, ctx=None):
    """sd-mecha's ``ties_sum_with_dropout`` (DARE/DELLA then extended TIES) on deltas.

    Each delta is multiplied by a keep-mask drawn as sd-mecha draws it: one ``torch.Generator``
    on the key's device per key, seeded with seed (null or negative: the generator's fixed
    initial seed, as sd-mecha leaves it), one ``torch.bernoulli`` per delta in order, with
    probability 1 − probability, plus della_eps times each entry's centred magnitude rank. Then
    ``sdmecha_ties_sum_extended`` (k, vote_sgn, apply_stock, cos_eps, apply_median, eps, maxiter,
    ftol) combines them; the result is divided by 1 − probability when rescale is true.
    probability = 1 gives a zero delta.
    """
    if math.isclose(probability, 1.0):
        return torch.zeros_like(deltas[0])
    generator = torch.Generator(ctx.device if ctx is not None else deltas[0].device)
    if seed is not None and seed >= 0:
        generator.manual_seed(seed)
    dropped = [d * della_dropout(d, probability, della_eps, generator) for d in deltas]
    if dropped[0].numel() == 0:
        return dropped[0]
    out = ties_extended(dropped, k, vote_sgn, apply_stock, apply_median, cos_eps, eps, maxiter, ftol)
    return out / (1.0 if not rescale else 1.0 - probability)


@merge_method(spaces=_DELTAS, returns=DELTA, check_spaces=_at_least_one, working_set=copies(2, 2),
              formula="Σ mᵢ ⊙ δᵢ / max(Σ mᵢ, 1) / (1 − probability)^rescale,  mᵢ ~ Bernoulli(1 − probability)")
def sdmecha_dropout(*deltas, probability: float = 0.9, rescale: float = 1.0, overlap: float = 1.0,
                    overlap_emphasis: float = 0.0, seed: int = 0):
    """sd-mecha's ``dropout`` (n-supermario) on deltas, with sd-mecha's random draws.

    Per key, ``numpy.random.default_rng(seed)`` draws one ``binomial(1, 1 − probability)`` mask
    per delta, in order (a fresh generator per key, as sd-mecha makes one). The kept entries are
    summed, divided by how many masks kept each entry (at least 1) and by
    (1 − probability)^rescale (1 when probability is 1 or that is not finite). Only an odd
    integer overlap (sd-mecha's default 1) is read; overlap_emphasis only matters for the
    others, which sd-mecha 1.1.8 itself fails on. sd-mecha's seed null (fresh entropy every run)
    cannot be reproduced: the reader refuses it.
    """
    import numpy as np

    if overlap % 2 != 1:
        raise ValueError(f"overlap={overlap} is not read (only odd integers: sd-mecha 1.1.8 fails on the others)")
    shape = deltas[0].shape
    rng = np.random.default_rng(seed)
    masks = [torch.from_numpy(rng.binomial(n=1, p=1 - probability, size=shape)).to(device=deltas[0].device,
                                                                                    dtype=torch.bool)
             for _ in deltas]
    final = torch.zeros_like(deltas[0])
    for mask, delta in zip(masks, deltas):
        final[mask] += delta[mask]
    if probability == 1.0:
        rescalar = 1.0
    else:
        rescalar = (1.0 - probability) ** rescale
        rescalar = rescalar if math.isfinite(rescalar) else 1
    return final / sum(masks).clamp(1) / rescalar


# -- crossover.py ---------------------------------------------------------------------------------
def crossover_filter(shape: tuple[int, ...], alpha: float, tilt: float, device: Any = None) -> Any:
    """sd-mecha's ``create_filter``: 0 for a's frequencies, 1 for b's, over rfftn bins."""
    if not 0 <= alpha <= 1:
        raise ValueError("alpha must be between 0 and 1")
    tilt -= math.floor(tilt // 4 * 4)
    inverted = tilt > 2
    if inverted:
        alpha = 1 - alpha
    gradients = list(reversed([
        torch.linspace(0, 1, s, device=device) if i == 0 or s == 1 else
        torch.cat([torch.linspace(0, (s - 1) // 2, s - s // 2, device=device),
                   torch.linspace(s // 2, 1, s // 2, device=device)]) / (s // 2)
        for i, s in enumerate(reversed(shape))
    ]))
    if len(shape) > 1:
        grids = torch.meshgrid(*(g ** 2 for g in gradients), indexing="ij")
        mesh = (torch.stack(grids).sum(dim=0) / len(shape)).sqrt()
    else:
        mesh = gradients[0]
    if tilt < 1e-10 or abs(tilt - 4) < 1e-10:
        out = (mesh > 1 - alpha).float()
    elif abs(tilt - 2) < 1e-10:
        out = (mesh < 1 - alpha).float()
    else:
        cot = 1 / math.tan(math.pi * tilt / 2)
        if tilt <= 1 or 2 < tilt <= 3:
            out = mesh * cot + alpha * cot + alpha - cot
        else:
            out = mesh * cot - alpha * cot + alpha
        out = out.clip(0, 1)
    return 1 - out if inverted else out


@merge_method(working_set=copies(5, per_dim=0.5),
              formula="irfftn((1 − F)·rfftn(a) + F·rfftn(b)),  F sd-mecha's tilted filter")
def sdmecha_crossover(a, b, *, alpha: float = 0.5, tilt: float = 0.0):
    """sd-mecha's ``crossover``: a's low frequencies with b's high ones, through sd-mecha's
    filter (a linear ramp per dimension of the rfftn bins, their RMS radius, cut at 1 − alpha and
    tilted by tilt: 0 a sharp cut, 1 a plain weighted sum with alpha). alpha 0 gives a, 1 gives b;
    0-d tensors and a ≈ b (allclose) are interpolated."""
    if alpha == 0:
        return a
    if alpha == 1:
        return b
    if tilt == 1 or a.dim() == 0 or torch.allclose(a, b):
        return torch.lerp(a, b, alpha)
    shape = tuple(a.shape)
    a_dft = torch.fft.rfftn(a, s=shape)
    b_dft = torch.fft.rfftn(b, s=shape)
    f = crossover_filter(tuple(a_dft.shape), alpha, tilt, device=a.device)
    return torch.fft.irfftn((1 - f) * a_dft + f * b_dft, s=shape)




# -- linear.py and slicing.py, the rest -------------------------------------------------------------
@merge_method(elementwise=True, formula="Re(a · (b/c)^(alpha·max(−ln|a/c|·ln|b/c| / max(|ln|a/c||, |ln|b/c||)², 0)))")
def sdmecha_multiply_quotient(a, b, c, *, alpha: float = 1.0):
    """sd-mecha's ``multiply_quotient``: a times (b/c) to a power that is alpha where a and b moved
    away from c in opposite log-directions and 0 elsewhere (complex powers; NaN gives a)."""
    ac_log = torch.log(a.abs()) - torch.log(c.abs())
    bc_log = torch.log(b.abs()) - torch.log(c.abs())
    cb = torch.complex(b, torch.zeros_like(b))
    cc = torch.complex(c, torch.zeros_like(c))
    threshold = torch.maximum(torch.abs(ac_log), torch.abs(bc_log))
    power = alpha * torch.clamp(-torch.nan_to_num(ac_log * bc_log / threshold ** 2, nan=0), 0)
    res = a * (cb / cc) ** power
    return torch.where(torch.isnan(res), a, res).real


@merge_method(elementwise=True, spaces={"a": DELTA}, returns=DELTA, formula="a · alpha")
def sdmecha_scale(a, *, alpha: float = 1.0):
    """sd-mecha's ``scale``: a delta times alpha (alpha 0 gives zeros, 1 gives a unchanged)."""
    if math.isclose(alpha, 0.0):
        return torch.zeros_like(a)
    if math.isclose(alpha, 1.0):
        return a
    return a * alpha


def ratio_to_region(width: float, offset: float, n: int) -> tuple[int, int, bool]:
    """sd-mecha's ``ratio_to_region``: [start, end) of n for a width and offset (fractions of n;
    a region past the end wraps around, which it reports as inverted)."""
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        return round(offset * n), round((width + offset) * n), False
    return round((width + offset - 1) * n), round(offset * n), True


@merge_method(rowwise=True, formula="a with rows [offset, offset + width)·rows taken from b")
def sdmecha_tensor_sum(a, b, *, width: float = 0.5, offset: float = 0.0, ctx=None):
    """sd-mecha's ``tensor_sum``: the rows (first dimension) from offset to offset + width (as
    fractions of the row count, wrapping around) come from b, the others from a; a 0-d tensor is
    b when width > 0.5, else a. Row-wise: large keys are merged in slices of whole rows."""
    shape = tuple(ctx.info.shape) if ctx is not None else tuple(a.shape)
    if len(shape) == 0:
        return b if width > 0.5 else a
    if a.numel() == 0:
        return a
    start, end, inverted = ratio_to_region(width, offset, shape[0])
    row = (ctx.info.numel if ctx is not None else a.numel()) // shape[0]
    first = (ctx.start if ctx is not None else 0) // row
    rows = torch.arange(first, first + a.numel() // row, device=a.device)
    take_b = ((rows >= start) & (rows < end)) != inverted  # inverted: the region keeps a
    return torch.where(take_b.unsqueeze(1), b.reshape(-1, row), a.reshape(-1, row)).reshape(a.shape)


def _kth_abs_value(a: Any, k: int) -> Any:
    if k <= 0:
        return torch.tensor(-1, device=a.device)
    return torch.kthvalue(torch.abs(a.float()), k)[0]


@merge_method(working_set=copies(11), formula="a's sorted values laid out in b's order, within a magnitude region of a")
def sdmecha_top_k_tensor_sum(a, b, *, width: float = 1.0, offset: float = 0.0):
    """sd-mecha's ``top_k_tensor_sum``: a's values, sorted, are redistributed in the order of b's
    values, for the entries whose magnitude lies in the region (width and offset as fractions of
    the entry count, wrapping around); the other entries keep a's values."""
    a_flat = torch.flatten(a)
    a_dist = torch.msort(a_flat)
    redist = torch.argsort(torch.argsort(torch.flatten(b), stable=True))
    start, end, inverted = ratio_to_region(width, offset, torch.numel(a))
    start_k, end_k = _kth_abs_value(a_dist, start), _kth_abs_value(a_dist, end)
    mask = (start_k <= torch.abs(a_dist)) & (torch.abs(a_dist) <= end_k)
    if inverted:
        mask = ~mask
    mask = torch.gather(mask.float(), 0, redist)
    a_redist = torch.gather(a_dist, 0, redist)
    return ((1 - mask) * a_flat + mask * a_redist).reshape_as(a)


SDMECHA_METHODS = [
    sdmecha_train_difference_mask, sdmecha_add_opposite_mask, sdmecha_add_strict_opposite_mask,
    sdmecha_add_difference_masked, sdmecha_perpendicular_component, sdmecha_geometric_sum, sdmecha_multiply_quotient,
    sdmecha_scale, sdmecha_model_stock, sdmecha_ties_sum_extended, sdmecha_ties_sum_with_dropout, sdmecha_dropout,
    sdmecha_crossover, sdmecha_tensor_sum, sdmecha_top_k_tensor_sum, sdmecha_rotate,
]
