"""Task-vector methods that sparsify each model's delta before combining: TIES, DARE, DELLA,
Model Breadcrumbs.

Every method here takes a base and fine-tunes in weight space, works on the deltas
δᵢ = θᵢ − θ₀ of one key at a time, and returns weights θ₀ + alpha · combined(δ).
Sparsification looks at the whole tensor, but only through statistics the engine computes in
passes over slices (``statistics=``): the k largest magnitudes (an exact selection, ties going to
the lower flat index, as a stable descending sort orders them) and L1 norms. The random masks
are drawn per element position (``MergeContext.uniform``), so they are the same however the key
is sliced. Given those, TIES, DARE, DARE-TIES and Breadcrumbs are element-wise and run on
slices of a large key in bounded memory. DELLA ranks magnitudes within each row: it is row-wise,
and runs on slices of whole rows.
"""

from __future__ import annotations

from typing import Literal, get_args

from mecha_core.lazy import torch

from mecha_core import WEIGHT, TopK, Total, merge_method

from . import _native
from ._checks import at_least, choice, fraction, model_weights
from ._native import _float32_below
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


_SAME_SIZE_INT = {2: "int16", 4: "int32", 8: "int64"}


def kept(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, values, 0.0)``, bit for bit (NaN and -0.0 included), as a bitwise and
    of the values' bit patterns: torch's CPU ``where`` on an irregular mask costs 10-20 ns per
    element, this about 1."""
    if values.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or not values.is_contiguous():
        return torch.where(mask, values, 0.0)
    itype = getattr(torch, _SAME_SIZE_INT[values.element_size()])
    return (values.view(itype) & mask.to(itype).neg_()).view(values.dtype)


def keep_selected(delta: torch.Tensor, selection, ctx) -> torch.Tensor:
    """``delta`` with every entry the ``TopK`` selection of its magnitudes left out set to zero."""
    return kept(delta, selection.mask(delta.abs(), ctx))


def keep_at_least(delta: torch.Tensor, selection) -> torch.Tensor:
    """sd-mecha's TIES trim (its ``filter_top_k``) given the selection of its threshold: keep
    every entry whose magnitude is at least the ``max(int((1 - density) * numel), 1)``-th
    smallest magnitude (in float32), ties included."""
    if selection.threshold is None:
        return delta.clone() if selection.k >= selection.numel else torch.zeros_like(delta)
    return delta * (delta.abs() >= selection.threshold)


def _model_delta(i: int):
    """``of`` for a statistic of model i's delta (the base is input 0)."""
    def of(ctx, base, *models):
        return models[i] - base
    return of


def _sd_mecha_rank(density: float, n: int) -> int:
    """The position from the top of sd-mecha's threshold, the max(int((1-d)·n), 1)-th smallest."""
    return n - max(int((1 - density) * n), 1) + 1


def elect_sign(deltas: list[torch.Tensor], vote: str) -> torch.Tensor:
    """TIES sign election: the sign of the summed deltas ("sum", magnitude-weighted) or of the
    summed signs ("count", one vote per model)."""
    if vote == "sum":
        total = deltas[0] + deltas[1] if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            total += d
        return total.sign_()
    return torch.sign(sum(torch.sign(d) for d in deltas))


def disjoint_mean(deltas: list[torch.Tensor], sign: torch.Tensor,
                  weights: list[float] | None = None) -> torch.Tensor:
    """Per entry, the mean of the non-zero deltas whose sign is the elected one (0 where none).

    With ``weights`` (the deltas already multiplied by them), the sum of the agreeing weighted
    deltas is divided by the sum of their weights, Σ mᵢwᵢδᵢ / Σ mᵢwᵢ (1 where that is 0), as
    mergekit's TIES does."""
    total = count = None
    for i, d in enumerate(deltas):
        # sign(d) == sign and d != 0, in one comparison (sign is -1, 0, 1 or NaN); the agreeing
        # deltas share a sign, so their sum never cancels to a zero of the other sign
        agrees = (d * sign) > 0
        part = kept(d, agrees)
        weight = agrees.to(d.dtype) if weights is None else kept(torch.full_like(d, weights[i]), agrees)
        if total is None:
            total, count = part, weight
        else:
            total += part
            count += weight
    assert total is not None and count is not None
    if weights is None:
        return total / count.clamp_(min=1)
    return total / torch.where(count == 0, 1.0, count)


