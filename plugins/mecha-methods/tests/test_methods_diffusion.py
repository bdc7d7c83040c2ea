"""add_cosine_a/b, add_perpendicular, crossover and rotate against numpy references."""

from __future__ import annotations

import numpy as np
import pytest

from .conftest import SHAPES, arrays, assert_close, near, random_model


def _cos_axis0(x, y):
    return (x * y).sum(axis=0) / (np.sqrt((x * x).sum(axis=0)) * np.sqrt((y * y).sum(axis=0)))


def _lerp_by_similarity(a, b, sim, alpha):
    k = 1 - np.clip(sim - alpha, 0, 1)
    return (1 - k) * a + k * b


@pytest.mark.parametrize("method", ["add_cosine_a", "add_cosine_b"])
def test_add_cosine(run, method):
    a = random_model(1)
    b = near(a, 2, 1.2)  # columns of various similarity
    out = run.call(method, a, b, alpha=0.2)
    A, B = arrays(a), arrays(b)
    for k in A:
        x, y = A[k], B[k]
        if method == "add_cosine_a":
            sim = _cos_axis0(x / np.linalg.norm(x, axis=0), y / np.linalg.norm(y, axis=0))
        else:
            whole = np.dot(x.ravel(), y.ravel()) / (np.linalg.norm(x) * np.linalg.norm(y))
            sim = (_cos_axis0(x, y) + whole) / 2
        assert np.ptp(sim) > 0.05 or x.ndim == 1  # the test data spreads the similarities
        assert_close(out[k], _lerp_by_similarity(x, y, sim, 0.2), what=k)


def _perpendicular_reference(a, b, c, alpha):
    da, db = (a - c).ravel(), (b - c).ravel()
    projection = np.dot(db, da) / np.dot(da, da) * da
    return a + alpha * (db - projection).reshape(a.shape)


def test_add_perpendicular(run):
    c = random_model(3)
    a, b = near(c, 4, 0.3), near(c, 5, 0.3)
    out = run.call("add_perpendicular", a, b, c, alpha=0.9)
    A, B, C = arrays(a), arrays(b), arrays(c)
    for k in A:
        ref = _perpendicular_reference(A[k], B[k], C[k], 0.9)
        assert_close(out[k], ref, what=k)
        # what was added is orthogonal to a − c
        assert abs(np.dot((out[k] - A[k]).ravel(), (A[k] - C[k]).ravel())) < 1e-4 * np.abs(A[k]).sum()


def test_add_perpendicular_when_a_equals_c_adds_all_of_b_minus_c(run):
    c = random_model(6)
    b = near(c, 7, 0.3)
    out = run.call("add_perpendicular", c, b, c, alpha=0.5)
    B, C = arrays(b), arrays(c)
    for k in C:
        assert_close(out[k], C[k] + 0.5 * (B[k] - C[k]), what=k)


def _crossover_reference(a, b, alpha, tilt):
    shape = a.shape
    axes = [np.abs(np.fft.fftfreq(n)) * 2 for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1]) * 2]
    grids = np.meshgrid(*axes, indexing="ij")
    dims = max(1, sum(1 for n in shape if n > 1))
    radius = np.sqrt(sum(g ** 2 for g in grids) / dims)
    take_b = np.ones_like(radius) if alpha >= 1 else (radius > 1 - alpha).astype(float)
    f = (1 - tilt) * take_b + tilt * alpha
    axes_ = list(range(len(shape)))
    spectrum = (1 - f) * np.fft.rfftn(a, axes=axes_) + f * np.fft.rfftn(b, axes=axes_)
    return np.fft.irfftn(spectrum, s=shape, axes=axes_)


@pytest.mark.parametrize("alpha,tilt", [(0.37, 0.0), (0.61, 0.25), (0.3, 1.0), (0.0, 0.0), (1.0, 0.0)])
def test_crossover(run, alpha, tilt):
    a, b = random_model(8), random_model(9)
    out = run.call("crossover", a, b, alpha=alpha, tilt=tilt)
    A, B = arrays(a), arrays(b)
    for k in A:
        assert_close(out[k], _crossover_reference(A[k], B[k], alpha, tilt), what=k)
        if tilt == 1.0:
            assert_close(out[k], (1 - alpha) * A[k] + alpha * B[k], what=k)
        if alpha == 0.0:
            assert_close(out[k], A[k], what=k)
        if alpha == 1.0:
            assert_close(out[k], B[k], what=k)
        if alpha < 1 and tilt == 0:
            # the lowest frequency (the mean) always comes from a
            assert abs(out[k].mean() - A[k].mean()) < 1e-5


def _as_matrix(x):
    if x.ndim > 2 and np.prod(x.shape[2:]) != 1:
        return x.reshape(x.shape[0] * x.shape[1], -1)
    return x.reshape(x.shape[0], -1)  # linear, and a 1x1 conv: (out, in)


def _procrustes(a, b, centralization):
    ma, mb = _as_matrix(a), _as_matrix(b)
    mean_a = ma.mean(axis=0) * centralization
    mean_b = mb.mean(axis=0) * centralization
    u, _, vt = np.linalg.svd((ma - mean_a).T @ (mb - mean_b))
    return ma - mean_a, mb - mean_b, mean_a, mean_b, u @ vt


