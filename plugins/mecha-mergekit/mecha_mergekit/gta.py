"""mergekit 0.1.5's generalized task arithmetic (``merge_methods/generalized_task_arithmetic.py``
with ``sparsify.py``): task_arithmetic, ties, dare_*, breadcrumbs*, della*, run in passes over
slices of a key, so a key of any size merges in bounded memory.

mergekit sorts every delta whole; here each sparsification is what it keeps, found by the core's
statistics (``mecha_core.TopK``: an exact top-k selection over slices, ``Total``: float64 sums):

- ``magnitude`` (ties): the ``max(1, int(density·n))`` largest ``|δ|``;
- ``magnitude_outliers`` (breadcrumbs): positions ``[n_bot, n_bot + int(density·n))`` of the
  ascending order, i.e. the top ``n − n_bot`` less the top ``n − n_bot − int(density·n)``;
- ``random`` (dare): each entry kept with probability ``density``;
- ``della_magprune`` (della): each entry kept with probability ``density − ε + 2ε·rank_norm``,
  ranked by ``|δ|`` within its row (dim 1 of the tensor; a 1-D tensor is one row).

Equal magnitudes are ordered by flat index, the lower first in the descending order (a stable
sort); mergekit's CPU ``argsort``/``sort`` are not stable (an introsort), so where only some of
the entries equal to a selection's bound are kept, mergekit keeps a different subset of them (the
same count, the same magnitude). Random masks come from ``MergeContext.uniform`` (seed, key,
model, position): the same bytes however the key is sliced. ``rescale`` (the L1 norm of the
delta over the L1 norm of what is kept) sums both in float64 over the whole key.

Everything else is mergekit's element-wise arithmetic, in its order, in float32.
"""

from __future__ import annotations

from typing import Any

import attrs
from mecha_core.lazy import torch

from mecha_core import WEIGHT, Then, TopK, Total, merge_method

from .params import Settings, as_bool, as_float

#: name: (consensus, sparsification, default normalize, default rescale)
GTA = {
    "task_arithmetic": (False, None, False, False),
    "ties": (True, "magnitude", True, False),
    "dare_ties": (True, "random", False, True),
    "dare_linear": (False, "random", False, True),
    "breadcrumbs": (False, "outliers", False, False),
    "breadcrumbs_ties": (True, "outliers", False, False),
    "della": (True, "della", True, True),
    "della_linear": (False, "della", False, True),
}


def work(tensors: tuple) -> tuple:
    """mergekit's compute dtype for float methods: float32 unless the inputs are float64."""
    dtype = torch.float64 if all(t.dtype == torch.float64 for t in tensors) else torch.float32
    return tuple(t.to(dtype) for t in tensors)


@attrs.frozen
class Sparsify:
    """How one model's delta is sparsified for one key."""

    method: str | None
    """``magnitude``, ``random``, ``outliers``, ``della``, or ``None`` (kept whole)."""
    density: float
    """The fraction kept (``density``)."""
    gamma: float = 0.0
    """breadcrumbs: the fraction of largest magnitudes dropped."""
    epsilon: float = 0.0
    """della: the spread of the keep probability."""

    @property
    def active(self) -> bool:
        """Whether the delta changes (mergekit returns it as is at density ≥ 1)."""
        return self.method is not None and self.density < 1


@attrs.frozen
class Resolved:
    """A GTA call's parameters for one key (mergekit resolves them per tensor)."""

    models: tuple[Sparsify, ...]
    """Each model's sparsification."""
    weights: tuple[float, ...]
    """Each model's ``weight``."""
    rescale: bool
    """Rescale the kept entries to the delta's L1 norm."""
    normalize: bool
    """Divide by the (agreeing) weights."""
    lam: float
    """``lambda``."""


def resolve(name: str, settings: str, ctx: Any, count: int) -> Resolved:
    consensus, method, normalize_default, rescale_default = GTA[name]
    cfg = Settings(settings, getattr(ctx, "key", ""), ctx)
    models = []
    for i in range(count):
        density = cfg.per_input(i, "density", as_float, 1.0)
        gamma = cfg.per_input(i, "gamma", as_float, 0.01) if method == "outliers" else 0.0
        epsilon = cfg.per_input(i, "epsilon", as_float, 0.15) if method == "della" else 0.0
        if method == "della" and density < 1 and density > 0 and (density + epsilon >= 1 or density - epsilon <= 0):
            raise ValueError("della: epsilon must leave density ± epsilon inside (0, 1)")
        models.append(Sparsify(method, density, gamma, epsilon))
    weights = tuple(cfg.per_input(i, "weight", as_float) for i in range(count))
    return Resolved(tuple(models), weights, cfg.shared("rescale", as_bool, rescale_default),
                    cfg.shared("normalize", as_bool, normalize_default), cfg.shared("lambda", as_float, 1.0))


