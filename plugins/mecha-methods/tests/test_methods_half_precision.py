"""Methods with whole-tensor reductions under a half-precision work dtype.

In float16 a norm product or a sum of squares of an ordinary layer overflows (max 65504) and eps
guards underflow to 0, so these methods must reduce in float32. Each reference is a closed form
or a float64 numpy computation.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mecha_core

from .conftest import assert_close



def half(run, method, *models, **hypers):
    """``mecha_core.<method>(*models, **hypers)`` merged with work_dtype float16."""
    return run.merge(lambda *nodes: getattr(mecha_core, method)(*nodes, **hypers), *models,
                     work_dtype="float16")


def _pair_with_known_cosine():
    """δ₁ = 10 on the first half, δ₂ = 10 everywhere: cosine 1/√2."""
    d1 = torch.zeros(64, 64)
    d1[:32] = 10.0
    d2 = torch.full((64, 64), 10.0)
    return d1, d2


def test_model_stock_in_float16_uses_the_true_cosine(run):
    base = {"w": torch.zeros(64, 64)}
    d1, d2 = _pair_with_known_cosine()
    out = half(run, "model_stock", base, {"w": d1}, {"w": d2})
    cos = 1 / np.sqrt(2)
    t = 2 * cos / (1 + cos)
    ref = t * (d1.double().numpy() + d2.double().numpy()) / 2
    assert_close(out["w"], ref, tol=2e-3)


def test_add_perpendicular_in_float16_projects(run):
    d1, d2 = _pair_with_known_cosine()
    c = {"w": torch.zeros(64, 64)}
    out = half(run, "add_perpendicular", {"w": d1}, {"w": d2}, c, alpha=1.0)
    da, db = d1.double().numpy(), d2.double().numpy()
    ref = da + db - da * (da * db).sum() / (da * da).sum()  # = d1 + (db with the first half removed)
    assert_close(out["w"], ref, tol=2e-3)


def test_add_cosine_b_in_float16_whole_tensor_cosine(run):
    d1, d2 = _pair_with_known_cosine()
    a = {"w": d1 + 1.0}
    b = {"w": d2 + 1.0}
    out = half(run, "add_cosine_b", a, b, alpha=0.0)
    x, y = a["w"].double().numpy(), b["w"].double().numpy()
    col = (x * y).sum(0) / np.sqrt((x * x).sum(0) * (y * y).sum(0))
    whole = (x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
    k = 1 - np.clip((col + whole) / 2, 0, 1)
    assert_close(out["w"], (1 - k) * x + k * y, tol=2e-3)


@pytest.mark.parametrize("method", ["geometric_median", "multislerp", "karcher"])
def test_identical_inputs_in_float16_give_the_input(run, method):
    gen = torch.Generator().manual_seed(3)
    m = {"w": torch.randn(8, 4, generator=gen), "one": torch.tensor([0.75]), "zero": torch.zeros(5)}
    out = half(run, method, m, m, m)
    for k, v in m.items():
        assert_close(out[k], v.double().numpy(), tol=2e-3, what=k)


def test_crossover_and_rotate_run_in_float16(run):
    gen = torch.Generator().manual_seed(4)
    a = {"w": torch.randn(8, 6, generator=gen), "c": torch.randn(4, 2, 3, 3, generator=gen)}
    b = {k: torch.randn(v.shape, generator=gen) for k, v in a.items()}
    # tilt = 1 is exactly weighted_sum; rotate with alignment = alpha = 1 gives b
    cross = half(run, "crossover", a, b, alpha=0.3, tilt=1.0)
    rot = half(run, "rotate", a, b, alignment=1.0, alpha=1.0)
    for k in a:
        x, y = a[k].double().numpy(), b[k].double().numpy()
        assert_close(cross[k], 0.7 * x + 0.3 * y, tol=3e-3, what=k)
        assert_close(rot[k], y, tol=3e-3, what=k)


def test_della_in_float16_with_a_row_longer_than_65504(run):
    n = 70_000
    base = {"v": torch.zeros(n)}
    delta = torch.arange(1, n + 1, dtype=torch.float32) / n  # distinct, rank = index
    out = half(run, "della_linear", base, {"v": delta}, density=0.5, epsilon=0.1, seed=1)["v"]
    d16 = delta.half().double().numpy()
    p = 0.4 + 0.2 * np.arange(n) / (n - 1)
    kept = out != 0
    assert abs(kept.mean() - p.mean()) < 0.01
    # the largest entries (rank > 65504) are kept with probability ≈ 0.6, each divided by its p
    top = kept[65_505:]
    assert 0.55 < top.mean() < 0.65
    np.testing.assert_allclose(out[kept], (d16 / p)[kept], rtol=2e-3)
