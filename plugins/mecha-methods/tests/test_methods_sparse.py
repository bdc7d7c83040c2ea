"""TIES, DARE, DELLA and Model Breadcrumbs against numpy references and statistical checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.errors import MergeError, MergeSpaceError, RecipeError
from mecha_core.testing import write_checkpoint

from .conftest import arrays, assert_close, near, random_model

BIG = {"big.weight": (256, 128), "small.bias": (64,)}


def _trim(delta: np.ndarray, density: float) -> np.ndarray:
    flat = delta.ravel()
    k = int(density * flat.size)
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def _elect_and_average(deltas: list[np.ndarray], vote: str) -> np.ndarray:
    flat = [d.ravel() for d in deltas]
    out = np.zeros_like(flat[0])
    for i in range(out.size):
        values = [f[i] for f in flat]
        total = sum(values) if vote == "sum" else sum(np.sign(v) for v in values)
        sign = np.sign(total)
        agreeing = [v for v in values if v != 0 and np.sign(v) == sign]
        out[i] = sum(agreeing) / len(agreeing) if agreeing else 0.0
    return out.reshape(deltas[0].shape)


@pytest.mark.parametrize("vote", ["sum", "count"])
def test_ties(run, vote):
    base = random_model(1)
    models = [near(base, 2 + i, 0.5) for i in range(3)]
    out = run.call("ties", base, *models, density=0.3, alpha=0.8, vote=vote)
    T0, arrs = arrays(base), [arrays(m) for m in models]
    for k in T0:
        trimmed = [_trim(m[k] - T0[k], 0.3) for m in arrs]
        assert_close(out[k], T0[k] + 0.8 * _elect_and_average(trimmed, vote), what=k)


def test_ties_sign_election_by_hand(run):
    # one entry, three models, nothing trimmed: deltas +5, −1, −1.
    # vote="sum": Σδ = +3, so + wins and only +5 agrees -> 5. vote="count": two minus votes -> mean(−1, −1).
    base = {"w": torch.zeros(1)}
    models = [{"w": torch.tensor([v])} for v in (5.0, -1.0, -1.0)]
    assert run.call("ties", base, *models, density=1.0, vote="sum")["w"].tolist() == [5.0]
    assert run.call("ties", base, *models, density=1.0, vote="count")["w"].tolist() == [-1.0]


def test_ties_sd_mecha_trim_keeps_every_entry_tied_with_the_threshold(run):
    # Worked by hand. n = 6, density 0.5: sd-mecha's threshold is the max(int(0.5·6), 1) = 3rd
    # smallest magnitude. m1's magnitudes sorted: .05 .1 .2 .2 .2 .5 -> threshold .2, so all three
    # .2 entries and -.5 stay (4 kept; top_k keeps int(0.5·6) = 3). m2's sorted: 0 0 0 .1 .3 .4 ->
    # threshold 0: everything stays. Count vote: signs of m1 [0 + + + - 0], of m2 [+ - 0 0 + 0]:
    # sums [1 0 1 1 0 0]; entry 0 takes m2's .3, entries 2 and 3 m1's .2, the tied entries 1 and 4
    # and the all-zero entry 5 give 0.
    base = {"w": torch.zeros(6)}
    m1 = {"w": torch.tensor([0.1, 0.2, 0.2, 0.2, -0.5, 0.05])}
    m2 = {"w": torch.tensor([0.3, -0.1, 0.0, 0.0, 0.4, 0.0])}
    out = run.call("ties", base, m1, m2, density=0.5, vote="count", trim="sd_mecha")["w"]
    assert out.tolist() == pytest.approx([0.3, 0.0, 0.2, 0.2, 0.0, 0.0])
    alone = run.call("ties", base, m1, density=0.5, trim="sd_mecha")["w"]
    assert alone.tolist() == pytest.approx([0.0, 0.2, 0.2, 0.2, -0.5, 0.0])
    # the default trim keeps exactly int(0.5·6) = 3 entries: -.5 and two of the tied .2s
    assert int((run.call("ties", base, m1, density=0.5)["w"] != 0).sum()) == 3


def test_ties_rejects_unknown_vote(run):
    # vote is a Literal: refused when the recipe is built, before any file is opened
    base, model = mecha_core.model("base.safetensors"), mecha_core.model("m.safetensors")
    with pytest.raises(RecipeError, match=r'^ties\(vote="majority"\): use one of "sum", "count"$'):
        mecha_core.ties(base, model, vote="majority")


def test_ties_of_a_delta_is_a_merge_space_error(run):
    # typed inputs: caught when the recipe is built
    a, b, c = (mecha_core.model(f"{n}.safetensors", type="base") for n in "abc")
    with pytest.raises(MergeSpaceError) as built:
        mecha_core.ties(a, mecha_core.subtract(b, c))
    assert str(built.value) == "ties expects models in weight space; got a delta from subtract"
    # subtract always returns a delta, so untyped files fail the same way, before any merge
    with pytest.raises(MergeSpaceError, match="^ties expects models in weight space; got a delta from subtract"):
        run.merge(lambda x, y, z: mecha_core.ties(x, mecha_core.subtract(y, z)),
                  random_model(1), random_model(2), random_model(3))
    assert not list(run.folder.glob("out*"))


# -- DARE ---------------------------------------------------------------------------------------
def _zeros(shapes=BIG):
    return {k: torch.zeros(s) for k, s in shapes.items()}


def test_dare_keeps_density_and_rescales_exactly(run):
    model = random_model(5, BIG)
    out = run.call("dare_linear", _zeros(), model, density=0.3, seed=7)
    kept = out["big.weight"] != 0
    assert abs(kept.mean() - 0.3) < 0.03
    delta = model["big.weight"].numpy()
    np.testing.assert_allclose(out["big.weight"][kept], (delta[kept] / np.float32(0.3)), rtol=1e-6)


def test_dare_rescale_options(run):
    model = random_model(6, BIG)
    l1 = run.call("dare_linear", _zeros(), model, density=0.4, seed=1, rescale="l1")
    none = run.call("dare_linear", _zeros(), model, density=0.4, seed=1, rescale="none")
    for k, v in model.items():
        d = v.double().numpy()
        assert np.isclose(np.abs(l1[k]).sum(), np.abs(d).sum(), rtol=1e-5)
        kept = none[k] != 0
        np.testing.assert_array_equal(none[k][kept], d[kept])
        assert 0.3 < kept.mean() < 0.5
        # the same masks whatever the rescale
        np.testing.assert_array_equal(l1[k] != 0, kept)


def test_dare_same_seed_same_bytes_any_threads_and_new_seed_differs(run):
    base = random_model(8, BIG)
    models = [near(base, 9, 0.1), near(base, 10, 0.1)]
    nodes = run.files(base, *models)
    outs = {}
    for name, seed, threads in (("one", 3, 1), ("two", 3, 2), ("again", 3, 2), ("other", 4, 2)):
        path = run.folder / f"dare_{name}.safetensors"
        mecha_core.merge(mecha_core.dare_linear(*nodes, density=0.5, seed=seed), path, threads=threads)
        outs[name] = path.read_bytes()
    assert outs["one"] == outs["two"] == outs["again"]
    assert outs["one"] != outs["other"]
    # not only the recipe in the metadata differs: the tensors do
    a = run.merge(lambda *n: mecha_core.dare_linear(*n, density=0.5, seed=3), base, *models)
    b = run.merge(lambda *n: mecha_core.dare_linear(*n, density=0.5, seed=4), base, *models)
    assert not np.array_equal(a["big.weight"], b["big.weight"])


def _revealed(run, method, base, models, **hypers):
    """The masked, rescaled delta of each model: running the method with every other model
    replaced by the base (a zero delta) leaves that model's part alone, with the same masks."""
    out = []
    for i in range(len(models)):
        alone = [m if j == i else base for j, m in enumerate(models)]
        merged = run.call(method, base, *alone, **hypers)
        out.append({k: merged[k] - arrays(base)[k] for k in merged})
    return out


