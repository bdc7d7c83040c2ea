"""mergekit's whole-key methods run over slices of a key (statistics passes, then element-wise
passes): each equals a plain-torch whole-tensor computation of mergekit 0.1.5's definition
written here (its float32 element-wise arithmetic; its whole-tensor sums taken exactly: float64,
rounded once), on bfloat16 inputs with few distinct values (many equal magnitudes at every
threshold), and a key cut into many slices gives the same bytes as the key merged whole."""

from __future__ import annotations

import json
import math

import mecha_core as mecha
import pytest
import torch
from mecha_core.method import MergeContext
from mecha_core.specs import TensorInfo
from mecha_core.testing import read_tensors, write_checkpoint
from mecha_mergekit import methods as mk

SHAPES = {"w.weight": (40, 24), "b.bias": (50,)}
SLICE = 64  # elements per slice: the 960-element key in 15 slices


def _models(tmp_path, count=3, seed=0):
    """A base and ``count`` fine-tunes, bfloat16, on a coarse grid (few distinct deltas)."""
    gen = torch.Generator().manual_seed(seed)
    paths = []
    base = {k: (torch.randint(-8, 8, s, generator=gen) / 8).to(torch.bfloat16) for k, s in SHAPES.items()}
    for i in range(count + 1):
        tensors = base if i == 0 else {
            k: (v.float() + torch.randint(-3, 4, v.shape, generator=gen) / 16 * (1 + i % 2)).to(torch.bfloat16)
            for k, v in base.items()}
        paths.append(write_checkpoint(tmp_path / f"m{i}.safetensors", tensors))
    return paths, [{k: v.float() for k, v in read_tensors(p).items()} for p in paths]


def _merge(tmp_path, method, paths, settings, name, sliced, **kw):
    recipe = method(*[mecha.model(p) for p in paths], settings=json.dumps(settings), **kw)
    extra = {"chunk_elements": SLICE, "memory_budget": 1 << 20} if sliced else {}
    out = mecha.merge(recipe, tmp_path / f"{name}-{'s' if sliced else 'w'}.safetensors", output_dtype="float32",
                      threads=2, **extra)
    return read_tensors(out)


def _both(tmp_path, method, paths, settings, name, **kw):
    """The merge with every key whole and cut into slices: the same bytes."""
    whole = _merge(tmp_path, method, paths, settings, name, False, **kw)
    sliced = _merge(tmp_path, method, paths, settings, name, True, **kw)
    for key in whole:
        assert torch.equal(whole[key], sliced[key]), key
        assert whole[key].view(torch.int32).equal(sliced[key].view(torch.int32)), key  # -0.0 too
    return whole


# -- plain-torch mergekit definitions (ties among equal magnitudes: the lower flat index first) --
def _order(delta):
    return torch.argsort(delta.abs().reshape(-1), descending=True, stable=True)


def ref_magnitude(delta, density):
    if density >= 1:
        return delta
    n = delta.numel()
    mask = torch.zeros(n)
    mask[_order(delta)[:max(1, int(density * n))]] = 1
    return delta * mask.reshape(delta.shape)


def ref_outliers(delta, density, gamma):
    if density >= 1:
        return delta
    n = delta.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n)
    mask[_order(delta)[n - bottom - target:n - bottom]] = 1  # mergekit: ascending order [bottom, bottom+target)
    return delta * mask.reshape(delta.shape)


