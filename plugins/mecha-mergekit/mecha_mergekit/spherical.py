"""mergekit 0.1.5's norm- and angle-based methods (``model_stock``, ``nuslerp``, ``multislerp``,
``karcher``) as staged algorithms (:mod:`.staged`): mergekit's element-wise float32 arithmetic
in its order, on each slice of a key, with its whole-tensor norms and dot products summed over
the key in float64 (then rounded to float32 as mergekit's results are). So a key of any size runs
in bounded memory, and its norms are accurate however large it is (mergekit's float32 sums
drift with the size: the last bit of a scalar can differ from mergekit's even on small keys)."""

from __future__ import annotations

import math
from typing import Any

from mecha_core.lazy import torch

from .gta import work
from .params import Settings, as_bool, as_float


def f32(value: float, like) -> Any:
    """A whole-key reduction as mergekit holds it: a 0-dim tensor of the work dtype."""
    return torch.tensor(value, dtype=like.dtype)


def norm(total: float, like) -> Any:
    """``torch.norm`` of the key from its float64 sum of squares, rounded once."""
    return torch.tensor(math.sqrt(max(total, 0.0)), dtype=like.dtype)


def rows(tensor, ctx):
    """The piece with the key's trailing dims (a flattened slice of whole rows back in rows); a
    1-D key stays 1-D."""
    shape = tuple(ctx.info.shape)
    return tensor.reshape(-1, *shape[1:]) if len(shape) >= 2 else tensor.reshape(-1)


def _cfg(hyper: dict, ctx) -> Settings:
    return Settings(hyper.get("settings", "{}"), getattr(ctx, "key", ""), ctx)


# -- model_stock (merge_methods/model_stock.py) --------------------------------------------------------
def _stock_t(cosines: list, count: int):
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def model_stock(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    cfg = _cfg(hyper, ctx)
    w0, *ws = work(tensors)
    shape = w0.shape
    if cfg.shared("filter_wise", as_bool, False):  # per row (dim -1): within a slice of whole rows
        w0, ws = rows(w0, ctx), [rows(w, ctx) for w in ws]
        if w0.dim() == 1:
            w0, ws = w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, oa in enumerate(offsets):
            for ob in offsets[i + 1:]:
                norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
                cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        t = _stock_t(cosines, len(ws))
        return (t * (sum(ws) / len(ws)) + (1 - t) * w0).reshape(shape)
    w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offsets = [w - w0 for w in ws]
    pairs = [(i, j) for i in range(len(offsets)) for j in range(i + 1, len(offsets))]
    found = scalars.sums(**{f"sq{i}": (lambda o=o: o * o) for i, o in enumerate(offsets)},
                         **{f"dot{i}_{j}": (lambda i=i, j=j: offsets[i] * offsets[j]) for i, j in pairs})
    sq, dots = found[:len(offsets)], found[len(offsets):]
    cosines = [(f32(dot, w0) / (norm(sq[i], w0) * norm(sq[j], w0)).clamp(min=1e-6)).clamp(-1, 1)
               for (i, j), dot in zip(pairs, dots)]
    t = _stock_t(cosines, len(ws))
    return (t * (sum(ws) / len(ws)) + (1 - t) * w0).reshape(shape)


# -- nuslerp (merge_methods/nuslerp.py) -------------------------------------------------------------
def _slerp_with(t: float, v0, v1, cos):
    """nuslerp's interpolation given cos θ (one per row, or one)."""
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


def _unit(x):
    return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)