def _delta(i: int):
    """``of`` for a statistic of model i's delta (the base is input 0)."""

    def of(ctx, base, *models):
        base, model = work((base, models[i]))
        return model - base

    return of


def selections(i: int, s: Sparsify, n: int) -> list[TopK]:
    """The exact selections model ``i``'s sparsification needs over a key of ``n`` elements."""
    if not s.active or n == 0 or (s.density <= 0 and s.method == "magnitude"):
        return []
    if s.method == "magnitude":
        return [TopK(f"keep{i}", _delta(i), max(1, int(s.density * n)))]
    if s.method == "outliers":
        target, top = int(s.density * n), int(s.gamma * n)
        bottom = max(0, n - target - top)
        return [TopK(f"upto{i}", _delta(i), n - bottom), TopK(f"over{i}", _delta(i), n - bottom - target)]
    return []


def _rows(tensor, ctx):
    """The piece as mergekit's della ranks it: rows along dim 1 of the key's shape (a 1-D key is
    one row); a slice of whole rows comes flattened."""
    shape = tuple(ctx.info.shape)
    if len(shape) < 2:
        return tensor.reshape(1, -1)
    return tensor.reshape(-1, *shape[1:])


def della_probabilities(delta, s: Sparsify, ctx):
    """della_magprune's keep probabilities (float32 arithmetic as mergekit's): ranks of |δ| along
    dim 1 (equal magnitudes by index), normalised to [0, 1], spread over density ± epsilon."""
    rows = _rows(delta, ctx)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).to(rows.dtype) + 1
    low, high = ranks.min(dim=1, keepdim=True).values, ranks.max(dim=1, keepdim=True).values
    rank_norm = ((ranks - low) / (high - low)).clamp(0, 1)
    return ((s.density - s.epsilon) + rank_norm * 2 * s.epsilon).reshape(delta.shape)


def masked(i: int, s: Sparsify, delta, ctx, stats: dict, seed: int):
    """``delta * mask`` of model ``i`` (mergekit multiplies by a float mask: -0.0 where a negative
    entry is dropped), before any rescale; ``stats``: the selections."""
    if not s.active:
        return delta
    if s.method == "magnitude" and (s.density <= 0 or ctx.info.numel == 0):
        return torch.zeros_like(delta)
    if s.method == "magnitude":
        mask = stats[f"keep{i}"].mask(delta.abs(), ctx)
    elif s.method == "outliers":
        magnitude = delta.abs()
        mask = stats[f"upto{i}"].mask(magnitude, ctx) & ~stats[f"over{i}"].mask(magnitude, ctx)
    elif s.method == "random":
        mask = ctx.uniform(seed, i) < s.density
    else:  # della
        if s.density <= 0:
            return torch.zeros_like(delta)
        mask = ctx.uniform(seed, i).to(delta.dtype) < della_probabilities(delta, s, ctx)
    return delta * mask.to(delta.dtype)


def rescaled(values, before: float, after: float, eps: float = 1e-7):
    """rescaled_masked_tensor's L1 step given the two norms (float64 sums over the key, then in
    the values' dtype as mergekit's sums are)."""
    b = torch.tensor(before, dtype=values.dtype)
    a = torch.tensor(after, dtype=values.dtype)
    if b < eps or a < eps:
        return values
    return values * (b / a)


def statistics_of(name: str):
    """The statistics of GTA method ``name``: each model's selections, and with ``rescale`` the
    L1 norms of its delta and of what it keeps (after the selections, when it has some)."""

    def statistics(ctx, inputs, *, settings="{}", seed=0, **_):
        r = resolve(name, settings, ctx, inputs - 1)
        n = ctx.info.numel
        first: list[Any] = []
        norms: list[int] = []
        for i, s in enumerate(r.models):
            first += selections(i, s, n)
            if r.rescale and s.active:
                first.append(Total(f"l1_{i}", lambda ctx, *inputs, i=i: _delta(i)(ctx, *inputs).abs()))
                norms.append(i)
        if not norms:
            return first

        def kept_norms(got):
            def kept(ctx, *inputs, i):
                return masked(i, r.models[i], _delta(i)(ctx, *inputs), ctx, got, seed).abs()

            return [Total(f"kept_l1_{i}", lambda ctx, *inputs, i=i: kept(ctx, *inputs, i=i)) for i in norms]

        if any(r.models[i].method in ("magnitude", "outliers") for i in norms):
            return [*first, Then(kept_norms)]
        return [*first, *kept_norms({})]

    return statistics


