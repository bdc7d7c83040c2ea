"""mergekit 0.1.5's ``sce`` and ``arcee_fusion`` as staged algorithms (:mod:`.staged`): their
whole-tensor top-k and quantiles are exact selections over slices of the key (``TopK``), their
means float64 sums, and the rest is mergekit's element-wise float32 arithmetic on each slice."""

from __future__ import annotations

from typing import Any

from mecha_core.lazy import torch

from .gta import work
from .params import Settings, as_float
from .spherical import f32, rows


# -- sce (merge_methods/sce.py) -------------------------------------------------------------------------
def sce(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    """Task vectors kept where their variance across models is among the top ``select_topk`` of
    the entries whose variance is not zero (ties between equal variances by the lower flat
    index: mergekit's ``torch.topk`` picks its own), weighted by their mean square, sign-elected."""
    cfg = Settings(hyper.get("settings", "{}"), getattr(ctx, "key", ""), ctx)
    base, *models = work(tensors)
    if not models:
        return base
    tvs = torch.stack([m - base for m in models])
    topk = cfg.shared("select_topk", as_float, 1.0)
    if topk < 1:
        if topk <= 0:
            mask = torch.zeros_like(tvs[0])
        else:
            # (an empty replay has no entries to take the variance of)
            var = torch.var(tvs, dim=0, unbiased=False) if tvs.shape[1:].numel() else torch.zeros_like(tvs[0])
            (nonzero,) = scalars.sums(nonzero=lambda: (var != 0).to(var.dtype))
            k = int(torch.tensor(int(round(nonzero))) * topk)  # as mergekit: an int64 tensor times a float
            mask = torch.zeros_like(var)
            if k > 0:
                selection = scalars.top("top", k, lambda: var.abs())
                mask = selection.mask(var.abs(), ctx).to(var.dtype)
        tvs = tvs * mask.unsqueeze(0)
    majority = (tvs.sum(dim=0) >= 0).to(tvs.dtype) * 2 - 1
    erase = (tvs.sign() == majority).to(tvs.dtype)
    squares = scalars.sums(**{f"square{i}": (lambda i=i: tvs[i].square()) for i in range(len(models))})
    numel = max(ctx.info.numel, 1)
    weights = torch.stack([f32(s, tvs) / numel for s in squares])
    total = float(weights.sum())
    weights = torch.ones_like(weights) / weights.shape[0] if abs(total) < 1e-6 else weights / total
    erased = weights.reshape(-1, *([1] * base.dim())) * erase
    return base + (tvs * erased).sum(dim=0) / erased.sum(dim=0).clamp(min=1e-6)


# -- arcee_fusion (merge_methods/arcee_fusion.py) -----------------------------------------------------
_SIGN = 1 << 31


def _order_key(values):
    """float32 values as non-negative float64 integers ordered as the floats (exact): the top-k
    of these is the top-k of the values, negative ones included."""
    bits = values.reshape(-1).contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits >= 0, bits + _SIGN, -1 - bits).to(torch.float64).reshape(values.shape)


def _from_key(key: float):
    bits = int(key)
    bits = bits - _SIGN if bits >= _SIGN else -1 - bits
    return torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0]


def arcee_fusion(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    """The other model's changes where their importance (|change| × the row's KL divergence of
    the softmaxes, within a slice of whole rows) reaches median + 1.5 × IQR; the quartiles are
    exact order statistics over every entry (mergekit samples a million entries of larger
    tensors)."""
    base, other = work(tensors[:2])
    shape = base.shape
    b, o = rows(base, ctx), rows(other, ctx)
    eps = 1e-8
    p = torch.softmax(o, dim=-1) + eps
    q = torch.softmax(b, dim=-1) + eps
    importance = ((o - b).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)).reshape(shape)
    n = ctx.info.numel
    if n == 0:
        return base
    at = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    if at[0] == 0:  # at most 4 entries (never sliced): the smallest is one of the quartiles
        ordered = torch.sort(importance.reshape(-1)).values
        if ordered.numel() < n:  # the empty replay that looks for the statistics: there are none
            return base
        q1, median, q3 = ordered[at]
        return base + (other - base) * (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
    quartiles = []
    for name, index in zip(("q1", "median", "q3"), at):  # the index-th smallest: the (n - index)-th largest
        if importance.dtype == torch.float32:
            selection = scalars.top(name, n - index, lambda: _order_key(importance))
            quartiles.append(_from_key(selection.threshold) if selection.threshold is not None
                             else torch.tensor(float("nan")))
        else:  # float64 inputs: importance is ≥ 0 but for rounding, ranked by magnitude
            selection = scalars.top(name, n - index, lambda: importance)
            quartiles.append(torch.tensor(selection.threshold if selection.threshold is not None else float("nan"),
                                          dtype=importance.dtype))
    q1, median, q3 = quartiles
    mask = (importance >= median + 1.5 * (q3 - q1)).to(base.dtype)
    return base + (other - base) * mask