def test_dare_ties_uses_the_dare_masks_then_elects(run):
    base = _zeros()
    models = [random_model(11 + i, BIG) for i in range(3)]
    hypers = dict(density=0.5, seed=5)
    masked = _revealed(run, "dare_linear", base, models, **hypers)
    out = run.call("dare_ties", base, *models, alpha=0.5, vote="count", **hypers)
    for k in ("small.bias",):  # the loop reference is slow; one key is enough
        for m, d in zip(models, masked):
            kept = d[k] != 0
            np.testing.assert_allclose(d[k][kept], m[k].numpy()[kept] / np.float32(0.5), rtol=1e-6)
        assert_close(out[k], 0.5 * _elect_and_average([d[k] for d in masked], "count"), what=k)
    linear = run.call("dare_linear", base, *models, **hypers)
    assert_close(linear["big.weight"], sum(d["big.weight"] for d in masked), what="sum of revealed masks")


# -- DELLA --------------------------------------------------------------------------------------
def _della_probability(delta: np.ndarray, density: float, epsilon: float) -> np.ndarray:
    rows = delta.reshape(delta.shape[0], -1) if delta.ndim >= 2 else delta.reshape(1, -1)
    p = np.empty_like(rows)
    n = rows.shape[1]
    for r in range(rows.shape[0]):
        order = np.argsort(np.abs(rows[r]), kind="stable")
        for rank, col in enumerate(order):
            p[r, col] = density - epsilon + 2 * epsilon * rank / (n - 1)
    return p.reshape(delta.shape)


