"""Whole-key statistics over slices: float64 sums, exact top-k selection, and methods that use
them run on many small slices with the bytes of the whole-tensor definition."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core import TopK, Total, merge_method
from mecha_core.engine import statistics
from mecha_core.kit.reductions import dot64, norm64, sum64
from mecha_core.method import MergeContext
from mecha_core.specs import TensorInfo
from mecha_core.testing import plugin_from_functions, using, write_checkpoint


def _pieces(tensors: list[torch.Tensor], size: int):
    """``statistics.compute``'s pieces: slices of ``size`` elements of the flattened tensors."""
    n = tensors[0].numel()
    info = TensorInfo(tuple(tensors[0].shape), "float32")

    def pieces():
        for a in range(0, n, size):
            b = min(a + size, n)
            yield MergeContext("k", info, start=a, stop=b), [t.reshape(-1)[a:b] for t in tensors]

    return pieces


def _stable_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """The reference: the first k of a stable descending sort of |values| (ties: lower index)."""
    flat = values.reshape(-1).abs()
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:max(k, 0)]] = True
    return mask


@pytest.fixture(params=["kernel", "eager"])
def window_counting(request, monkeypatch):
    """The one-pass window is counted by the C kernel, or by eager torch where none is built."""
    if request.param == "eager":
        monkeypatch.setattr(statistics.kernels, "window_count", lambda *args: False)
    return request.param


# -- float64 reductions ------------------------------------------------------------------------
def test_float64_reductions_hold_at_16m_elements_where_float32_drifts():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1 << 24, generator=gen) + 1.0  # all positive: rounding errors do not cancel
    y = torch.rand(1 << 24, generator=gen)
    ref_norm = float(x.double().norm())
    ref_dot = float((x.double() * y.double()).sum())
    ref_sum = float(x.double().sum())
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs
    try:
        drift = abs(float(x.norm()) - ref_norm) / ref_norm
        # the assertion below can fail: float32 is measurably worse than the tolerance here
        assert drift > 1e-6, drift
        assert abs(float(norm64(x)) - ref_norm) / ref_norm < 1e-9
        assert abs(float(dot64(x, y)) - ref_dot) / ref_dot < 1e-9
        assert abs(float(sum64(x)) - ref_sum) / ref_sum < 1e-9
        # the engine's Total over 1M-element slices
        got = statistics.compute([Total("xx", lambda ctx, a: a * a)], _pieces([x], 1 << 20), x.numel())
        assert abs(got["xx"] ** 0.5 - ref_norm) / ref_norm < 1e-9
    finally:
        torch.set_num_threads(old)