def ties_merge(deltas: list[torch.Tensor], vote: str, weights: list[float] | None = None) -> torch.Tensor:
    """TIES's elect and disjoint merge; with ``weights``, over the weighted deltas wᵢδᵢ."""
    if weights is not None:
        deltas = [w * d for w, d in zip(weights, deltas)]
    return disjoint_mean(deltas, elect_sign(deltas, vote), weights)


def ties_merge_owned(deltas: list[torch.Tensor], vote: str) -> torch.Tensor:
    """:func:`ties_merge` without weights, bit for bit, for deltas the caller no longer needs
    (they are overwritten): fewer passes over memory and no boolean masks when every delta is
    a contiguous float32 tensor of one shape and finite where it counts (see
    :func:`_elect_and_merge_in_place`); otherwise :func:`ties_merge` itself."""
    fast = _elect_and_merge_in_place(deltas, vote) if _same_float32(deltas) else None
    return fast if fast is not None else ties_merge(deltas, vote)


def _same_float32(tensors: list[torch.Tensor]) -> bool:
    first = tensors[0]
    return all(t.dtype == torch.float32 and t.is_contiguous() and t.shape == first.shape and t.device == first.device
               for t in tensors)


def _elect_and_merge_in_place(deltas: list[torch.Tensor], vote: str) -> torch.Tensor | None:
    """:func:`disjoint_mean` of :func:`elect_sign`, bit for bit, overwriting ``deltas``; ``None``
    (the deltas untouched) when a vote is not finite, where that arithmetic would differ.

    With a finite elected sign s (-1, 0 or 1), delta i agrees where pᵢ = max(δᵢ·s, 0) > 0, and
    pᵢ is then |δᵢ| exactly; the agreeing deltas share a sign, so the old sum of the agreeing
    deltas is s·Σpᵢ exactly (rounding to nearest is symmetric), and their count is Σ sign(pᵢ).
    Where none agrees that product is ±0; adding +0.0 makes it the +0.0 the old sum gave."""
    if vote == "sum":
        votes = deltas[0] + deltas[1] if len(deltas) > 1 else deltas[0].clone()
        for d in deltas[2:]:
            votes += d
        check = votes
    else:
        votes = torch.sign(sum(torch.sign(d) for d in deltas))
        check = None
    # a NaN vote (a NaN delta, or +inf and -inf) agrees with nothing, an infinite delta with a
    # zero vote gives inf·0: such slices take the plain definition
    if check is not None:
        if not torch.isfinite(check.sum()):
            return None
    elif not all(bool(torch.isfinite(d.sum())) for d in deltas):
        return None
    sign = votes.sign_()
    total = count = None
    for d in deltas:
        agreeing = d.mul_(sign).clamp_(min=0)
        if total is None:
            total, count = agreeing, torch.sign(agreeing)
        else:
            total += agreeing
            count += agreeing.sign_()
    assert total is not None and count is not None
    total.mul_(sign).add_(0.0)
    return total.div_(count.clamp_(min=1))