@pytest.mark.parametrize("centralization", [1.0, 0.0])
def test_rotate_full_alignment(run, centralization):
    a = random_model(10, {**SHAPES, "proj.weight": (8, 5, 1, 1)})
    b = near(a, 11, 1.0)
    out = run.call("rotate", a, b, alignment=1.0, centralization=centralization)
    back = run.call("rotate", a, b, alignment=1.0, alpha=1.0, centralization=centralization)
    A, B = arrays(a), arrays(b)
    for k in A:
        if A[k].ndim < 2:
            assert_close(out[k], A[k], what=k)  # alpha = 0: vectors are left as they are
            assert_close(back[k], B[k], what=k)
            continue
        ca, cb, mean_a, mean_b, q = _procrustes(A[k], B[k], centralization)
        assert_close(out[k], (ca @ q + mean_b).reshape(A[k].shape), what=k)
        assert_close(back[k], B[k], what=k)
        # Q is the best rotation: no orthogonal matrix maps a closer to b, e.g. not the identity
        assert np.linalg.norm(ca @ q - cb) < np.linalg.norm(ca - cb)


def test_rotate_half_alignment_is_a_square_root_of_the_rotation(run):
    a = random_model(12)
    b = near(a, 13, 1.0)
    out = run.call("rotate", a, b, alignment=0.5)
    A, B = arrays(a), arrays(b)
    for k in ("lin.weight", "conv.weight"):
        ca, _, mean_a, mean_b, q = _procrustes(A[k], B[k], 1.0)
        rotated = _as_matrix(out[k]) - (mean_a + mean_b) / 2
        half, *_ = np.linalg.lstsq(ca, rotated, rcond=None)  # the matrix a_c was multiplied by
        assert_close(half @ half, q, tol=1e-3, what=k)
        assert_close(half.T @ half, np.eye(q.shape[0]), tol=1e-3, what=k)


def test_rotate_part_way_toward_a_mirror_image_is_a_proper_rotation(run):
    # b is a mirrored (det −1): no real rotation reaches a reflection part-way, so a fractional
    # alignment rotates part-way toward the best proper rotation (Kabsch: the SVD's weakest
    # direction flipped), keeping every direction instead of dropping the reflected one.
    import torch

    gen = torch.Generator().manual_seed(21)
    a = {"lin.weight": torch.randn(24, 5, generator=gen) * torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0])}
    b = {"lin.weight": a["lin.weight"] * torch.tensor([1.0, 1.0, 1.0, 1.0, -1.0])}
    out = run.call("rotate", a, b, alignment=0.5)
    A, B = arrays(a)["lin.weight"], arrays(b)["lin.weight"]
    ca = A - A.mean(axis=0)
    cb = B - B.mean(axis=0)
    u, _, vt = np.linalg.svd(ca.T @ cb)
    assert np.linalg.det(u @ vt) < 0  # the plain Procrustes answer is the reflection itself
    flip = np.diag([1.0] * 4 + [np.sign(np.linalg.det(u @ vt))])
    proper = u @ flip @ vt
    moved = out["lin.weight"] - (A.mean(axis=0) + B.mean(axis=0)) / 2
    half, *_ = np.linalg.lstsq(ca, moved, rcond=None)
    assert_close(half.T @ half, np.eye(5), tol=1e-3, what="orthogonal")
    assert np.linalg.det(half) > 0.99
    assert_close(half @ half, proper, tol=1e-3, what="square root")


def test_rotate_part_way_on_a_wide_layer_depends_on_the_inputs_alone(run):
    # 12 rows, 40 columns: aᵀb has rank ≤ 12, the SVD's other 28 directions are arbitrary; a
    # fractional power must not mix them in (a 1e-6 change of b once moved the result ~14%)
    import torch

    gen = torch.Generator().manual_seed(40)
    a = {"w": torch.randn(12, 40, generator=gen)}
    b = {"w": a["w"] + 0.5 * torch.randn(12, 40, generator=gen)}
    nudged = {"w": b["w"] + 1e-6 * torch.randn(12, 40, generator=gen)}
    half = run.call("rotate", a, b, alignment=0.5)["w"]
    half_nudged = run.call("rotate", a, nudged, alignment=0.5)["w"]
    assert np.abs(half - half_nudged).max() / np.abs(half).max() < 1e-3
    A, B = arrays(a)["w"], arrays(b)["w"]
    ca, cb = A - A.mean(axis=0), B - B.mean(axis=0)
    moved = half - (A.mean(axis=0) + B.mean(axis=0)) / 2
    # a rotation keeps the neurons' lengths and angles: the rows' Gram matrix is unchanged
    assert_close(moved @ moved.T, ca @ ca.T, tol=1e-3, what="Gram")
    # part of the way: closer to b than a was, not as close as the full rotation
    u, _, vt = np.linalg.svd(ca.T @ cb)
    full = ca @ (u @ vt)
    assert np.linalg.norm(full - cb) < np.linalg.norm(moved - cb) < np.linalg.norm(ca - cb)
    assert_close(run.call("rotate", a, b, alignment=1.0)["w"], full + B.mean(axis=0), what="alignment 1")