# -- exact selection -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("k", [0, 1, 37, 500, 999, 1000, 1200])
def test_top_k_selection_over_slices_equals_a_stable_sort(dtype, k):
    gen = torch.Generator().manual_seed(k)
    # few distinct magnitudes: most of them tied, signs mixed, zeros included
    values = (torch.randint(-6, 7, (1000,), generator=gen).to(dtype)) / 4
    request = TopK("t", lambda ctx, v: v, k)
    ctx = MergeContext("k", TensorInfo((1000,), "float32"))
    whole = statistics.compute_whole([request], ctx, [values])["t"]
    assert torch.equal(whole.mask(values.abs(), ctx), _stable_top_k(values, k))
    for size in (1000, 64, 7):
        sel = statistics.compute([request], _pieces([values], size), values.numel())["t"]
        assert sel == whole, size
        assert torch.equal(sel.mask(values.abs(), ctx), _stable_top_k(values, k)), size


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("n", [statistics._SORTED, statistics._SORTED + 1])
def test_a_key_held_whole_is_selected_alike_by_sorting_or_by_histogram(dtype, n):
    # at most _SORTED elements: sorted; one more: the histogram of top-16-bit digits
    gen = torch.Generator().manual_seed(n)
    values = torch.randint(-40, 41, (n,), generator=gen).to(dtype) / 8  # many ties at every magnitude
    ctx = MergeContext("k", TensorInfo((n,), "float32"))
    for k in (1, n // 5, n // 2 + 3, n - 1):
        sel = statistics.compute_whole([TopK("t", lambda ctx, v: v, k)], ctx, [values])["t"]
        assert torch.equal(sel.mask(values.abs(), ctx), _stable_top_k(values, k)), k
        assert sel.last_tie < n, k  # a tie split in the middle: the index of the last one kept


def test_top_k_of_continuous_values_needs_every_digit():
    gen = torch.Generator().manual_seed(3)
    values = torch.randn(5000, generator=gen, dtype=torch.float64)
    for k in (1, 2500, 4999):
        sel = statistics.compute([TopK("t", lambda ctx, v: v, k)], _pieces([values], 333), 5000)["t"]
        ctx = MergeContext("k", TensorInfo((5000,), "float64"))
        assert torch.equal(sel.mask(values.abs(), ctx), _stable_top_k(values, k))
        assert sel.threshold == float(values.abs().sort(descending=True).values[k - 1])


# -- methods through the engine, many slices -----------------------------------------------------
def _merge(tmp_path, recipe_of, models: list[dict], **options) -> dict[str, torch.Tensor]:
    import mecha_methods.plugin

    with using(mecha_methods.plugin):
        nodes = []
        for i, m in enumerate(models):
            path = tmp_path / f"in{i}.safetensors"
            write_checkpoint(path, m)
            nodes.append(mecha_core.model(str(path)))
        out = tmp_path / "out.safetensors"
        mecha_core.merge(recipe_of(*nodes), out, **options)
        return load_file(out)


def _tied_models(n_models: int, shape=(64, 40), seed=0, dtype=torch.float16) -> list[dict]:
    """Models whose deltas take few values: many ties at any threshold."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-8, 8, shape, generator=gen).to(dtype)
    models = [{"w": base}]
    for _ in range(n_models):
        models.append({"w": base + torch.randint(-3, 4, shape, generator=gen).to(dtype) / 2})
    return models


def _ties_reference(models: list[dict], density: float) -> torch.Tensor:
    """TIES (vote "sum", no weights) by its whole-tensor definition, written out: the stable
    sort's top-k of each delta, the sign of their sum, the mean of the agreeing entries."""
    base = models[0]["w"].float()
    deltas = [x["w"].float() - base for x in models[1:]]
    trimmed = [torch.where(_stable_top_k(d, int(density * d.numel())).reshape(d.shape), d, 0) for d in deltas]
    sign = torch.sign(sum(trimmed))
    agree = [(torch.sign(t) == sign) & (t != 0) for t in trimmed]
    total = sum(torch.where(a, t, 0) for a, t in zip(agree, trimmed))
    count = sum(a.float() for a in agree).clamp(min=1)
    return (base + total / count).to(models[0]["w"].dtype)


def test_ties_sliced_equals_the_whole_tensor_definition_byte_for_byte(tmp_path):
    models = _tied_models(1)
    base, m = (x["w"].float() for x in models)
    out = _merge(tmp_path, lambda *n: mecha_core.ties(*n, density=0.3), models, chunk_elements=100)["w"]
    delta = m - base
    keep = _stable_top_k(delta, int(0.3 * delta.numel())).reshape(delta.shape)
    ref = torch.where(keep, m, base).to(torch.float16)  # one model: every kept delta agrees with itself
    assert torch.equal(out, ref)


def test_ties_three_models_sliced_and_whole_give_the_same_bytes(tmp_path):
    models = _tied_models(3, seed=1)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole = _merge(tmp_path / "a", lambda *n: mecha_core.ties(*n, density=0.2), models, chunk_elements=1 << 20)
    sliced = _merge(tmp_path / "b", lambda *n: mecha_core.ties(*n, density=0.2), models, chunk_elements=37)
    assert torch.equal(whole["w"], sliced["w"])
    assert torch.equal(sliced["w"], _ties_reference(models, 0.2))


def test_breadcrumbs_band_over_slices_is_the_stable_sort_band(tmp_path):
    models = _tied_models(1, seed=2)
    base, m = (x["w"].float() for x in models)
    out = _merge(tmp_path, lambda *n: mecha_core.breadcrumbs(*n, density=0.5, gamma=0.1), models,
                 chunk_elements=51)["w"]
    delta = (m - base).reshape(-1)
    n = delta.numel()
    order = torch.sort(delta.abs(), descending=True, stable=True).indices
    band = torch.zeros(n, dtype=torch.bool)
    band[order[int(0.1 * n):int(0.1 * n) + int(0.5 * n)]] = True
    ref = torch.where(band.reshape(base.shape), m, base).to(torch.float16)
    assert torch.equal(out, ref)


def test_dare_masks_do_not_depend_on_the_slice_size(tmp_path):
    models = _tied_models(2, shape=(300, 700), seed=3, dtype=torch.float32)
    outs = []
    for i, chunk in enumerate((1 << 22, 1000, 65536 + 17)):
        (tmp_path / str(i)).mkdir()
        outs.append(_merge(tmp_path / str(i), lambda *n: mecha_core.dare_ties(*n, density=0.4, seed=2,
                                                                                 rescale="l1"),
                           models, chunk_elements=chunk)["w"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_dare_l1_rescale_uses_whole_key_norms(tmp_path):
    models = _tied_models(1, shape=(200, 50), seed=4, dtype=torch.float32)
    out = _merge(tmp_path, lambda *n: mecha_core.dare_linear(*n, density=0.3, seed=1, rescale="l1"), models,
                 chunk_elements=333)["w"]
    base, m = models[0]["w"], models[1]["w"]
    delta = (m - base).double()
    got = out.double() - base.double()
    kept = got != 0
    assert 0.2 < kept.double().mean() < 0.4
    # the kept entries are the delta scaled by one factor: ‖δ‖₁ / ‖kept δ‖₁ over the whole key
    factor = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close(got[kept], delta[kept] * factor, rtol=1e-5, atol=1e-5)


def test_slerp_and_model_stock_sliced_match_float64_references(tmp_path):
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(300, 200, generator=gen)
    b = 0.6 * a + torch.randn(300, 200, generator=gen)
    c = 0.5 * a + torch.randn(300, 200, generator=gen)
    out = _merge(tmp_path, lambda x, y: mecha_core.slerp(x, y, alpha=0.3), [{"w": a}, {"w": b}],
                 chunk_elements=999)["w"]
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    na, nb = a64.norm(), b64.norm()
    omega = torch.arccos(a64 @ b64 / (na * nb))
    ref = (torch.sin(0.7 * omega) * a64 / na + torch.sin(0.3 * omega) * b64 / nb) / torch.sin(omega)
    ref = ref * (0.7 * na + 0.3 * nb)
    torch.testing.assert_close(out.double().reshape(-1), ref, rtol=1e-5, atol=1e-5)
    (tmp_path / "s").mkdir()
    base = torch.zeros(300, 200)
    stock = _merge(tmp_path / "s", lambda *n: mecha_core.model_stock(*n), [{"w": base}, {"w": b}, {"w": c}],
                   chunk_elements=777)["w"]
    d1, d2 = b.double().reshape(-1), c.double().reshape(-1)
    cos = d1 @ d2 / (d1.norm() * d2.norm())
    t = 2 * cos / (1 + cos)
    torch.testing.assert_close(stock.double().reshape(-1), t * (d1 + d2) / 2, rtol=1e-5, atol=1e-5)


def test_a_statistics_method_runs_as_one_unit_of_slices(tmp_path):
    """The unit of a large key holds one slice at a time: the method is only ever given
    slices, and its statistics are of the whole key."""
    seen: list[tuple[int, ...]] = []

    def stats_of(ctx, inputs):
        return [Total("sum", lambda ctx, a: a)]

    @merge_method(elementwise=True, statistics=stats_of)
    def minus_mean(a, *, stats=None, ctx=None):
        seen.append(tuple(a.shape))
        return a - stats["sum"] / ctx.info.numel

    x = torch.arange(10000, dtype=torch.float32).reshape(100, 100)
    with using(plugin_from_functions("stats", mecha_merge_methods=lambda: [minus_mean])):
        path = tmp_path / "x.safetensors"
        write_checkpoint(path, {"w": x})
        out = tmp_path / "o.safetensors"
        mecha_core.merge(mecha_core.minus_mean(mecha_core.model(str(path))), out, chunk_elements=1000)
    assert torch.equal(load_file(out)["w"], x - float(x.double().mean()))
    assert seen and all(s == (1000,) for s in seen)


def test_della_runs_on_slices_of_whole_rows_with_the_whole_tensor_bytes(tmp_path):
    """DELLA ranks within rows: slices of whole rows (any slice size) give the whole key's bytes,
    and the keep probabilities are the per-row ranks of the whole tensor."""
    gen = torch.Generator().manual_seed(6)
    base = torch.zeros(64, 3, 10)
    model = torch.randn(64, 3, 10, generator=gen)
    outs = []
    for i, chunk in enumerate((1 << 20, 95, 7)):  # whole; 3 rows of 30; a row at a time (7 < 30)
        (tmp_path / str(i)).mkdir()
        outs.append(_merge(tmp_path / str(i), lambda *n: mecha_core.della_linear(*n, density=0.5, epsilon=0.2,
                                                                                  seed=3),
                           [{"w": base}, {"w": model}], chunk_elements=chunk)["w"])
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    rows = model.reshape(64, 30)
    ranks = torch.argsort(torch.argsort(rows.abs(), dim=1, stable=True), dim=1).double()
    p = (0.5 - 0.2 + 0.4 * ranks / 29).reshape(64, 3, 10)
    kept = outs[1] != 0
    torch.testing.assert_close(outs[1][kept].double(), (model.double() / p)[kept], rtol=1e-6, atol=1e-6)


def test_collecting_the_bucket_and_narrowing_it_digit_by_digit_agree():
    """The bucket of the k-th largest is collected when it fits, else narrowed by further 16-bit
    digits (collect_limit=0 forces that): both give the stable sort's selection, ties included."""
    gen = torch.Generator().manual_seed(11)
    # float32 magnitudes from few float16 values: many exact ties inside the k-th's bucket
    values = (torch.randint(-40, 41, (20000,), generator=gen).to(torch.float16) / 8).float()
    values = values + torch.randn(20000, generator=gen) * (torch.rand(20000, generator=gen) < 0.5)
    ctx = MergeContext("k", TensorInfo((20000,), "float32"))
    for k in (1, 777, 10000, 19999):
        request = TopK("t", lambda ctx, v: v, k)
        collected = statistics.compute([request], _pieces([values], 999), values.numel())["t"]
        narrowed = statistics.compute([request], _pieces([values], 999), values.numel(), collect_limit=0)["t"]
        assert collected == narrowed, k
        assert torch.equal(collected.mask(values.abs(), ctx), _stable_top_k(values, k)), k


def test_spherical_and_median_methods_sliced_match_float64_whole_tensor_references(tmp_path):
    """multislerp, karcher, geometric_median and add_perpendicular run on slices from float64
    dot products; the results are the whole-tensor definitions computed here in float64."""
    gen = torch.Generator().manual_seed(8)
    xs = [torch.randn(120, 90, generator=gen) for _ in range(3)]
    xs[1] = 0.7 * xs[0] + 0.5 * xs[1]
    flat = [x.double().reshape(-1) for x in xs]
    models = [{"w": x} for x in xs]

    def unit(v):
        return v / v.norm()

    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64) / 6
    units = [unit(f) for f in flat]
    mu = unit(sum(wi * u for wi, u in zip(w, units)))
    tau = sum(wi * (u - (u @ mu) * mu) for wi, u in zip(w, units))
    tn = tau.norm()
    ref_multi = unit(mu * torch.cos(tn) + tau * torch.sin(tn) / tn) * sum(wi * f.norm() for wi, f in zip(w, flat))

    mu_k = unit(sum(units) / 3)
    for _ in range(50):
        tangent = torch.zeros_like(mu_k)
        for u in units:
            theta = torch.arccos((u @ mu_k).clamp(-1, 1))
            tangent += (theta / torch.sin(theta)) * (u - torch.cos(theta) * mu_k) / 3
        step = tangent.norm()
        if step < 1e-12:
            break
        mu_k = unit(mu_k * torch.cos(step) + tangent * torch.sin(step) / step)
    ref_karcher = mu_k * sum(f.norm() for f in flat) / 3

    stack = torch.stack(flat)
    median = stack.mean(0)
    for _ in range(100):
        weights = 1 / (stack - median).norm(dim=1).clamp(min=1e-6)
        median = (weights[:, None] * stack).sum(0) / weights.sum()

    da, db = flat[0] - flat[2], flat[1] - flat[2]
    ref_perp = flat[0] + 0.8 * (db - da * (da @ db) / (da @ da))

    cases = [("multislerp", lambda *n: mecha_core.multislerp(*n, weights=[1.0, 2.0, 3.0]), ref_multi),
             ("karcher", lambda *n: mecha_core.karcher(*n, maxiter=50, tol=1e-12), ref_karcher),
             ("geometric_median", lambda *n: mecha_core.geometric_median(*n), median),
             ("add_perpendicular", lambda *n: mecha_core.add_perpendicular(*n, alpha=0.8), ref_perp)]
    for name, recipe, ref in cases:
        (tmp_path / name).mkdir()
        out = _merge(tmp_path / name, recipe, models, chunk_elements=1001)["w"]
        torch.testing.assert_close(out.double().reshape(-1), ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.slow
def test_every_reduction_is_within_1e_6_of_float64_at_256m_elements():
    """Issue 15's bar: a norm of a 256M-element tensor within 1e-6 relative of a float64
    reference. Every dot-product method sums its Totals through statistics.compute (slerp,
    model_stock, multislerp, karcher, geometric_median, add_perpendicular, mergekit_slerp, DARE's
    L1 norms, add_cosine's per-column sums); kit.reductions serves plugins' whole-tensor methods."""
    n = 1 << 28
    gen = torch.Generator().manual_seed(12)
    x = torch.rand(n, generator=gen) + 1.0  # all positive: float32 rounding errors do not cancel
    y = torch.rand(n, generator=gen)
    xd = x.double()
    ref_xx = float(torch.dot(xd, xd))
    yd = y.double()
    ref_xy = float(torch.dot(xd, yd))
    del xd, yd
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # as the engine runs
    try:
        drift = abs(float(x.norm()) - ref_xx ** 0.5) / ref_xx ** 0.5
        assert drift > 1e-6, drift  # float32 misses the bar here, so the assertions below can fail
        got = statistics.compute([Total("xx", lambda ctx, a, b: a * a), Total("xy", lambda ctx, a, b: a * b)],
                                 _pieces([x, y], 700_000), n)
        assert abs(got["xx"] ** 0.5 - ref_xx ** 0.5) / ref_xx ** 0.5 < 1e-6
        assert abs(got["xy"] - ref_xy) / ref_xy < 1e-6
        assert abs(float(norm64(x)) - ref_xx ** 0.5) / ref_xx ** 0.5 < 1e-6
        assert abs(float(dot64(x, y)) - ref_xy) / ref_xy < 1e-6
    finally:
        torch.set_num_threads(old)


def test_one_pass_window_selection_equals_the_stable_sort_when_the_first_piece_misleads(window_counting):
    """Float32 magnitudes in pieces of at least the window's bins are selected in one pass
    within a window the first piece estimates; a first piece unlike the rest (ten times larger
    here) puts the window off, and the passes take over. collect_limit=0 drops the per-piece
    counts (the last tie is then found by a pass over the pieces), with or without ``piece`` to
    evaluate one piece alone. Every way gives the stable descending sort's selection, ties
    included."""
    size = statistics.WINDOW << 16
    n = 4 * size + 1234
    gen = torch.Generator().manual_seed(12)
    # few float16 values: many exact ties at every threshold
    smooth = (torch.randint(-3000, 3001, (n,), generator=gen).to(torch.float16) / 64).float()
    misleading = smooth.clone()
    misleading[:size] *= 10
    ctx = MergeContext("k", TensorInfo((n,), "float32"))
    for values in (smooth, misleading):
        pieces = _pieces([values], size)
        evaluated: list[int] = []

        def piece(i, values=values, evaluated=evaluated):
            evaluated.append(i)
            a, b = size * i, min(size * i + size, n)
            return MergeContext("k", TensorInfo((n,), "float32"), start=a, stop=b), [values[a:b]]

        for k, limit in ((n // 5, None), (n - 7, None), (999, 0)):
            want = _stable_top_k(values, k)
            evaluated.clear()
            got = statistics.compute([TopK("t", lambda ctx, v: v, k)], pieces, n, collect_limit=limit,
                                     piece=piece)["t"]
            assert torch.equal(got.mask(values.abs(), ctx), want), (k, limit)
            assert got.last_tie < n  # the threshold's ties were split: the case the counts serve
            assert len(evaluated) <= 1  # at most the piece holding the last tie, once
        alone = statistics.compute([TopK("t", lambda ctx, v: v, k)], pieces, n)["t"]
        assert torch.equal(alone.mask(values.abs(), ctx), want)


def test_one_pass_window_over_pieces_smaller_than_a_record_finds_the_tie_in_its_run():
    """Pieces smaller than the window's record (statistics._FLUSH elements) are counted in runs:
    the window is placed from the first pieces together, and the last tie kept is found by
    walking the run that holds it, up to its piece. The selection is the stable descending
    sort's, ties included, with and without ``piece``."""
    size = 40_000
    n = 3 * (statistics.WINDOW << 16) + 777
    gen = torch.Generator().manual_seed(44)
    values = (torch.randint(-2000, 2001, (n,), generator=gen).to(torch.float16) / 64).float()
    ctx = MergeContext("k", TensorInfo((n,), "float32"))
    pieces = _pieces([values], size)
    evaluated: list[int] = []

    def piece(i):
        evaluated.append(i)
        a, b = size * i, min(size * i + size, n)
        return MergeContext("k", TensorInfo((n,), "float32"), start=a, stop=b), [values[a:b]]

    run = -(-statistics._FLUSH // size)  # pieces per record
    for k in (n // 5, n // 2 + 3, 12_345):
        want = _stable_top_k(values, k)
        evaluated.clear()
        got = statistics.compute([TopK("t", lambda ctx, v: v, k)], pieces, n, piece=piece)["t"]
        assert torch.equal(got.mask(values.abs(), ctx), want), k
        assert got.last_tie < n  # ties split: the run's pieces were walked
        assert 1 <= len(evaluated) <= run and evaluated == sorted(set(evaluated)), evaluated
        walked = statistics.compute([TopK("t", lambda ctx, v: v, k)], pieces, n)["t"]
        assert torch.equal(walked.mask(values.abs(), ctx), want), k


@pytest.mark.parametrize("scale, in_band", [(1.0, True), (1.01, False), (0.99, False)])
def test_a_kth_inside_the_window_but_off_the_recorded_band_is_found_by_a_walk(scale, in_band, window_counting):
    """Only the window's bins near the first pieces' estimate of the k-th are recorded piece by
    piece (statistics.BAND). Later pieces 1% larger (or smaller) than the first two move the k-th
    out of that band but not out of the window: the threshold still comes from the one pass's
    counts, and the last tie kept is found by walking the pieces (one more pass, no piece
    evaluated alone) instead of from the records. Either way: the stable descending sort's
    selection, ties included."""
    size = statistics.WINDOW << 16
    n = 6 * size + 99
    gen = torch.Generator().manual_seed(3)
    values = (torch.randint(-3000, 3001, (n,), generator=gen).to(torch.float16) / 64).float()
    values[2 * size:] *= scale
    ctx = MergeContext("k", TensorInfo((n,), "float32"))
    passes, evaluated = [], []

    def pieces():
        passes.append(1)
        return _pieces([values], size)()

    def piece(i):
        evaluated.append(i)
        a, b = size * i, min(size * i + size, n)
        return MergeContext("k", TensorInfo((n,), "float32"), start=a, stop=b), [values[a:b]]

    k = n // 5
    got = statistics.compute([TopK("t", lambda ctx, v: v, k)], pieces, n, piece=piece)["t"]
    assert torch.equal(got.mask(values.abs(), ctx), _stable_top_k(values, k))
    assert got.last_tie < n  # ties split: the last one kept had to be found
    if in_band:
        assert len(passes) == 1 and len(evaluated) == 1  # the records named its piece
    else:
        assert len(passes) == 2 and evaluated == []  # the window's counts, then a walk


def test_window_counts_spilled_before_int32_would_overflow_select_the_same(monkeypatch, window_counting):
    """A key of more than 2**31 elements spills the window's int32 counts into int64 ones; with
    the limit lowered to a few pieces' worth, the spills happen here and change nothing."""
    size = statistics.WINDOW << 16
    n = 5 * size + 3
    gen = torch.Generator().manual_seed(21)
    values = (torch.randint(-3000, 3001, (n,), generator=gen).to(torch.float16) / 64).float()
    ctx = MergeContext("k", TensorInfo((n,), "float32"))
    spills = []
    real = statistics._Window.count

    def count(self, index, bits):
        before = self.spilled
        real(self, index, bits)
        if self.spilled is not before:
            spills.append(index)

    monkeypatch.setattr(statistics._Window, "count", count)
    monkeypatch.setattr(statistics, "_INT32_COUNTS", 2 * size + 1)
    for k in (n // 5, 777):
        spills.clear()
        got = statistics.compute([TopK("t", lambda ctx, v: v, k)], _pieces([values], size), n)["t"]
        assert torch.equal(got.mask(values.abs(), ctx), _stable_top_k(values, k)), k
        assert len(spills) >= 2


def _ranges(n: int, size: int) -> list[tuple[int, int]]:
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _mask_piece_by_piece(got, values: torch.Tensor, order: list[int], size: int) -> torch.Tensor:
    """The selection's mask, each piece's from the selection that piece is given (a
    :class:`statistics.TieSearch` is asked piece by piece, in ``order``)."""
    n = values.numel()
    mask = torch.zeros(n, dtype=torch.bool)
    for i in order:
        a, b = i * size, min(i * size + size, n)
        ctx = MergeContext("k", TensorInfo((n,), "float32"), start=a, stop=b)
        selection = got.for_piece(ctx, [values[a:b]]) if isinstance(got, statistics.TieSearch) else got
        mask[a:b] = selection.mask(values[a:b].abs(), ctx)
    return mask


def _tied_key(seed: int, size: int):
    """A float32 key of five windows' worth of few float16 values (ties at every threshold), a
    ``piece(i)`` that evaluates its i-th piece alone, and the list of pieces it evaluated."""
    n = 5 * (statistics.WINDOW << 16) + 321
    gen = torch.Generator().manual_seed(seed)
    values = (torch.randint(-3000, 3001, (n,), generator=gen).to(torch.float16) / 64).float()
    evaluated: list[int] = []

    def piece(i):
        evaluated.append(i)
        a, b = size * i, min(size * i + size, n)
        return MergeContext("k", TensorInfo((n,), "float32"), start=a, stop=b), [values[a:b]]

    return n, values, piece, evaluated


@pytest.mark.parametrize("size", [statistics.WINDOW << 16, 40_000])
def test_a_last_tie_left_to_the_evaluation_in_order_is_found_there_without_evaluating_a_piece_again(size):
    """Given the pieces' ranges (as the engine's evaluator gives them, going on to evaluate the
    pieces in order), a selection whose counts place its last tie kept in a run of recorded
    pieces is a TieSearch: each piece, asked in order, gets a selection whose mask over that
    piece is the stable descending sort's, ties included, and no piece is evaluated alone for
    it. Pieces as large as a record and pieces smaller (recorded in runs)."""
    n, values, piece, evaluated = _tied_key(8, size)
    count = len(_ranges(n, size))
    for k in (n // 5, n // 2 + 3, 12_345):
        evaluated.clear()
        got = statistics.compute([TopK("t", lambda ctx, v: v, k)], _pieces([values], size), n, piece=piece,
                                 ranges=_ranges(n, size))["t"]
        assert isinstance(got, statistics.TieSearch), k
        assert torch.equal(_mask_piece_by_piece(got, values, list(range(count)), size), _stable_top_k(values, k)), k
        assert evaluated == [], k
        assert got.found is not None and got.found.last_tie < n  # the ties were split
        # once found, any piece (again, in any order) gets the selection itself
        again = _mask_piece_by_piece(got, values, list(reversed(range(count))), size)
        assert torch.equal(again, _stable_top_k(values, k)), k


def test_a_last_tie_left_to_the_evaluation_is_found_by_evaluating_pieces_when_asked_out_of_order():
    """A TieSearch asked for a piece past the first one of its run not yet counted (the
    evaluation did not come in order) looks the way the statistics pass does: it evaluates the
    run's pieces alone. Asked for an earlier piece, it keeps every tie there, rightly."""
    size = 40_000  # pieces recorded in runs: the run holding the last tie has several
    n, values, piece, evaluated = _tied_key(9, size)
    k = n // 5
    want = _stable_top_k(values, k)
    got = statistics.compute([TopK("t", lambda ctx, v: v, k)], _pieces([values], size), n, piece=piece,
                             ranges=_ranges(n, size))["t"]
    assert isinstance(got, statistics.TieSearch)
    first, last = got.select.tie_pieces
    assert first < last
    order = [last, *range(first), *range(first, last), *range(last + 1, len(_ranges(n, size)))]
    assert torch.equal(_mask_piece_by_piece(got, values, order, size), want)
    assert evaluated and evaluated == list(range(first, first + len(evaluated)))  # the run, up to the tie


def test_ties_finds_its_last_ties_while_merging_and_gives_the_definition_bytes(tmp_path, monkeypatch):
    """Through the engine: TIES on a key sliced into pieces that the one-pass window records in
    runs of three, whose deltas tie at every threshold, finds each model's last tie kept as the
    merge goes through the pieces (statistics.TieSearch; no piece evaluated again after the
    statistics pass), and gives the bytes of the whole-tensor definition."""
    models = _tied_models(3, shape=(1024, 1536), seed=5)
    searched, located = [], []
    real_for_piece, real_locate = statistics.TieSearch.for_piece, statistics._locate_in_recorded_pieces
    monkeypatch.setattr(statistics.TieSearch, "for_piece",
                        lambda self, ctx, inputs: searched.append(ctx.start) or real_for_piece(self, ctx, inputs))
    monkeypatch.setattr(statistics, "_locate_in_recorded_pieces",
                        lambda selects, *a: located.extend(selects) or real_locate(selects, *a))
    sliced = _merge(tmp_path, lambda *n: mecha_core.ties(*n, density=0.2), models, chunk_elements=100_000)["w"]
    assert searched and not located
    assert torch.equal(sliced, _ties_reference(models, 0.2))