def test_della_linear_keep_probability_follows_magnitude_rank(run):
    model = random_model(20, BIG)
    out = run.call("della_linear", _zeros(), model, density=0.5, epsilon=0.2, seed=2)
    delta = model["big.weight"].double().numpy()
    p = _della_probability(delta, 0.5, 0.2)
    got = out["big.weight"]
    kept = got != 0
    np.testing.assert_allclose(got[kept], delta[kept] / p[kept], rtol=1e-5)
    assert abs(kept.mean() - 0.5) < 0.03
    low, high = p < 0.4, p > 0.6  # the smallest and largest fifths of each row
    assert abs(kept[low].mean() - p[low].mean()) < 0.03
    assert abs(kept[high].mean() - p[high].mean()) < 0.03
    assert kept[high].mean() - kept[low].mean() > 0.25


def test_della_elects_signs_over_the_della_masks(run):
    base = _zeros()
    models = [random_model(30 + i, BIG) for i in range(2)]
    hypers = dict(density=0.6, epsilon=0.1, seed=9)
    masked = _revealed(run, "della_linear", base, models, **hypers)
    out = run.call("della", base, *models, **hypers)
    k = "small.bias"
    assert_close(out[k], _elect_and_average([d[k] for d in masked], "sum"), what=k)


def test_della_rejects_probabilities_outside_0_1(run):
    with pytest.raises(MergeError, match=r"density ± epsilon must lie in \(0, 1\]"):
        run.call("della", random_model(1), random_model(2), density=0.95, epsilon=0.1)


# -- Model Breadcrumbs --------------------------------------------------------------------------
def _band(delta: np.ndarray, density: float, gamma: float) -> np.ndarray:
    flat = delta.ravel()
    order = np.argsort(-np.abs(flat), kind="stable")
    top = int(gamma * flat.size)
    keep = order[top:top + int(density * flat.size)]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs(run, method):
    base = random_model(40)
    models = [near(base, 41 + i, 0.5) for i in range(3)]
    out = run.call(method, base, *models, density=0.6, gamma=0.1, alpha=0.7)
    T0, arrs = arrays(base), [arrays(m) for m in models]
    for k in T0:
        bands = [_band(m[k] - T0[k], 0.6, 0.1) for m in arrs]
        merged = sum(bands) if method == "breadcrumbs" else _elect_and_average(bands, "sum")
        assert_close(out[k], T0[k] + 0.7 * merged, what=k)
        # the largest delta entry of each model is an outlier and was dropped
        assert all(b.ravel()[np.argmax(np.abs(m[k] - T0[k]))] == 0 for b, m in zip(bands, arrs))