def trim_in_place(delta: torch.Tensor, selection, ctx) -> torch.Tensor | None:
    """``keep_selected(delta, selection, ctx)`` in ``delta``'s own memory, bit for bit, for a
    contiguous float32 delta whose selection has a threshold t: one ``hardshrink`` per range
    (it keeps x where |x| > its lambda and writes +0.0 elsewhere), with lambda the float32 just
    below t up to the last tie kept (|x| >= t) and t itself after it (|x| > t); about 1 ns
    per element where the boolean mask and ``where`` took 10-20. ``None`` (``delta`` untouched)
    otherwise. A NaN delta is kept here where the definition drops it; the election then sees
    a NaN vote, :func:`_elect_and_merge_in_place` declines, and ``ties`` computes the slice by
    the definition from its inputs again."""
    if selection.threshold is None or delta.dtype != torch.float32 or not delta.is_contiguous():
        return None
    flat = delta.view(-1)
    cut = selection.last_tie + 1 - ctx.start  # the piece's elements are in flat order
    if cut >= flat.numel():  # every tie in the piece is kept: magnitude >= threshold
        _keep_at_least(flat, selection.threshold)
    elif cut <= 0:  # no tie kept: magnitude > threshold
        _keep_above(flat, selection.threshold)
    else:
        _keep_at_least(flat[:cut], selection.threshold)
        _keep_above(flat[cut:], selection.threshold)
    return delta


def _keep_above(values: torch.Tensor, threshold: float) -> None:
    """Set to +0.0 every element whose magnitude is not above ``threshold`` (NaN is kept)."""
    torch.hardshrink(values, threshold, out=values)


def _keep_at_least(values: torch.Tensor, threshold: float) -> None:
    """Set to +0.0 every element whose magnitude is below ``threshold`` (NaN is kept): above
    the float32 just below it, the floats being discrete. A threshold of 0 (or NaN) keeps all."""
    if threshold > 0:
        _keep_above(values, _float32_below(threshold))


def dare_mask(ctx, seed: int, model: int, density: float) -> torch.Tensor:
    """DARE's keep mask of model ``model``: each entry kept with probability density, drawn per
    element position from seed and the key (the same however the key is sliced, and the masks of
    model i are the same whatever the other models are)."""
    return ctx.uniform(seed, model) < density


def della_keep_prob(delta: torch.Tensor, density: float, epsilon: float, row: int | None = None) -> torch.Tensor:
    """DELLA's keep probability: within each row (dim 0 of the tensor, the rest flattened) entries
    are ranked by magnitude, rank 0 the smallest; p = density - epsilon + 2·epsilon·rank/(n - 1).
    ``row``: the row length, for a flattened slice of whole rows."""
    if row is not None:
        rows = delta.reshape(-1, row)
    else:
        rows = delta.reshape(delta.shape[0], -1) if delta.dim() >= 2 else delta.reshape(1, -1)
    n = rows.shape[1]
    order = torch.argsort(rows.abs(), dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(n, device=delta.device).expand_as(order))
    rank_norm = ranks.to(delta.dtype) / (n - 1) if n > 1 else torch.full_like(rows, 0.5)
    return (density - epsilon + 2 * epsilon * rank_norm).reshape(delta.shape)


def _check_della(name: str, density: float, epsilon: float) -> tuple[float, float]:
    density = fraction(name, "density", density, zero_ok=False)
    epsilon = float(epsilon)
    if epsilon < 0 or density - epsilon <= 0 or density + epsilon > 1:
        from mecha_core.errors import MergeError

        raise MergeError(f"{name}(density={density}, epsilon={epsilon}): keep probabilities "
                         f"density ± epsilon must lie in (0, 1]")
    return density, epsilon


# -- TIES ----------------------------------------------------------------------------------------
def _ties_statistics(ctx, inputs, *, density=0.2, trim="top_k", **_):
    density = fraction("ties", "density", density)
    trim = choice("ties", "trim", trim, _TRIMS)
    n = ctx.info.numel
    k = _sd_mecha_rank(density, n) if trim == "sd_mecha" else int(density * n)
    return [TopK(f"trim{i}", _model_delta(i), k) for i in range(inputs - 1)]


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), elementwise=True,
              statistics=_ties_statistics,
              formula="base + alpha * disjoint_mean(elect(top_k(δᵢ, int(density·numel))))")
