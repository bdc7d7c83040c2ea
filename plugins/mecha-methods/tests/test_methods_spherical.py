"""slerp, multislerp, karcher, geometric_median and model_stock against numpy references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from safetensors.torch import load_file

import mecha_core
from mecha_core.errors import MergeError
from mecha_core.testing import write_checkpoint

from .conftest import arrays, assert_close, near, random_model


def _slerp_reference(a, b, t):
    x, y = a.ravel(), b.ravel()
    nx, ny = np.linalg.norm(x), np.linalg.norm(y)
    cos = np.dot(x, y) / (nx * ny)
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    # the same great circle, written as rotating x̂ toward the unit vector orthogonal to it
    ortho = y / ny - cos * x / nx
    ortho /= np.linalg.norm(ortho)
    direction = np.cos(t * omega) * x / nx + np.sin(t * omega) * ortho
    return (direction * ((1 - t) * nx + t * ny)).reshape(a.shape)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_slerp(run, alpha):
    a, b = random_model(1), random_model(2, scale=3.0)
    out = run.call("slerp", a, b, alpha=alpha)
    A, B = arrays(a), arrays(b)
    for k in A:
        assert_close(out[k], _slerp_reference(A[k], B[k], alpha), what=k)


def test_slerp_of_parallel_tensors_is_a_lerp(run):
    a = random_model(3)
    b = {k: 2.5 * v for k, v in a.items()}
    out = run.call("slerp", a, b, alpha=0.4)
    A = arrays(a)
    for k in A:
        assert_close(out[k], 0.6 * A[k] + 0.4 * 2.5 * A[k], what=k)


def _multislerp_reference(xs, w):
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    flat = [x.ravel() for x in xs]
    units = [f / np.linalg.norm(f) for f in flat]
    mu = sum(wi * u for wi, u in zip(w, units))
    mu /= np.linalg.norm(mu)
    tau = sum(wi * (u - np.dot(u, mu) * mu) for wi, u in zip(w, units))
    theta = np.linalg.norm(tau)
    direction = np.cos(theta) * mu + np.sin(theta) * tau / theta
    return (direction * sum(wi * np.linalg.norm(f) for wi, f in zip(w, flat))).reshape(xs[0].shape)


def test_multislerp_weighted_and_default_equal(run):
    models = [random_model(4), random_model(5, scale=2.0), random_model(6, scale=0.5)]
    weighted = run.call("multislerp", *models, weights=[1.0, 2.0, 3.0])
    equal = run.call("multislerp", *models)
    arrs = [arrays(m) for m in models]
    for k in arrs[0]:
        xs = [m[k] for m in arrs]
        assert_close(weighted[k], _multislerp_reference(xs, [1, 2, 3]), what=k)
        assert_close(equal[k], _multislerp_reference(xs, [1, 1, 1]), what=k)


def test_multislerp_weights_must_match_the_inputs(run):
    from mecha_core.errors import MergeError

    with pytest.raises(MergeError, match=r"multislerp\(weights=.*one weight per input \(2 inputs\)"):
        run.call("multislerp", random_model(1), random_model(2), weights=[1.0, 2.0, 3.0])


def _log_map(u, mu):
    """Tangent vector at mu pointing to u, of length the angle between them."""
    along = np.dot(u, mu)
    perp = u - along * mu
    length = np.linalg.norm(perp)
    return np.zeros_like(u) if length < 1e-15 else np.arctan2(length, along) * perp / length


def test_karcher_mean_is_the_stationary_point_on_the_sphere(run):
    models = [random_model(7), random_model(8, scale=2.0), random_model(9)]
    out = run.call("karcher", *models, weights=[1.0, 1.0, 2.0], maxiter=200, tol=1e-9)
    w = np.array([0.25, 0.25, 0.5])
    arrs = [arrays(m) for m in models]
    for k in arrs[0]:
        flat = [m[k].ravel() for m in arrs]
        units = [f / np.linalg.norm(f) for f in flat]
        # independent reference: Riemannian gradient descent with the arctan2 log map, run long
        mu = units[0].copy()
        for _ in range(500):
            step = sum(wi * _log_map(u, mu) for wi, u in zip(w, units))
            n = np.linalg.norm(step)
            if n < 1e-14:
                break
            mu = np.cos(n) * mu + np.sin(n) * step / n
            mu /= np.linalg.norm(mu)
        ref = mu * sum(wi * np.linalg.norm(f) for wi, f in zip(w, flat))
        assert_close(out[k].ravel(), ref, tol=1e-3, what=k)


def test_geometric_median_minimises_the_sum_of_distances(run):
    models = [random_model(i) for i in range(10, 14)] + [random_model(14, scale=20.0)]  # one outlier
    out = run.call("geometric_median", *models, maxiter=500)
    arrs = [arrays(m) for m in models]
    for k in arrs[0]:
        pts = np.stack([m[k].ravel() for m in arrs])
        # reference: plain gradient descent on f(m) = Σ‖xᵢ − m‖ with a shrinking step
        m = np.median(pts, axis=0)
        for i in range(20000):
            diff = m - pts
            grad = (diff / np.linalg.norm(diff, axis=1)[:, None]).sum(axis=0)
            m = m - 0.02 / np.sqrt(1 + i / 50) * grad
        assert_close(out[k].ravel(), m, tol=1e-3, what=k)
        # and the outlier barely moves it, unlike the mean
        assert (np.linalg.norm(out[k].ravel() - pts[:4].mean(axis=0))
                < np.linalg.norm(pts.mean(axis=0) - pts[:4].mean(axis=0)))


@pytest.mark.parametrize("pairs", ["all", "consecutive"])
def test_model_stock(run, pairs):
    base = random_model(20)
    models = [near(base, 21, 0.3), near(base, 22, 0.3), near(base, 23, 0.3)]
    # correlated fine-tunes: a shared direction makes the cosines clearly positive
    shared = near({k: 0 * v for k, v in base.items()}, 24, 0.3)
    models = [{k: m[k] + shared[k] for k in m} for m in models]
    out = run.call("model_stock", base, *models, pairs=pairs)
    T0, arrs = arrays(base), [arrays(m) for m in models]
    for k in T0:
        d = [m[k].ravel() - T0[k].ravel() for m in arrs]
        combos = list(itertools.combinations(range(3), 2)) if pairs == "all" else [(0, 1), (1, 2)]
        cos = np.mean([np.dot(d[i], d[j]) / np.linalg.norm(d[i]) / np.linalg.norm(d[j]) for i, j in combos])
        t = 3 * cos / (1 + 2 * cos)
        assert 0.2 < cos < 0.9
        ref = t * np.mean([m[k] for m in arrs], axis=0) + (1 - t) * T0[k]
        assert_close(out[k], ref, what=k)


def test_model_stock_needs_two_models(run):
    from mecha_core.errors import MergeSpaceError

    with pytest.raises(MergeSpaceError, match="model_stock: needs at least 2 models, got 1"):
        run.call("model_stock", random_model(1), random_model(2))


def test_multislerp_weights_from_recipe_text(run):
    models = [random_model(15), random_model(16, scale=2.0)]
    paths = [write_checkpoint(run.folder / f"text{i}.safetensors", m) for i, m in enumerate(models)]
    text = (f'mecha 1\na = model("{paths[0]}")\nb = model("{paths[1]}")\n'
            "m = multislerp(a, b, weights=[1, 3])\n")
    out_path = run.folder / "from_text.safetensors"
    mecha_core.merge(text, out_path)
    out = {k: v.double().numpy() for k, v in load_file(out_path).items()}
    arrs = [arrays(m) for m in models]
    for k in arrs[0]:
        assert_close(out[k], _multislerp_reference([m[k] for m in arrs], [1, 3]), what=k)


def test_model_stock_when_fine_tunes_pull_apart(run):
    base = random_model(30)
    up = near(base, 31, 0.3)
    down = {k: 2 * base[k] - up[k] + 0.01 * torch.randn(base[k].shape) for k in base}  # δ₂ ≈ −δ₁
    # clamp=true keeps t in [0, 1]: here t would be unbounded, and the base is kept
    out = run.call("model_stock", base, up, down, clamp=True)
    T0 = arrays(base)
    for k in T0:
        assert_close(out[k], T0[k], what=k)
    # the default follows the paper: 1 + (N − 1)·cosθ ≈ 0 leaves t unbounded, an error
    with pytest.raises(MergeError, match="unbounded; use clamp=true"):
        run.call("model_stock", base, up, {k: 2 * base[k] - up[k] for k in base})
    # a moderately negative mean cosine gives a negative t, computed here from the formula
    third = near(base, 32, 0.3)
    out = run.call("model_stock", base, up, down, third)
    A = [arrays(m) for m in (up, down, third)]
    for k in T0:
        d = [m[k].ravel() - T0[k].ravel() for m in A]
        cos = np.mean([d[i] @ d[j] / (np.linalg.norm(d[i]) * np.linalg.norm(d[j]))
                       for i in range(3) for j in range(i + 1, 3)])
        t = 3 * cos / (1 + 2 * cos)
        assert cos < 0 and t < 0, (k, cos)
        assert_close(out[k], t * sum(m[k] for m in A) / 3 + (1 - t) * T0[k], what=k)


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_opposite_directions_give_the_plain_mix_not_zeros(run, method):
    # the mean of the unit directions of x and −2x is 0: no direction to interpolate along
    x = {"w": torch.tensor([3.0, -1.0, 2.0]), "logit_scale": torch.tensor(4.6)}
    y = {"w": -2 * x["w"], "logit_scale": torch.tensor(-9.2)}
    out = run.call(method, x, y)
    for k in x:
        assert_close(out[k], (x[k].double().numpy() + y[k].double().numpy()) / 2, what=k)


@pytest.mark.parametrize("call,message", [
    (("slerp", {"parallel": 1.0}), r"slerp\(parallel=1\.0\): must be in \[0, 1\)"),
    (("geometric_median", {"eps": 0.0}), r"geometric_median\(eps=0\.0\): must be greater than 0"),
    (("geometric_median", {"eps": -1.0}), r"geometric_median\(eps=-1\.0\): must be greater than 0"),
])
def test_hyperparameters_that_would_divide_by_zero_are_refused(run, call, message):
    name, hypers = call
    with pytest.raises(MergeError, match=message):
        run.call(name, random_model(1), random_model(2), **hypers)