def combine(base, deltas: list, r: Resolved, consensus: bool):
    """Weighted sum (sign-elected with ``consensus``), normalised, times lambda, plus the base:
    mergekit's tensor operations in its order."""
    stacked = torch.stack(deltas)
    w = torch.tensor(r.weights, dtype=stacked.dtype, device=stacked.device).reshape(-1, *([1] * base.dim()))
    stacked = stacked * w
    if consensus:  # get_mask(method="sum"): the sign of the summed deltas, + where they cancel
        majority = (stacked.sum(dim=0) >= 0).to(stacked.dtype) * 2 - 1
        mask = (stacked.sign() == majority).to(stacked.dtype)
        mixed = (stacked * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = stacked.sum(dim=0)
        divisor = w.sum(dim=0).expand_as(mixed).clone()
        divisor[divisor.abs() < 1e-8] = 1
    if r.normalize:
        mixed = mixed / divisor
    if r.lam != 1:
        mixed = mixed * r.lam
    return base + mixed


def gta(name: str, base, models, settings: str, seed: int, stats: dict | None, ctx) -> Any:
    consensus, method, _, _ = GTA[name]
    r = resolve(name, settings, ctx, len(models))
    base, *models = work((base, *models))
    if not models:
        return base
    deltas = []
    for i, (model, s) in enumerate(zip(models, r.models)):
        delta = masked(i, s, model - base, ctx, stats or {}, seed)
        if r.rescale and s.active:
            delta = rescaled(delta, stats[f"l1_{i}"], stats[f"kept_l1_{i}"])
        deltas.append(delta)
    return combine(base, deltas, r, consensus)


_SETTINGS_NOTE = ("``settings``: the config's parameters (global and per model) as JSON, resolved per key as "
                  "mergekit does.")


def gta_method(name: str, formula: str):
    consensus, method, normalize_default, _ = GTA[name]

    if method is None:
        def function(base, *models, settings: str = "{}", seed: int = 0, ctx=None):
            return gta(name, base, models, settings, seed, None, ctx)
    else:
        def function(base, *models, settings: str = "{}", seed: int = 0, stats=None, ctx=None):
            return gta(name, base, models, settings, seed, stats, ctx)

    where = {"magnitude": "the top-k by |δ| (an exact selection over slices)",
             "outliers": "the band of |δ| (two exact selections over slices)",
             "random": "a Bernoulli mask drawn per entry position from ``seed`` and the key",
             "della": "a Bernoulli mask whose probability rises with the rank of |δ| in its row"}
    function.__doc__ = (
        f"mergekit's ``{name}`` (generalized task arithmetic): deltas from the base"
        + (f", each sparsified to {where[method]}" if method else "")
        + f", weighted, {'sign-elected (sum; ties elect +), ' if consensus else ''}summed, normalised when "
        f"``normalize`` (default {normalize_default}), times ``lambda``. Runs over slices of a key: "
        f"norms are float64 sums over the whole key.\n\n{_SETTINGS_NOTE} ``seed``: the seed of the random "
        f"draws (combined with the key, the model and the entry's position).")
    function.__name__ = f"mergekit_{name}"
    if method is None:  # task_arithmetic: each output entry is its own inputs'
        return merge_method(function, name=f"mergekit_{name}", spaces=WEIGHT, formula=formula, elementwise=True)
    return merge_method(function, name=f"mergekit_{name}", spaces=WEIGHT, formula=formula,
                        elementwise=method != "della", rowwise=method == "della", statistics=statistics_of(name))


GTA_METHODS = [
    gta_method("task_arithmetic", "base + λ·Σ wᵢδᵢ  (÷ Σ wᵢ when normalize)"),
    gta_method("ties", "base + λ·Σ mᵢwᵢ top_k(δᵢ) / Σ mᵢwᵢ,  mᵢ = sign agrees with sign Σ (≥ 0 → +)"),
    gta_method("dare_ties", "base + λ·Σ mᵢwᵢ bern(δᵢ)·‖δᵢ‖₁/‖bern(δᵢ)‖₁  (sum; ÷ Σ mᵢwᵢ when normalize)"),
    gta_method("dare_linear", "base + λ·Σ wᵢ bern(δᵢ)·‖δᵢ‖₁/‖bern(δᵢ)‖₁"),
    gta_method("breadcrumbs", "base + λ·Σ wᵢ band(δᵢ)"),
    gta_method("breadcrumbs_ties", "base + λ·Σ mᵢwᵢ band(δᵢ)  (sum; ÷ Σ mᵢwᵢ when normalize)"),
    gta_method("della", "base + λ·Σ mᵢwᵢ magprune(δᵢ)·‖δᵢ‖₁/‖kept‖₁ / Σ mᵢwᵢ"),
    gta_method("della_linear", "base + λ·Σ wᵢ magprune(δᵢ)·‖δᵢ‖₁/‖kept‖₁"),
]
