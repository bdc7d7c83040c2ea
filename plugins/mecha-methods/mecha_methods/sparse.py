"""Task-vector methods that sparsify each model's delta before combining: TIES, DARE, DELLA,
Model Breadcrumbs.

Every method here takes a base and fine-tunes in weight space, works on the deltas
δᵢ = θᵢ − θ₀ of one key at a time, and returns weights θ₀ + alpha · combined(δ).
Sparsification looks at the whole tensor (top-k, ranks, random masks drawn for the whole key), so
none of these is element-wise: the engine always gives them whole tensors.
"""

from __future__ import annotations

from typing import Literal, get_args

from mecha_core.lazy import torch

from mecha_core import WEIGHT, merge_method

from ._checks import at_least, choice, fraction, model_weights
from ._precision import in_float32

_SPACES = {"base": WEIGHT, "models": WEIGHT}
# Literal annotations: the core checks the value when the recipe is built (naming its line)
Vote = Literal["sum", "count"]
Rescale = Literal["density", "l1", "none"]
Trim = Literal["top_k", "sd_mecha"]
_VOTES = get_args(Vote)
_TRIMS = get_args(Trim)
_RESCALES = get_args(Rescale)


# -- building blocks -----------------------------------------------------------------------------
def deltas_of(base: torch.Tensor, models: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    return [m - base for m in models]


def keep_top_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """``delta`` with all but its ``k`` largest-magnitude entries set to zero (exactly k kept)."""
    n = delta.numel()
    if k >= n:
        return delta.clone()
    flat = delta.reshape(-1)
    kept = torch.zeros_like(flat)
    if k > 0:
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        kept[idx] = flat[idx]
    return kept.reshape(delta.shape)


def keep_sd_mecha(delta: torch.Tensor, density: float) -> torch.Tensor:
    """sd-mecha's TIES trim (its ``filter_top_k``): keep every entry whose magnitude is at least
    the ``max(int((1 - density) * numel), 1)``-th smallest magnitude (in float32). That keeps
    ``numel − max(int((1 − density)·numel), 1) + 1`` entries — one more than ``int(density·numel)``
    when density·numel is a whole number, two more otherwise (the other rounding) — plus every
    entry equal to the threshold, which in half-precision weights is often hundreds more."""
    n = delta.numel()
    if n == 0:
        return delta.clone()
    kth = max(int((1 - density) * n), 1)
    threshold = delta.reshape(-1).abs().float().kthvalue(kth).values
    return delta * (delta.abs() >= threshold)


def elect_sign(deltas: list[torch.Tensor], vote: str) -> torch.Tensor:
    """TIES sign election: the sign of the summed deltas ("sum", magnitude-weighted) or of the
    summed signs ("count", one vote per model)."""
    if vote == "sum":
        return torch.sign(sum(deltas))
    return torch.sign(sum(torch.sign(d) for d in deltas))


def disjoint_mean(deltas: list[torch.Tensor], sign: torch.Tensor,
                  weights: list[float] | None = None) -> torch.Tensor:
    """Per entry, the mean of the non-zero deltas whose sign is the elected one (0 where none).

    With ``weights`` (the deltas already multiplied by them), the sum of the agreeing weighted
    deltas is divided by the sum of their weights, Σ mᵢwᵢδᵢ / Σ mᵢwᵢ (1 where that is 0), as
    mergekit's TIES does."""
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for i, d in enumerate(deltas):
        agrees = (torch.sign(d) == sign) & (d != 0)
        total += torch.where(agrees, d, torch.zeros_like(d))
        count += agrees.to(d.dtype) if weights is None else torch.where(agrees, weights[i], 0.0).to(d.dtype)
    if weights is None:
        return total / count.clamp(min=1)
    return total / torch.where(count == 0, torch.ones_like(count), count)


def ties_merge(deltas: list[torch.Tensor], vote: str, weights: list[float] | None = None) -> torch.Tensor:
    """TIES's elect and disjoint merge; with ``weights``, over the weighted deltas wᵢδᵢ."""
    if weights is not None:
        deltas = [w * d for w, d in zip(weights, deltas)]
    return disjoint_mean(deltas, elect_sign(deltas, vote), weights)


def bernoulli_mask(shape: torch.Size, keep_prob: torch.Tensor | float, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """A keep mask drawn from ``gen``. Always one full draw per model, whatever the values, so the
    masks of model i are the same whatever the other models are."""
    draw = torch.rand(shape, generator=gen, device=device, dtype=torch.float32)
    return draw < keep_prob


def rescaled(delta: torch.Tensor, mask: torch.Tensor, density: float, rescale: str) -> torch.Tensor:
    kept = torch.where(mask, delta, torch.zeros_like(delta))
    if rescale == "density":
        return kept / density
    if rescale == "l1":
        kept_l1 = kept.abs().sum()
        return kept * (delta.abs().sum() / kept_l1) if kept_l1 > 0 else kept
    return kept


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's keep probability: within each row (dim 0 of the tensor, the rest flattened) entries
    are ranked by magnitude, rank 0 the smallest; p = density - epsilon + 2·epsilon·rank/(n - 1)."""
    rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
    rank_norm = ranks.to(delta.dtype) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon + 2 * epsilon * rank_norm).reshape(delta.shape)


def middle_band(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Breadcrumbs mask: drop the int(gamma·n) largest magnitudes, keep the next int(density·n)."""
    n = delta.numel()
    flat = delta.reshape(-1)
    order = torch.argsort(flat.abs(), descending=True, stable=True)
    top = int(gamma * n)
    keep = order[top:top + int(density * n)]
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def _check_della(name: str, density: float, epsilon: float) -> tuple[float, float]:
    density = fraction(name, "density", density, zero_ok=False)
    epsilon = float(epsilon)
    if epsilon < 0 or density - epsilon <= 0 or density + epsilon > 1:
        from mecha_core.errors import MergeError

        raise MergeError(f"{name}(density={density}, epsilon={epsilon}): keep probabilities "
                         f"density ± epsilon must lie in (0, 1]")
    return density, epsilon


# -- TIES ----------------------------------------------------------------------------------------
@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * disjoint_mean(elect(top_k(δᵢ, int(density·numel))))")
@in_float32
def ties(base, *models, density: float = 0.2, alpha: float = 1.0, vote: Vote = "sum", weights: tuple = None,
         trim: Trim = "top_k"):
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Each model's delta δᵢ = θᵢ − base keeps only its int(density·numel) largest-magnitude entries
    (density = the fraction kept, per model). The elected sign per entry is sign(Σ trimmed δᵢ)
    with vote="sum" (the default; mergekit's "sum", magnitude-weighted), or sign(Σ sign(trimmed
    δᵢ)) with vote="count" (one vote per model: mergekit's "count", PEFT's "frequency",
    sd-mecha 1.x's default). The merged delta is the sum of the trimmed entries that agree with the
    elected sign divided by how many non-zero entries agree (at least 1); the result is
    base + alpha · merged. weights: one per model after the base (a recipe list); the trimmed
    deltas are multiplied by them before the election, and the agreeing ones are divided by the
    sum of their weights instead of their count (mergekit's weighted TIES). Default (null): 1 each.
    trim="sd_mecha" trims as sd-mecha does instead (recipes read from sd-mecha files use it): every
    entry at least as large as the max(int((1 − density)·numel), 1)-th smallest magnitude is kept:
    one or two entries more than int(density·numel), plus every entry tied with the threshold.
    """
    w = model_weights("ties", weights, len(models))
    vote = choice("ties", "vote", vote, _VOTES)
    trim = choice("ties", "trim", trim, _TRIMS)
    density = fraction("ties", "density", density)
    deltas = deltas_of(base, models)
    if trim == "sd_mecha":
        trimmed = [keep_sd_mecha(d, density) for d in deltas]
    else:
        k = int(density * base.numel())
        trimmed = [keep_top_k(d, k) for d in deltas]
    return base + alpha * ties_merge(trimmed, vote, w)


# -- DARE ----------------------------------------------------------------------------------------
def _dare_deltas(name: str, base, models, density, seed, rescale, ctx) -> list[torch.Tensor]:
    density = fraction(name, "density", density, zero_ok=False)
    rescale = choice(name, "rescale", rescale, _RESCALES)
    gen = ctx.generator(seed)
    out = []
    for d in deltas_of(base, models):
        mask = bernoulli_mask(d.shape, density, gen, d.device)
        out.append(rescaled(d, mask, density, rescale))
    return out


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * Σ mᵢ ⊙ δᵢ / density,  mᵢ ~ Bernoulli(density)")
@in_float32
def dare_linear(base, *models, density: float = 0.5, alpha: float = 1.0, seed: int = 0,
                rescale: Rescale = "density", weights: tuple = None, ctx=None):
    """DARE (Yu et al. 2023, "drop and rescale") with a plain sum of the task vectors.

    Each delta δᵢ = θᵢ − base keeps every entry with probability density (a Bernoulli mask mᵢ,
    a fresh one per model) and the kept entries are rescaled. rescale="density" (the default,
    the paper's and PEFT's) divides them by density, so the expected delta is unchanged;
    rescale="l1" (mergekit) scales the masked delta back to the L1 norm of the full delta;
    rescale="none" keeps them as they are. The result is base + alpha · Σ wᵢ · masked δᵢ, with
    weights one per model after the base (a recipe list; default null: 1 each, not normalised).

    The masks come from seed, the key name and the model's position only, so the same seed gives
    the same bytes whatever the thread count or key order (on one kind of device: CPU and CUDA
    draw different random numbers); a different seed gives different masks. Two DARE steps in one
    recipe with the same seed therefore draw the same masks (dare_linear(base, a) and
    dare_linear(base, b) keep the same entries): give steps that should be independent their own
    seeds. The masks are drawn for the whole
    tensor, so the engine does not split DARE keys into slices.
    """
    w = model_weights("dare_linear", weights, len(models))
    deltas = _dare_deltas("dare_linear", base, models, density, seed, rescale, ctx)
    if w is not None:
        deltas = [wi * d for wi, d in zip(w, deltas)]
    return base + alpha * sum(deltas)


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * disjoint_mean(elect(mᵢ ⊙ δᵢ / density))")
@in_float32
def dare_ties(base, *models, density: float = 0.5, alpha: float = 1.0, seed: int = 0,
              rescale: Rescale = "density", vote: Vote = "sum", weights: tuple = None, ctx=None):
    """DARE's drop and rescale, then the TIES sign election and disjoint mean instead of a sum.

    The masks and rescaling are exactly dare_linear's (the same masks for the same seed).

    density: keep probability of each delta entry. rescale: "density" (default, divide by
    density), "l1" (keep each delta's L1 norm) or "none". vote: "sum" (default, sign of the
    summed deltas) or "count" (sign of the summed signs), as in ties. seed: fixes the masks
    (per key, independent of threads). weights: per model, as in ties. Result: base + alpha · merged.
    """
    w = model_weights("dare_ties", weights, len(models))
    vote = choice("dare_ties", "vote", vote, _VOTES)
    deltas = _dare_deltas("dare_ties", base, models, density, seed, rescale, ctx)
    return base + alpha * ties_merge(deltas, vote, w)


# -- DELLA ---------------------------------------------------------------------------------------
def _della_deltas(name: str, base, models, density, epsilon, seed, ctx) -> list[torch.Tensor]:
    density, epsilon = _check_della(name, density, epsilon)
    gen = ctx.generator(seed)
    out = []
    for d in deltas_of(base, models):
        p = della_keep_prob(d, density, epsilon)
        mask = bernoulli_mask(d.shape, p, gen, d.device)
        out.append(torch.where(mask, d / p, torch.zeros_like(d)))
    return out


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * disjoint_mean(elect(mᵢ ⊙ δᵢ / pᵢ)),  mᵢ ~ Bernoulli(pᵢ), "
                      "pᵢ = density − epsilon + 2·epsilon·rank_norm(|δᵢ|)")
@in_float32
def della(base, *models, density: float = 0.5, epsilon: float = 0.1, alpha: float = 1.0,
          seed: int = 0, vote: Vote = "sum", ctx=None):
    """DELLA (Deep et al. 2024): magnitude-aware drop and rescale, then TIES sign election.

    Within each row of a delta δᵢ = θᵢ − base (dim 0; other dims flattened; a 1-D tensor is one
    row) entries are ranked by magnitude, rank_norm = rank / (n − 1) from 0 (smallest) to 1
    (largest). Each entry is kept with probability p = density − epsilon + 2·epsilon·rank_norm
    and kept entries are divided by their own p. Both density − epsilon > 0 and density + epsilon
    ≤ 1 are required. The masked deltas are then fused as in ties (vote "sum" by default, or
    "count"); the result is base + alpha · merged. seed fixes the masks per key, whatever the
    thread count. della_linear sums instead of electing signs.
    """
    vote = choice("della", "vote", vote, _VOTES)
    deltas = _della_deltas("della", base, models, density, epsilon, seed, ctx)
    return base + alpha * ties_merge(deltas, vote)


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * Σ mᵢ ⊙ δᵢ / pᵢ  (pᵢ as in della)")
@in_float32
def della_linear(base, *models, density: float = 0.5, epsilon: float = 0.1, alpha: float = 1.0,
                 seed: int = 0, ctx=None):
    """DELLA's magnitude-ranked drop and rescale, then a plain sum of the task vectors.

    As in della, the keep probability goes from density − epsilon for the smallest entry of a
    row up to density + epsilon for the largest, and kept entries are divided by their
    probability; the masked deltas are then summed: base + alpha · Σ masked δᵢ. seed fixes the
    masks per key, whatever the thread count.
    """
    deltas = _della_deltas("della_linear", base, models, density, epsilon, seed, ctx)
    return base + alpha * sum(deltas)


# -- Model Breadcrumbs ---------------------------------------------------------------------------
def _crumbs(name: str, base, models, density, gamma) -> list[torch.Tensor]:
    density = fraction(name, "density", density)
    gamma = fraction(name, "gamma", gamma)
    if density + gamma > 1:
        from mecha_core.errors import MergeError

        raise MergeError(f"{name}(density={density}, gamma={gamma}): density + gamma must be ≤ 1")
    return [middle_band(d, density, gamma) for d in deltas_of(base, models)]


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * Σ band(δᵢ)  (drop the top gamma and the bottom 1 − density − gamma by |δᵢ|)")
@in_float32
def breadcrumbs(base, *models, density: float = 0.9, gamma: float = 0.01, alpha: float = 1.0):
    """Model Breadcrumbs (Davari & Belilovsky 2023): keep the middle band of each task vector.

    Each delta δᵢ = θᵢ − base, ordered by magnitude, loses its int(gamma·numel) largest entries
    (outliers) and keeps the next int(density·numel); the smallest 1 − density − gamma are
    dropped too (density + gamma ≤ 1). The result is base + alpha · Σ kept δᵢ. breadcrumbs_ties
    fuses the kept deltas with the TIES election instead.
    """
    return base + alpha * sum(_crumbs("breadcrumbs", base, models, density, gamma))


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"),
              formula="base + alpha * disjoint_mean(elect(band(δᵢ)))")
@in_float32
def breadcrumbs_ties(base, *models, density: float = 0.9, gamma: float = 0.01, alpha: float = 1.0,
                     vote: Vote = "sum"):
    """Model Breadcrumbs' middle band of each task vector, then the TIES sign election.

    Each delta loses its top gamma fraction by magnitude and keeps the next density fraction;
    the kept deltas are fused by the TIES sign election (vote "sum" by default, or "count") and
    disjoint mean: base + alpha · merged.
    """
    vote = choice("breadcrumbs_ties", "vote", vote, _VOTES)
    return base + alpha * ties_merge(_crumbs("breadcrumbs_ties", base, models, density, gamma), vote)


SPARSE = [ties, dare_linear, dare_ties, della, della_linear, breadcrumbs, breadcrumbs_ties]