@in_float32
def ties(base, *models, density: float = 0.2, alpha: float = 1.0, vote: Vote = "sum", weights: tuple = None,
         trim: Trim = "top_k", stats=None, ctx=None):
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint merge.

    Each model's delta δᵢ = θᵢ − base keeps only its int(density·numel) largest-magnitude entries
    (density = the fraction kept, per model; among equal magnitudes at the threshold the entries
    of lower flat index are kept, as a stable descending sort orders them). The elected sign per
    entry is sign(Σ trimmed δᵢ)
    with vote="sum" (the default; mergekit's "sum", magnitude-weighted), or sign(Σ sign(trimmed
    δᵢ)) with vote="count" (one vote per model: mergekit's "count", PEFT's "frequency",
    sd-mecha 1.x's default). The merged delta is the sum of the trimmed entries that agree with the
    elected sign divided by how many non-zero entries agree (at least 1); the result is
    base + alpha · merged. weights: one per model after the base (a recipe list); the trimmed
    deltas are multiplied by them before the election, and the agreeing ones are divided by the
    sum of their weights instead of their count (mergekit's weighted TIES). Default (null): 1 each.
    trim="sd_mecha" trims as sd-mecha does instead (recipes read from sd-mecha files use it): every
    entry at least as large as the max(int((1 − density)·numel), 1)-th smallest magnitude is kept:
    one or two entries more than int(density·numel), plus every entry tied with the threshold. The
    selection is exact and computed over slices, so large keys run in bounded memory.
    """
    w = model_weights("ties", weights, len(models))
    vote = choice("ties", "vote", vote, _VOTES)
    trim = choice("ties", "trim", trim, _TRIMS)
    if trim == "top_k" and w is None:
        # one compiled loop over the slice where this machine builds it: the same bits
        done = _native.ties(base, list(models), [stats[f"trim{i}"] for i in range(len(models))],
                            ctx.start, vote, alpha)
        if done is not None:
            return done
    merged = _ties_in_place(base, models, stats, ctx, vote) if trim == "top_k" and w is None else None
    if merged is not None:  # this call's own tensor: the same sum, added in place (x + y == y + x)
        return (merged if alpha == 1 else merged.mul_(alpha)).add_(base)
    deltas = deltas_of(base, models)
    if trim == "sd_mecha":
        trimmed = [keep_at_least(d, stats[f"trim{i}"]) for i, d in enumerate(deltas)]
    else:
        trimmed = [keep_selected(d, stats[f"trim{i}"], ctx) for i, d in enumerate(deltas)]
    merged = ties_merge(trimmed, vote, w)
    return base + (merged if alpha == 1 else alpha * merged)


def _ties_in_place(base, models, stats, ctx, vote: str) -> torch.Tensor | None:
    """TIES's merged delta (trim="top_k", no weights) by :func:`trim_in_place` and
    :func:`_elect_and_merge_in_place`, bit for bit; ``None`` where those do not apply (the
    caller then computes the definition from the inputs again)."""
    if not _same_float32([base, *models]):
        return None
    trimmed = []
    for i, m in enumerate(models):
        t = trim_in_place(m - base, stats[f"trim{i}"], ctx)
        if t is None:
            return None
        trimmed.append(t)
    return _elect_and_merge_in_place(trimmed, vote)


# -- DARE ----------------------------------------------------------------------------------------
def _dare_statistics(name: str):
    """The statistics of DARE method ``name``: the L1 norms of rescale="l1", else none."""

    def statistics(ctx, inputs, *, density=0.5, seed=0, rescale="density", **_):
        density = fraction(name, "density", density, zero_ok=False)
        rescale = choice(name, "rescale", rescale, _RESCALES)
        return _dare_l1(inputs, density, seed) if rescale == "l1" else []

    return statistics


def _dare_l1(inputs: int, density: float, seed: int) -> list:
    out = []
    for i in range(inputs - 1):
        delta = _model_delta(i)

        def kept(ctx, *inputs, i=i, delta=delta):
            d = delta(ctx, *inputs).abs()
            return torch.where(dare_mask(ctx, seed, i, density), d, torch.zeros_like(d))

        out += [Total(f"l1_{i}", lambda ctx, *inputs, delta=delta: delta(ctx, *inputs).abs()),
                Total(f"kept_l1_{i}", kept)]
    return out


def _dare_deltas(name: str, base, models, density, seed, rescale, ctx, stats) -> list[torch.Tensor]:
    density = fraction(name, "density", density, zero_ok=False)
    rescale = choice(name, "rescale", rescale, _RESCALES)
    out = []
    for i, d in enumerate(deltas_of(base, models)):
        masked = kept(d, dare_mask(ctx, seed, i, density))
        if rescale == "density":
            masked = masked / density
        elif rescale == "l1" and stats[f"kept_l1_{i}"] > 0:
            masked = masked * (stats[f"l1_{i}"] / stats[f"kept_l1_{i}"])
        out.append(masked)
    return out


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), elementwise=True,
              statistics=_dare_statistics("dare_linear"),
              formula="base + alpha * Σ mᵢ ⊙ δᵢ / density,  mᵢ ~ Bernoulli(density)")
@in_float32
def dare_linear(base, *models, density: float = 0.5, alpha: float = 1.0, seed: int = 0,
                rescale: Rescale = "density", weights: tuple = None, stats=None, ctx=None):
    """DARE (Yu et al. 2023, "drop and rescale") with a plain sum of the task vectors.

    Each delta δᵢ = θᵢ − base keeps every entry with probability density (a Bernoulli mask mᵢ,
    a fresh one per model) and the kept entries are rescaled. rescale="density" (the default,
    the paper's and PEFT's) divides them by density, so the expected delta is unchanged;
    rescale="l1" (mergekit) scales the masked delta back to the L1 norm of the full delta;
    rescale="none" keeps them as they are. The result is base + alpha · Σ wᵢ · masked δᵢ, with
    weights one per model after the base (a recipe list; default null: 1 each, not normalised).

    The masks come from seed, the key name, the model's position and each entry's position
    only, so the same seed gives the same bytes whatever the thread count, key order or slice
    size (on one kind of device: CPU and CUDA draw different random numbers); a different seed
    gives different masks. Two DARE steps in one recipe with the same seed therefore draw the
    same masks (dare_linear(base, a) and dare_linear(base, b) keep the same entries): give steps
    that should be independent their own seeds. The L1 norms of rescale="l1" are summed over
    slices in float64, so large keys run in bounded memory.
    """
    w = model_weights("dare_linear", weights, len(models))
    deltas = _dare_deltas("dare_linear", base, models, density, seed, rescale, ctx, stats)
    if w is not None:
        deltas = [wi * d for wi, d in zip(w, deltas)]
    return base + alpha * sum(deltas)


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), elementwise=True,
              statistics=_dare_statistics("dare_ties"),
              formula="base + alpha * disjoint_mean(elect(mᵢ ⊙ δᵢ / density))")
@in_float32
def dare_ties(base, *models, density: float = 0.5, alpha: float = 1.0, seed: int = 0,
              rescale: Rescale = "density", vote: Vote = "sum", weights: tuple = None, stats=None, ctx=None):
    """DARE's drop and rescale, then the TIES sign election and disjoint mean instead of a sum.

    The masks and rescaling are exactly dare_linear's (the same masks for the same seed).

    density: keep probability of each delta entry. rescale: "density" (default, divide by
    density), "l1" (keep each delta's L1 norm) or "none". vote: "sum" (default, sign of the
    summed deltas) or "count" (sign of the summed signs), as in ties. seed: fixes the masks
    (per key and entry, independent of threads and slicing). weights: per model, as in ties.
    Result: base + alpha · merged.
    """
    w = model_weights("dare_ties", weights, len(models))
    vote = choice("dare_ties", "vote", vote, _VOTES)
    deltas = _dare_deltas("dare_ties", base, models, density, seed, rescale, ctx, stats)
    merged = ties_merge(deltas, vote, w) if w is not None else ties_merge_owned(deltas, vote)
    return base + alpha * merged


# -- DELLA ---------------------------------------------------------------------------------------
def _della_deltas(name: str, base, models, density, epsilon, seed, ctx) -> list[torch.Tensor]:
    density, epsilon = _check_della(name, density, epsilon)
    out = []
    shape = tuple(ctx.info.shape)
    row = ctx.info.numel // shape[0] if len(shape) >= 2 and shape[0] else ctx.info.numel
    for i, d in enumerate(deltas_of(base, models)):
        p = della_keep_prob(d, density, epsilon, row)
        mask = ctx.uniform(seed, i) < p
        out.append(kept(d / p, mask))
    return out


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), rowwise=True,
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
    return base + alpha * ties_merge_owned(deltas, vote)


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), rowwise=True,
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
def _crumbs_check(name: str, density, gamma) -> tuple[float, float]:
    density = fraction(name, "density", density)
    gamma = fraction(name, "gamma", gamma)
    if density + gamma > 1:
        from mecha_core.errors import MergeError

        raise MergeError(f"{name}(density={density}, gamma={gamma}): density + gamma must be ≤ 1")
    return density, gamma


def _crumbs_statistics(name: str):
    """The statistics of Breadcrumbs method ``name``: two selections per model, the band's bounds."""

    def statistics(ctx, inputs, *, density=0.9, gamma=0.01, **_):
        density, gamma = _crumbs_check(name, density, gamma)
        n = ctx.info.numel
        top = int(gamma * n)
        out = []
        for i in range(inputs - 1):
            out += [TopK(f"top{i}", _model_delta(i), top),
                    TopK(f"upto{i}", _model_delta(i), top + int(density * n))]
        return out

    return statistics


def _crumbs(name: str, base, models, density, gamma, stats, ctx) -> list[torch.Tensor]:
    _crumbs_check(name, density, gamma)
    out = []
    for i, d in enumerate(deltas_of(base, models)):
        magnitude = d.abs()
        band = stats[f"upto{i}"].mask(magnitude, ctx) & ~stats[f"top{i}"].mask(magnitude, ctx)
        out.append(kept(d, band))
    return out


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), elementwise=True,
              statistics=_crumbs_statistics("breadcrumbs"),
              formula="base + alpha * Σ band(δᵢ)  (drop the top gamma and the bottom 1 − density − gamma by |δᵢ|)")