def nuslerp(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    cfg = _cfg(hyper, ctx)
    w0, w1 = cfg.per_input(0, "weight", as_float), cfg.per_input(1, "weight", as_float)
    total = w0 + w1
    t = 0.5 if abs(total) < 1e-6 else w1 / total
    row_wise = cfg.shared("nuslerp_row_wise", as_bool, False)
    flatten = cfg.shared("nuslerp_flatten", as_bool, True)
    if len(tensors) > 2 and tensors[2] is not None:
        a, b, c = work(tensors[:3])
        v0, v1 = a - c, b - c
    else:
        (v0, v1), c = work(tensors[:2]), None
    shape = v0.shape
    if flatten:  # one vector: its norms, then the dot product of the unit vectors, over the key
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
        sq0, sq1 = scalars.sums(sq0=lambda: v0 * v0, sq1=lambda: v1 * v1)
        u0, u1 = v0 / norm(sq0, v0).clamp(min=1e-7), v1 / norm(sq1, v1).clamp(min=1e-7)
        (dot,) = scalars.sums(dot=lambda: u0 * u1)
        result = _slerp_with(t, v0, v1, f32(dot, v0).clamp(-1, 1).reshape(1))
    elif row_wise and len(ctx.info.shape) >= 2:  # one vector per column: sums per column over the key
        per = ctx.info.numel // ctx.info.shape[0]
        v0, v1 = v0.reshape(-1, per), v1.reshape(-1, per)
        sq0, sq1 = scalars.sums_per(per, sq0=lambda: v0 * v0, sq1=lambda: v1 * v1)
        n0 = torch.sqrt(sq0).to(v0.dtype).clamp(min=1e-7)
        n1 = torch.sqrt(sq1).to(v1.dtype).clamp(min=1e-7)
        u0, u1 = v0 / n0, v1 / n1
        (dot,) = scalars.sums_per(per, dot=lambda: u0 * u1)
        result = _slerp_with(t, v0, v1, dot.to(v0.dtype).clamp(-1, 1))
    else:  # one vector per row (dim -1): within a slice of whole rows (a 1-D key is one row)
        v0, v1 = rows(v0, ctx), rows(v1, ctx)
        cos = torch.sum(_unit(v0) * _unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
        result = _slerp_with(t, v0, v1, cos)
    result = result.reshape(shape)
    return result if c is None else c + result


# -- multislerp (merge_methods/multislerp.py) -------------------------------------------------------
def multislerp(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    cfg = _cfg(hyper, ctx)
    with_base = hyper.get("with_base", False)
    base, models = (tensors[0], tensors[1:]) if with_base else (None, tensors)
    eps = cfg.shared("eps", as_float, 1e-8)
    if len(models) == 1:
        return models[0]
    xs = torch.stack(work(models))
    shape = xs.shape[1:]
    if base is not None:
        xs = xs - base.to(xs.dtype)
    flat = xs.reshape(xs.shape[0], -1)
    weights = torch.tensor([cfg.per_input(i, "weight", as_float) for i in range(len(models))], dtype=xs.dtype)
    if cfg.shared("normalize_weights", as_bool, True):
        weights = weights / weights.sum()
    squares = scalars.sums(**{f"sq{i}": (lambda i=i: flat[i] * flat[i]) for i in range(len(models))})
    norms = torch.stack([norm(s, flat) for s in squares]).reshape(-1, 1)
    units = flat / (norms + eps)
    mean = (units * weights.view(-1, 1)).sum(0)
    (mean_sq,) = scalars.sums(mean_sq=lambda: mean * mean)
    mean_norm = norm(mean_sq, flat)
    if mean_norm < eps:
        if xs.shape[0] != 2:
            raise ValueError("multislerp: the weighted sum of the inputs is zero")
        result = (xs[0] * weights[0] + xs[1] * weights[1]).reshape(shape)
        return result + base.to(xs.dtype) if base is not None else result
    mean = mean / mean_norm
    dots = scalars.sums(**{f"dot{i}": (lambda i=i: units[i] * mean) for i in range(len(models))})
    tangents = units - torch.stack([f32(d, flat) for d in dots]).reshape(-1, 1) * mean
    tangent = (tangents * weights.view(-1, 1)).sum(0)
    (tangent_sq,) = scalars.sums(tangent_sq=lambda: tangent * tangent)
    tangent_norm = norm(tangent_sq, flat) + eps
    result = mean * torch.cos(tangent_norm) + tangent * (torch.sin(tangent_norm) / tangent_norm)
    result = (result * (norms.squeeze(-1) * weights).sum()).reshape(shape)
    return result + base.to(xs.dtype) if base is not None else result


# -- karcher (merge_methods/karcher.py) -------------------------------------------------------------
def karcher(tensors: tuple, hyper: dict, ctx, scalars) -> Any:
    cfg = _cfg(hyper, ctx)
    max_iter = int(cfg.shared("max_iter", as_float, 10))
    tol = cfg.shared("tol", as_float, 1e-5)
    xs = work(tensors)
    if len(xs) == 1:
        return xs[0]
    alphas = [1.0 / len(xs)] * len(xs)
    squares = scalars.sums(**{f"sq{i}": (lambda x=x: x * x) for i, x in enumerate(xs)})
    norms = [norm(s, xs[0]) for s in squares]
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
    (mean_sq,) = scalars.sums(mean_sq=lambda: mean * mean)
    mean_norm = norm(mean_sq, mean)
    mean = vunits[0].clone() if float(mean_norm) < tol else mean / mean_norm
    for step in range(max_iter):
        found = scalars.sums(**{f"dot{step}_{i}": (lambda u=u, m=mean: m * u) for i, u in enumerate(vunits)})
        tangent = torch.zeros_like(mean)
        for w, u, d in zip(weights, vunits, found):
            dot = torch.clamp(f32(d, mean), -1.0, 1.0)
            theta = torch.arccos(dot)
            if float(theta) < tol:
                continue
            tangent = tangent + w * (theta / torch.sin(theta)) * (u - dot * mean)
        (tangent_sq,) = scalars.sums(**{f"tangent{step}": lambda tg=tangent: tg * tg})
        tangent_norm = norm(tangent_sq, mean)
        if float(tangent_norm) < tol:
            break
        mean = torch.cos(tangent_norm) * mean + torch.sin(tangent_norm) * (tangent / tangent_norm)
        (unit_sq,) = scalars.sums(**{f"unit{step}": lambda m=mean: m * m})
        unit_norm = norm(unit_sq, mean)
        if float(unit_norm) > tol:
            mean = mean / unit_norm
    return sum(a * n for a, n in zip(alphas, norms)) * mean
