"""mergekit's whole-key methods run over slices of a key (statistics passes, then element-wise
passes): each equals a plain-torch whole-tensor computation of mergekit 0.1.5's definition
written here, on bfloat16 inputs with few distinct values (many equal magnitudes at every
threshold), and a key cut into many slices gives the same bytes as the key merged whole."""

from __future__ import annotations

import json

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
