"""add_cosine_a/b, crossover and rotate in bounded memory: run in many slices (statistics passes,
then element-wise or row-wise passes), they equal float64 plain-torch computations written here
and the same merge taken whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mecha_methods.diffusion as diffusion

from .conftest import assert_close, near

#: a tall matrix (many rows a column), a conv kernel, a 1x1 conv, a vector and a 0-d tensor
SHAPES = {"tall.weight": (300, 7), "conv.weight": (6, 4, 3, 3), "proj.weight": (10, 6, 1, 1),
          "lin.bias": (12,), "scale": ()}


def _model(seed: int, shapes=SHAPES) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) for k, s in shapes.items()}


def _columns(x: torch.Tensor) -> torch.Tensor:
    """The key as (rows along dim 0, columns): one column for a vector or a 0-d tensor."""
    return x.reshape(-1, 1) if x.dim() < 2 else x.reshape(x.shape[0], -1)


def _cosine_reference(x: torch.Tensor, y: torch.Tensor, variant: str, alpha: float) -> torch.Tensor:
    """add_cosine_a/b in float64: normalize then cosine_similarity along dim 0 (torch's eps
    guards written out), k = 1 − clamp(sim − alpha, 0, 1), (1 − k)·a + k·b."""
    a, b = _columns(x.double()), _columns(y.double())
    norm_a, norm_b = (a * a).sum(0).sqrt(), (b * b).sum(0).sqrt()
    if variant == "a":
        na, nb = a / norm_a.clamp(min=1e-12), b / norm_b.clamp(min=1e-12)
        sim = (na * nb).sum(0) / ((na * na).sum(0).sqrt().clamp(min=1e-8) * (nb * nb).sum(0).sqrt().clamp(min=1e-8))
    else:
        columns = (a * b).sum(0) / (norm_a.clamp(min=1e-8) * norm_b.clamp(min=1e-8))
        whole = (a * b).sum() / ((a * a).sum().sqrt() * (b * b).sum().sqrt()).clamp(min=1e-8)
        sim = (columns + whole) / 2
    k = 1 - (sim - alpha).clamp(0, 1)
    return ((1 - k) * a + k * b).reshape(x.shape)


@pytest.mark.parametrize("variant", ["a", "b"])
def test_add_cosine_in_slices_equals_float64_and_the_whole_key(run, variant):
    a = _model(1)
    b = near(a, 2, 1.5)
    b["tall.weight"][:, 3] = -a["tall.weight"][:, 3]  # one column opposite: k = 1 there
    b["tall.weight"][:, 5] = a["tall.weight"][:, 5]  # one column equal
    name = f"add_cosine_{variant}"
    sliced = run.merge(lambda x, y: getattr(__import__("mecha_core"), name)(x, y, alpha=0.1), a, b, chunk_elements=16)
    whole = run.merge(lambda x, y: getattr(__import__("mecha_core"), name)(x, y, alpha=0.1), a, b,
                      chunk_elements=1 << 20)
    for k in a:
        ref = _cosine_reference(a[k], b[k], variant, 0.1).numpy()
        assert_close(sliced[k], ref, tol=1e-6, what=f"{k} sliced")
        assert_close(whole[k], ref, tol=1e-6, what=f"{k} whole")
        assert np.abs(sliced[k] - whole[k]).max() <= 1e-6 * max(np.abs(ref).max(), 1e-12), k


def _radius(shape: tuple[int, ...]) -> torch.Tensor:
    axes = [torch.fft.fftfreq(n, dtype=torch.float64).abs() * 2 for n in shape[:-1]]
    axes.append(torch.fft.rfftfreq(shape[-1], dtype=torch.float64) * 2)
    grids = torch.meshgrid(*axes, indexing="ij")
    dims = max(1, sum(1 for n in shape if n > 1))
    return (sum(g ** 2 for g in grids) / dims).sqrt()


def _crossover_reference(a: torch.Tensor, b: torch.Tensor, alpha: float, tilt: float) -> torch.Tensor:
    """The definition in float64: irfftn((1 − F)·rfftn(a) + F·rfftn(b)) over every dim."""
    if a.dim() == 0:
        return (1 - alpha) * a.double() + alpha * b.double()
    shape = tuple(a.shape)
    take_b = torch.ones(1, dtype=torch.float64) if alpha >= 1 else (_radius(shape) > 1 - alpha).double()
    f = (1 - tilt) * take_b + tilt * alpha
    spectrum = (1 - f) * torch.fft.rfftn(a.double()) + f * torch.fft.rfftn(b.double())
    return torch.fft.irfftn(spectrum, s=shape)


@pytest.mark.parametrize("block,chunk", [(diffusion._FFT_BLOCK, 1 << 20), (diffusion._FFT_BLOCK, 16), (5, 16)])
def test_crossover_in_slices_and_blocks_equals_the_float64_definition(run, monkeypatch, block, chunk):
    # chunk 16: slices of a row or two (the row-wise passes); 5 spectrum elements a block: every
    # FFT step of the whole-key part runs in many blocks (rows, columns)
    monkeypatch.setattr(diffusion, "_FFT_BLOCK", block)
    shapes = {**SHAPES, "odd.weight": (9, 7), "cube": (5, 4, 6)}
    a, b = _model(3, shapes), _model(4, shapes)
    out = run.merge(lambda x, y: __import__("mecha_core").crossover(x, y, alpha=0.45, tilt=0.2), a, b,
                    chunk_elements=chunk)
    for k in a:
        assert_close(out[k], _crossover_reference(a[k], b[k], 0.45, 0.2).numpy(), tol=1e-5, what=k)


def test_crossover_declares_its_spectrum_and_blocks():
    from mecha_core.specs import TensorInfo

    # 49408 × 768 (SD1's token embedding): the spectrum has 49408 × 385 complex64 bins, and six
    # blocks of 2M bins are the FFT steps' temporaries; no float32 copy of the whole key
    declared = diffusion._crossover_working_set(TensorInfo((49408, 768), "float16"), 2, 4)
    assert declared == 49408 * 385 * 8 + 6 * (1 << 21) * 8


def _rotate_reference(a: torch.Tensor, b: torch.Tensor, alpha: float, centralization: float) -> torch.Tensor:
    """rotate with an integral alignment of 1, in float64: Procrustes on the centred matrices."""
    shape = tuple(a.shape)
    if len(shape) < 2:
        return (1 - alpha) * a.double() + alpha * b.double()
    width = int(np.prod(shape[2:])) if len(shape) > 2 and int(np.prod(shape[2:])) != 1 else int(np.prod(shape[1:]))
    ma, mb = a.double().reshape(-1, width), b.double().reshape(-1, width)
    mean_a, mean_b = ma.mean(0) * centralization, mb.mean(0) * centralization
    ca, cb = ma - mean_a, mb - mean_b
    u, _, vh = torch.linalg.svd(ca.T @ cb)
    q = u @ vh
    neurons = (1 - alpha) * ca + alpha * (cb @ q.T)
    return (neurons @ q + mean_b).reshape(shape)


@pytest.mark.parametrize("alpha,centralization", [(0.0, 1.0), (0.3, 0.5)])
def test_rotate_in_slices_of_rows_equals_float64_and_the_whole_key(run, alpha, centralization):
    a = _model(5)
    b = near(a, 6, 0.8)
    for k in a:  # a mean far from 0: the centring (aᵀb minus the means' product) must hold
        a[k] = a[k] + 3.0
        b[k] = b[k] + 2.0

    def recipe(x, y):
        import mecha_core

        return mecha_core.rotate(x, y, alpha=alpha, centralization=centralization)

    sliced = run.merge(recipe, a, b, chunk_elements=16)  # a few rows a slice
    whole = run.merge(recipe, a, b, chunk_elements=1 << 20)
    for k in a:
        ref = _rotate_reference(a[k], b[k], alpha, centralization).numpy()
        assert_close(sliced[k], ref, tol=2e-5, what=f"{k} sliced")
        assert_close(whole[k], ref, tol=2e-5, what=f"{k} whole")
        assert_close(sliced[k], whole[k], tol=1e-6, what=f"{k} sliced vs whole")


#: wide matrices (fewer rows than columns): a linear layer and a 1x1 conv (a conv with a real
#: kernel is an (out·in) × (kh·kw) matrix, tall)
WIDE = {"wide.weight": (9, 40), "wide_conv.weight": (5, 23, 1, 1)}


def _rotate_reference_aligned(a: torch.Tensor, b: torch.Tensor, alignment: int, alpha: float,
                              centralization: float) -> torch.Tensor:
    """rotate with alignment 0 or 1, in float64 from the full d×d SVD: Q = U·Vᵀ (orthogonal),
    lerp(a_c, b_c·Qᵀ, alpha)·Q^alignment + lerp(mean_a, mean_b, alignment)."""
    shape = tuple(a.shape)
    ma, mb = a.double().reshape(shape[0], -1), b.double().reshape(shape[0], -1)
    mean_a, mean_b = ma.mean(0) * centralization, mb.mean(0) * centralization
    ca, cb = ma - mean_a, mb - mean_b
    u, _, vh = torch.linalg.svd(ca.T @ cb)
    q = u @ vh
    neurons = (1 - alpha) * ca + alpha * (cb @ q.T)
    power = q if alignment == 1 else torch.eye(q.shape[0], dtype=q.dtype)
    return (neurons @ power + (1 - alignment) * mean_a + alignment * mean_b).reshape(shape)


@pytest.mark.parametrize("alignment,alpha,centralization", [(1, 0.0, 1.0), (1, 0.3, 0.5), (0, 0.6, 1.0),
                                                            (0, 0.0, 0.0), (1, 1.0, 1.0)])
def test_rotate_on_wide_keys_in_slices_equals_the_full_svd_in_float64(run, alignment, alpha, centralization):
    # a wide key is rotated from its rows (no d×d matrix): it must equal Procrustes from the
    # full d×d SVD, whose directions beyond aᵀb's rank do not reach a_c's or b_c's rows
    a = _model(9, WIDE)
    b = near(a, 10, 0.7)
    for k in a:
        a[k] = a[k] + 1.5
        b[k] = b[k] - 0.5

    def recipe(x, y):
        import mecha_core

        return mecha_core.rotate(x, y, alignment=alignment, alpha=alpha, centralization=centralization)

    sliced = run.merge(recipe, a, b, chunk_elements=2 * 40)  # two rows a slice
    whole = run.merge(recipe, a, b, chunk_elements=1 << 20)
    for k in a:
        ref = _rotate_reference_aligned(a[k], b[k], alignment, alpha, centralization).numpy()
        assert_close(sliced[k], ref, tol=2e-5, what=f"{k} sliced")
        assert_close(whole[k], ref, tol=2e-5, what=f"{k} whole")


def test_rotate_keeps_a_wide_key_where_b_fixes_no_direction(run):
    # b's rows are all the same: a_cᵀ·b_c = 0 fixes no direction of Q, and a_c is kept as it is
    # (what the d×d SVD of a zero matrix, U = V = I, gave), moved onto b's mean
    gen = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(6, 30, generator=gen)}
    row = torch.randn(1, 30, generator=gen)
    b = {"w": row.expand(6, 30).clone()}
    out = run.call("rotate", a, b)["w"]
    ma = a["w"].double()
    assert_close(out, (ma - ma.mean(0) + row.double()).numpy(), tol=1e-6, what="w")


def test_rotate_in_a_float64_work_dtype(run):
    a = _model(7, {**SHAPES, **WIDE})
    b = near(a, 8, 0.8)

    def recipe(x, y):
        import mecha_core

        return mecha_core.rotate(x, y, alpha=0.5)

    out = run.merge(recipe, a, b, chunk_elements=16, work_dtype="float64")
    for k in a:
        assert_close(out[k], _rotate_reference(a[k], b[k], 0.5, 1.0).numpy(), tol=2e-5, what=k)