def ref_rescale(delta, masked):
    before, after = delta.double().abs().sum().float(), masked.double().abs().sum().float()
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_gta(base, deltas, weights, consensus, normalize, lam=1.0):
    stacked = torch.stack(deltas) * torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    w = torch.tensor(weights).reshape(-1, *([1] * base.dim()))
    if consensus:
        mask = stacked.sign() == ((stacked.sum(0) >= 0).float() * 2 - 1)
        mixed, divisor = (stacked * mask).sum(0), (w * mask).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = stacked.sum(0), w.sum(0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if lam != 1:
        mixed = mixed * lam
    return base + mixed


METHOD = {m.name: m for m in mk.MERGEKIT_METHODS}


@pytest.mark.parametrize("name,consensus,normalize", [("ties", True, True), ("ties", True, False)])
def test_ties_magnitude_selection_with_many_equal_magnitudes(tmp_path, name, consensus, normalize):
    paths, t = _models(tmp_path)
    settings = {"global": {"normalize": normalize}, "inputs": [
        {"weight": 1.0, "density": 0.3}, {"weight": 0.5, "density": 0.55}, {"weight": -0.3, "density": 0.07}]}
    got = _both(tmp_path, METHOD["mergekit_ties"], paths, settings, "ties")
    for key in SHAPES:
        base = t[0][key]
        deltas = [ref_magnitude(t[i + 1][key] - base, d) for i, d in enumerate([0.3, 0.55, 0.07])]
        want = ref_gta(base, deltas, [1.0, 0.5, -0.3], consensus, normalize)
        assert torch.equal(got[key], want), key
        # the bound really is tied: some, not all, of the entries equal to it are kept
        delta = t[1][key] - base
        k = int(0.3 * delta.numel())
        bound = delta.abs().reshape(-1)[_order(delta)[k - 1]]
        assert 0 < int((ref_magnitude(delta, 0.3).abs() == bound).sum()) < int((delta.abs() == bound).sum())


def test_ties_rescale_uses_the_kept_l1_norm(tmp_path):
    paths, t = _models(tmp_path, count=2)
    settings = {"global": {"rescale": True, "lambda": 0.8}, "inputs": [
        {"weight": 1.0, "density": 0.25}, {"weight": 0.7, "density": 0.6}]}
    got = _both(tmp_path, METHOD["mergekit_ties"], paths[:3], settings, "ties_rescale")
    for key in SHAPES:
        base = t[0][key]
        deltas = [ref_rescale(t[i + 1][key] - base, ref_magnitude(t[i + 1][key] - base, d))
                  for i, d in enumerate([0.25, 0.6])]
        want = ref_gta(base, deltas, [1.0, 0.7], True, True, 0.8)
        assert torch.allclose(got[key], want, rtol=0, atol=0), key


@pytest.mark.parametrize("name,consensus", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_band_with_many_equal_magnitudes(tmp_path, name, consensus):
    paths, t = _models(tmp_path)
    params = [{"weight": 1.0, "density": 0.6, "gamma": 0.1}, {"weight": 0.5, "density": 0.35},
              {"weight": 0.8, "density": 0.95, "gamma": 0.2}]  # the last: n_bot clamped at 0
    got = _both(tmp_path, METHOD[f"mergekit_{name}"], paths, {"inputs": params}, name)
    for key in SHAPES:
        base = t[0][key]
        deltas = [ref_outliers(t[i + 1][key] - base, p["density"], p.get("gamma", 0.01)) for i, p in enumerate(params)]
        assert torch.equal(got[key], ref_gta(base, deltas, [p["weight"] for p in params], consensus, False)), key


def _uniform(key, seed, stream):
    """The draws mecha gives an entry (seed, key, model, position): the method's random input."""
    return MergeContext(key, TensorInfo(SHAPES[key], "float32")).uniform(seed, stream)


@pytest.mark.parametrize("name,consensus,normalize", [("dare_linear", False, False), ("dare_ties", True, False)])
def test_dare_masks_and_l1_rescale(tmp_path, name, consensus, normalize):
    paths, t = _models(tmp_path)
    params = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3}, {"weight": 0.2, "density": 1.0}]
    got = _both(tmp_path, METHOD[f"mergekit_{name}"], paths, {"inputs": params}, name, seed=7)
    for key in SHAPES:
        base = t[0][key]
        deltas = []
        for i, p in enumerate(params):
            delta = t[i + 1][key] - base
            if p["density"] < 1:
                delta = ref_rescale(delta, delta * (_uniform(key, 7, i) < p["density"]).float())
            deltas.append(delta)
        assert torch.equal(got[key], ref_gta(base, deltas, [p["weight"] for p in params], consensus, normalize)), key


@pytest.mark.parametrize("name,consensus,normalize", [("della", True, True), ("della_linear", False, False)])
def test_della_row_ranks_and_l1_rescale(tmp_path, name, consensus, normalize):
    paths, t = _models(tmp_path, count=2)
    params = [{"weight": 1.0, "density": 0.5, "epsilon": 0.2}, {"weight": 0.5, "density": 0.4}]
    got = _both(tmp_path, METHOD[f"mergekit_{name}"], paths[:3], {"inputs": params}, name, seed=3)
    for key in SHAPES:
        base = t[0][key]
        deltas = []
        for i, p in enumerate(params):
            delta = t[i + 1][key] - base
            rows = delta if delta.dim() == 2 else delta.reshape(1, -1)
            n = rows.shape[1]
            ranks = torch.empty(rows.shape)
            for r in range(rows.shape[0]):  # rank 0 the smallest |δ| of the row, equal ones by index
                ranks[r, torch.argsort(rows[r].abs(), stable=True)] = torch.arange(n, dtype=torch.float32)
            eps = p.get("epsilon", 0.15)
            probs = ((p["density"] - eps) + (ranks / (n - 1)) * 2 * eps).reshape(delta.shape)
            deltas.append(ref_rescale(delta, delta * (_uniform(key, 3, i) < probs).float()))
        want = ref_gta(base, deltas, [p["weight"] for p in params], consensus, normalize)
        torch.testing.assert_close(got[key], want, rtol=0, atol=2e-7)