def _weighted_elect_and_average(deltas: list[np.ndarray], weights: list[float], vote: str) -> np.ndarray:
    """mergekit's weighted TIES, entry by entry: elect over wᵢδᵢ, then Σ agreeing wᵢδᵢ / Σ their wᵢ."""
    flat = [d.ravel() * w for d, w in zip(deltas, weights)]
    out = np.zeros_like(flat[0])
    for i in range(out.size):
        values = [f[i] for f in flat]
        total = sum(values) if vote == "sum" else sum(np.sign(v) for v in values)
        sign = np.sign(total)
        agree = [j for j, v in enumerate(values) if v != 0 and np.sign(v) == sign]
        divisor = sum(weights[j] for j in agree)
        out[i] = sum(values[j] for j in agree) / (divisor if divisor != 0 else 1.0)
    return out.reshape(deltas[0].shape)


@pytest.mark.parametrize("vote", ["sum", "count"])
def test_ties_with_per_model_weights(run, vote):
    base = random_model(1)
    models = [near(base, 2 + i, 0.5) for i in range(3)]
    weights = [0.5, 2.0, 1.25]
    out = run.call("ties", base, *models, density=0.3, alpha=0.8, vote=vote, weights=weights)
    T0, arrs = arrays(base), [arrays(m) for m in models]
    for k in ("lin.bias", "lin.weight"):
        trimmed = [_trim(m[k] - T0[k], 0.3) for m in arrs]
        assert_close(out[k], T0[k] + 0.8 * _weighted_elect_and_average(trimmed, weights, vote), what=k)


def test_ties_weights_by_hand(run):
    # deltas +4 and −1 with weights 0.25 and 3: weighted +1 and −3, so "sum" elects −, and the
    # merged delta is −3 / 3 = −1 (without weights + would win: +4)
    base = {"w": torch.zeros(1)}
    models = [{"w": torch.tensor([v])} for v in (4.0, -1.0)]
    assert run.call("ties", base, *models, density=1.0)["w"].tolist() == [4.0]
    assert run.call("ties", base, *models, density=1.0, weights=[0.25, 3.0])["w"].tolist() == [-1.0]


def test_dare_with_weights_scales_each_models_masked_delta(run):
    base = _zeros()
    models = [random_model(11 + i, BIG) for i in range(2)]
    hypers = dict(density=0.5, seed=5)
    masked = _revealed(run, "dare_linear", base, models, **hypers)
    out = run.call("dare_linear", base, *models, weights=[0.3, -2.0], **hypers)
    for k in masked[0]:
        assert_close(out[k], 0.3 * masked[0][k] - 2.0 * masked[1][k], what=k)
    ties_out = run.call("dare_ties", base, *models, weights=[0.3, 2.0], **hypers)
    k = "small.bias"
    assert_close(ties_out[k], _weighted_elect_and_average([d[k] for d in masked], [0.3, 2.0], "sum"), what=k)


@pytest.mark.parametrize("weights", [[1.0], [1.0, 2.0, 3.0], [1.0, float("inf")], 2.0])
def test_weights_must_be_one_finite_number_per_model(run, weights):
    with pytest.raises(MergeError, match=r"ties\(weights=.*one finite weight per model after the base \(2 models\)"):
        run.call("ties", random_model(1), random_model(2), random_model(3), weights=weights)