@in_float32
def breadcrumbs(base, *models, density: float = 0.9, gamma: float = 0.01, alpha: float = 1.0, stats=None,
                ctx=None):
    """Model Breadcrumbs (Davari & Belilovsky 2023): keep the middle band of each task vector.

    Each delta δᵢ = θᵢ − base, ordered by magnitude (a stable sort: equal magnitudes by flat
    index), loses its int(gamma·numel) largest entries (outliers) and keeps the next
    int(density·numel); the smallest 1 − density − gamma are dropped too (density + gamma ≤ 1).
    The result is base + alpha · Σ kept δᵢ. breadcrumbs_ties fuses the kept deltas with the TIES
    election instead. The band's bounds are exact selections computed over slices.
    """
    return base + alpha * sum(_crumbs("breadcrumbs", base, models, density, gamma, stats, ctx))


@merge_method(spaces=_SPACES, returns=WEIGHT, check_spaces=at_least(1, "model"), elementwise=True,
              statistics=_crumbs_statistics("breadcrumbs_ties"),
              formula="base + alpha * disjoint_mean(elect(band(δᵢ)))")
@in_float32
def breadcrumbs_ties(base, *models, density: float = 0.9, gamma: float = 0.01, alpha: float = 1.0,
                     vote: Vote = "sum", stats=None, ctx=None):
    """Model Breadcrumbs' middle band of each task vector, then the TIES sign election.

    Each delta loses its top gamma fraction by magnitude and keeps the next density fraction;
    the kept deltas are fused by the TIES sign election (vote "sum" by default, or "count") and
    disjoint mean: base + alpha · merged.
    """
    vote = choice("breadcrumbs_ties", "vote", vote, _VOTES)
    return base + alpha * ties_merge_owned(_crumbs("breadcrumbs_ties", base, models, density, gamma, stats, ctx), vote)


SPARSE = [ties, dare_linear, dare_ties, della, della_linear, breadcrumbs, breadcrumbs_ties]