# -- norm-, angle- and selection-based methods ------------------------------------------------------
def s64(values) -> torch.Tensor:
    """A whole-tensor sum as the definition takes it: exact (float64), rounded to float32."""
    return torch.tensor(float(values.to(torch.float64).sum()), dtype=torch.float32)


def n64(x) -> torch.Tensor:
    return torch.tensor(math.sqrt(float((x * x).to(torch.float64).sum())), dtype=torch.float32)


def _check(got, want_of, t):
    for key in SHAPES:
        want = want_of([m[key] for m in t], key)
        assert torch.equal(got[key], want), (key, float((got[key] - want).abs().max()))


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock(tmp_path, filter_wise):
    paths, t = _models(tmp_path)
    got = _both(tmp_path, METHOD["mergekit_model_stock"], paths, {"global": {"filter_wise": filter_wise}}, "stock")

    def want(xs, key):
        w0, ws = xs[0], xs[1:]
        if filter_wise:
            w0, ws = (w0.unsqueeze(0), [w.unsqueeze(0) for w in ws]) if w0.dim() == 1 else (w0, ws)
        else:
            w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i, oa in enumerate(offsets):
            for ob in offsets[i + 1:]:
                if filter_wise:  # per row: mergekit's own torch reductions
                    norms = torch.norm(oa, dim=-1) * torch.norm(ob, dim=-1)
                    cosines.append(((oa * ob).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
                else:
                    cosines.append((s64(oa * ob) / (n64(oa) * n64(ob)).clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        t_ = torch.where((1 + (n - 1) * cos).abs() < 1e-6, torch.zeros_like(cos), n * cos / (1 + (n - 1) * cos))
        return (t_ * (sum(ws) / n) + (1 - t_) * w0).reshape(xs[0].shape)

    _check(got, want, t)


def _slerp(t, v0, v1, cos):
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    result = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * v0 + t * v1, result)


@pytest.mark.parametrize("mode", ["flatten", "row_wise", "rows"])
def test_nuslerp_with_a_base(tmp_path, mode):
    paths, t = _models(tmp_path, count=2)
    settings = {"global": {"nuslerp_flatten": mode == "flatten", "nuslerp_row_wise": mode == "row_wise"},
                "inputs": [{"weight": 1.0}, {"weight": 3.0}]}
    got = _both(tmp_path, METHOD["mergekit_nuslerp"], [paths[1], paths[2], paths[0]], settings, f"nuslerp_{mode}")

    def want(xs, key):
        base, a, b = xs
        v0, v1 = a - base, b - base
        shape = v0.shape
        if mode == "flatten" or v0.dim() == 1:
            v0, v1 = v0.reshape(-1), v1.reshape(-1)
            u0, u1 = v0 / n64(v0).clamp(min=1e-7), v1 / n64(v1).clamp(min=1e-7)
            result = _slerp(0.75, v0, v1, s64(u0 * u1).clamp(-1, 1).reshape(1))
        elif mode == "row_wise":  # columns: mergekit transposes dim 0 to the end
            v0, v1 = v0.T, v1.T
            n0 = torch.stack([n64(r) for r in v0]).unsqueeze(-1).clamp(min=1e-7)
            n1 = torch.stack([n64(r) for r in v1]).unsqueeze(-1).clamp(min=1e-7)
            cos = torch.stack([s64(r) for r in (v0 / n0) * (v1 / n1)]).unsqueeze(-1).clamp(-1, 1)
            result = _slerp(0.75, v0, v1, cos).T
        else:
            def unit(x):
                return x / torch.norm(x, dim=-1, keepdim=True).clamp(min=1e-7)
            result = _slerp(0.75, v0, v1, torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1))
        return base + result.reshape(shape)

    _check(got, want, t)


def test_multislerp_with_a_base(tmp_path):
    paths, t = _models(tmp_path)
    settings = {"inputs": [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}]}
    got = _both(tmp_path, METHOD["mergekit_multislerp"], paths, settings, "multislerp", with_base=True)

    def want(xs, key):
        base = xs[0]
        flat = torch.stack([x - base for x in xs[1:]]).reshape(3, -1)
        weights = torch.tensor([1.0, 2.0, 0.5])
        weights = weights / weights.sum()
        norms = torch.stack([n64(r) for r in flat]).reshape(-1, 1)
        units = flat / (norms + 1e-8)
        mean = (units * weights.view(-1, 1)).sum(0)
        mean = mean / n64(mean)
        dots = torch.stack([s64(u * mean) for u in units]).reshape(-1, 1)
        tangent = ((units - dots * mean) * weights.view(-1, 1)).sum(0)
        tn = n64(tangent) + 1e-8
        result = mean * torch.cos(tn) + tangent * (torch.sin(tn) / tn)
        return (result * (norms.squeeze(-1) * weights).sum()).reshape(base.shape) + base

    _check(got, want, t)


def test_karcher(tmp_path):
    paths, t = _models(tmp_path, count=2)
    got = _both(tmp_path, METHOD["mergekit_karcher"], paths[:3], {"global": {"max_iter": 6, "tol": 1e-7}}, "karcher")
    steps = []

    def want(xs, key):
        alphas = [1 / 3] * 3
        norms = [n64(x) for x in xs]
        units = [x / n for x, n in zip(xs, norms)]
        mean = torch.zeros_like(units[0])
        for u in units:
            mean = mean + (1 / 3) * u
        mean = mean / n64(mean)
        taken = 0
        for _ in range(6):
            tangent = torch.zeros_like(mean)
            for u in units:
                dot = torch.clamp(s64(mean * u), -1.0, 1.0)
                theta = torch.arccos(dot)
                if float(theta) < 1e-7:
                    continue
                tangent = tangent + (1 / 3) * (theta / torch.sin(theta)) * (u - dot * mean)
            tn = n64(tangent)
            if float(tn) < 1e-7:
                break
            taken += 1
            mean = torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)
            un = n64(mean)
            if float(un) > 1e-7:
                mean = mean / un
        steps.append(taken)
        return sum(a * n for a, n in zip(alphas, norms)) * mean

    _check(got, want, t)
    assert max(steps) >= 2  # the iteration (one pass per reduction) really ran