# -- the in-place TIES pass against a plain-torch whole-tensor TIES, bit for bit ---------------
def _torch_ties(base: torch.Tensor, models: list[torch.Tensor], density: float, vote: str) -> torch.Tensor:
    """TIES on whole tensors in plain torch, as the definition reads (float32, the output in
    the inputs' dtype): stable top-k trim, sign election, mean of the agreeing deltas. A NaN
    delta ranks above every number (as a sort orders it) but is never kept, since the
    selection keeps the entries whose magnitude compares >= the k-th's."""
    b = base.float().reshape(-1)
    trimmed = []
    for m in models:
        d = m.float().reshape(-1) - b
        k = int(density * d.numel())
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        keep[torch.sort(d.abs(), descending=True, stable=True).indices[:k]] = True
        keep &= ~torch.isnan(d)
        trimmed.append(torch.where(keep, d, 0.0))
    if vote == "sum":
        votes = trimmed[0].clone()
        for t in trimmed[1:]:
            votes = votes + t
    else:
        votes = torch.sign(trimmed[0])
        for t in trimmed[1:]:
            votes = votes + torch.sign(t)
    sign = torch.sign(votes)
    total = torch.zeros_like(b)
    count = torch.zeros_like(b)
    for t in trimmed:
        agrees = (torch.sign(t) == sign) & (t != 0)
        total = total + torch.where(agrees, t, 0.0)
        count = count + agrees.float()
    merged = total / torch.clamp(count, min=1)
    return (b + merged).to(base.dtype).reshape(base.shape)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("vote", ["sum", "count"])
@pytest.mark.parametrize("chunk", [None, 1000, 4099])
def test_ties_bytes_equal_a_plain_torch_whole_tensor_ties(run, tmp_path, dtype, vote, chunk):
    """Half-precision inputs with few distinct values: many magnitudes tie at every threshold,
    so which tied entries are kept (the lower flat indices) decides the bytes. Whole keys and
    keys in slices of any size give the whole-tensor definition's bytes exactly, -0.0 in the
    base included."""
    gen = torch.Generator().manual_seed(31)
    shape = (120, 97)
    base = (torch.randint(-6, 7, shape, generator=gen).float() / 16).to(dtype)
    base.view(-1)[::37] = -0.0
    models = [(torch.randint(-6, 7, shape, generator=gen).float() / 16).to(dtype) for _ in range(3)]
    models[1].view(-1)[::41] = base.view(-1)[::41]  # zero deltas
    paths = []
    for i, t in enumerate([base, *models]):
        paths.append(mecha_core.model(write_checkpoint(tmp_path / f"m{i}.safetensors", {"w": t})))
    for density in (0.2, 0.5, 0.77):
        out = tmp_path / "out.safetensors"
        mecha_core.merge(mecha_core.ties(*paths, density=density, vote=vote), out, chunk_elements=chunk)
        got = load_file(out)["w"]
        want = _torch_ties(base, models, density, vote)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (density, vote, chunk)


def test_ties_non_finite_deltas_give_the_definitions_bytes(run, tmp_path):
    """A NaN delta is trimmed away (never selected: NaN >= threshold is false), +inf and -inf
    deltas cancel into a NaN vote that nothing agrees with: slices holding such entries take
    the definition's arithmetic, the others the in-place pass; the bytes are the definition's."""
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(4000, generator=gen)
    models = [base + torch.randn(4000, generator=gen) for _ in range(3)]
    models[0][10] = float("nan")
    models[0][20], models[1][20] = float("inf"), float("-inf")
    models[2][3000] = float("inf")
    paths = [mecha_core.model(write_checkpoint(tmp_path / f"m{i}.safetensors", {"w": t}))
             for i, t in enumerate([base, *models])]
    out = tmp_path / "out.safetensors"
    mecha_core.merge(mecha_core.ties(*paths, density=0.5), out, chunk_elements=1000, allow_nonfinite=True)
    got = load_file(out)["w"]
    want = _torch_ties(base, models, 0.5, "sum")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert torch.isinf(got[3000]) and got[10] == want[10] and not torch.isnan(got[20])