@pytest.mark.parametrize("topk", [0.3, 1.0])
def test_sce_with_many_equal_variances(tmp_path, topk):
    paths, t = _models(tmp_path)
    got = _both(tmp_path, METHOD["mergekit_sce"], paths, {"global": {"select_topk": topk}}, f"sce{topk}")
    tied = []

    def want(xs, key):
        base = xs[0]
        tvs = torch.stack([x - base for x in xs[1:]])
        if topk < 1:
            var = torch.var(tvs, dim=0, unbiased=False)
            k = int(torch.count_nonzero(var) * topk)
            mask = torch.zeros(var.numel())
            order = torch.argsort(var.abs().reshape(-1), descending=True, stable=True)
            mask[order[:k]] = 1
            bound = var.reshape(-1)[order[k - 1]]
            tied.append(int((var == bound).sum()) > int((var.reshape(-1)[order[:k]] == bound).sum()))
            tvs = tvs * mask.reshape(var.shape).unsqueeze(0)
        erase = (tvs.sign() == ((tvs.sum(0) >= 0).float() * 2 - 1)).float()
        weights = torch.stack([s64(tv.square()) / tv.numel() for tv in tvs])
        weights = weights / float(weights.sum())
        erased = weights.reshape(-1, *([1] * base.dim())) * erase
        return base + (tvs * erased).sum(0) / erased.sum(0).clamp(min=1e-6)

    _check(got, want, t)
    assert topk == 1 or any(tied)  # some variances equal to the k-th largest were left out


def test_arcee_fusion(tmp_path):
    paths, t = _models(tmp_path, count=1)
    got = _both(tmp_path, METHOD["mergekit_arcee_fusion"], paths[:2], {}, "fusion")

    def want(xs, key):
        base, other = xs
        p = torch.softmax(other, dim=-1) + 1e-8
        q = torch.softmax(base, dim=-1) + 1e-8
        importance = (other - base).abs() * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
        ordered = torch.sort(importance.reshape(-1)).values
        q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
        return base + (other - base) * (importance >= median + 1.5 * (q3 - q1)).float()

    _check(got, want, t)
