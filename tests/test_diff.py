"""`mecha diff` and mecha_core.diff: per-block measures checked against plain torch on small
SD1-layout models built here (a few hundred small keys from every block, one key large enough
to be read in slices), pair order, the base's task vectors, recipes computed on the fly, and the
thread count not changing a single bit."""

from __future__ import annotations

import math

import mecha_methods.plugin
import mecha_sd1.plugin
import pytest
import torch
from safetensors.torch import save_file

import mecha_core
from mecha_core.difference import compute
from mecha_core.testing import host_with, using

ARCH = host_with(mecha_sd1.plugin).architecture("sd1-ldm")
SMALL = [k for k, s in ARCH.keys.items() if not s.optional and len(s.shape) == 1][::3]
#: a key of a few hundred thousand elements: with a small slice size it is read in several slices
LARGE = min((k for k, s in ARCH.keys.items() if not s.optional and 200_000 < math.prod(s.shape) < 1_000_000),
            key=lambda k: math.prod(ARCH.keys[k].shape))
KEYS = SMALL + [LARGE]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(ARCH.keys[k].shape, generator=g) * 0.05 for k in KEYS}


@pytest.fixture
def models(tmp_path):
    """base, and a, b, c: the base plus small changes; a and b leave some elements exactly at the
    base (task vectors of zero there), c is a stranger."""
    base, shared = _tensors(1), _tensors(5)
    made = {"base": base}
    for name, seed in (("a", 2), ("b", 3)):  # task vectors with a common part: signs agree more often
        noise = _tensors(seed)
        g = torch.Generator().manual_seed(seed + 10)
        made[name] = {k: torch.where(torch.rand(v.shape, generator=g) < 0.2, v, v + (noise[k] + shared[k]) * 0.1)
                      for k, v in base.items()}
    made["c"] = _tensors(4)
    paths = {}
    for name, tensors in made.items():
        paths[name] = str(tmp_path / f"{name}.safetensors")
        save_file({k: v.to(torch.float16) for k, v in tensors.items()}, paths[name])
    # what the files hold (fp16), in float64 for the reference computation
    values = {name: {k: v.to(torch.float16).to(torch.float64) for k, v in t.items()} for name, t in made.items()}
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        yield paths, values


def _node(path):
    return mecha_core.model(path, arch="sd1-ldm")


def _flat(values, keys):
    return torch.cat([values[k].reshape(-1) for k in keys])


def _expected(x, y, base=None):
    """The measures by plain torch: cosine_similarity, norms, and signs counted one by one."""
    cos = torch.nn.functional.cosine_similarity(x, y, dim=0).item()
    rel = (torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x)).item()
    largest = (y - x).abs().max().item()
    out = {"cosine": cos, "relative_l2": rel, "max_abs_change": largest}
    if base is not None:
        u, v = x - base, y - base
        out["task_cosine"] = torch.nn.functional.cosine_similarity(u, v, dim=0).item()
        both = (u != 0) & (v != 0)
        same = ((u > 0) & (v > 0)) | ((u < 0) & (v < 0))
        out["sign_agreement"] = same.sum().item() / both.sum().item()
    return out


def _blocks():
    found: dict[str, list[str]] = {}
    for k in KEYS:
        found.setdefault(ARCH.keys[k].blocks[0], []).append(k)
    return found


def _check(measures, expected, elements):
    assert measures.elements == elements
    for name, value in expected.items():
        assert getattr(measures, name) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_block_measures_match_plain_torch(models, monkeypatch):
    paths, values = models
    monkeypatch.setattr(compute, "SLICE_BYTES", 1 << 16)  # the large key in many slices
    result = mecha_core.diff(_node(paths["a"]), _node(paths["b"]), base=_node(paths["base"]), threads=2)
    blocks = _blocks()
    assert result.architecture == "sd1-ldm" and result.grouping == "block"
    assert list(result.groups) == [b for b in ARCH.blocks if b in blocks]  # architecture order
    assert len(blocks) >= 20  # the test covers most blocks
    (pair,) = result.pairs
    assert (pair.first, pair.second, pair.unmatched_keys) == (0, 1, 0)
    for name, measures in zip(result.groups, pair.groups):
        keys = blocks[name]
        assert measures.keys == len(keys)
        x, y, b = (_flat(values[m], keys) for m in ("a", "b", "base"))
        _check(measures, _expected(x, y, b), x.numel())
    x, y, b = (_flat(values[m], KEYS) for m in ("a", "b", "base"))
    _check(pair.total, _expected(x, y, b), x.numel())
    assert 0.6 < pair.total.sign_agreement < 0.9 and 0.3 < pair.total.task_cosine < 0.7  # a real check, not 0 or 1


def test_every_pair_of_three_models_in_order_and_per_key(models):
    paths, values = models
    result = mecha_core.diff(*(_node(paths[m]) for m in "abc"), keys=True, labels=["A", "B", "C"])
    assert [(p.first, p.second) for p in result.pairs] == [(0, 1), (0, 2), (1, 2)]
    assert result.models == ("A", "B", "C") and result.grouping == "key"
    position = {k: i for i, k in enumerate(ARCH.keys)}
    assert list(result.groups) == sorted(KEYS, key=position.__getitem__)
    for pair in result.pairs:
        first, second = "abc"[pair.first], "abc"[pair.second]
        for key, measures in zip(result.groups, pair.groups):
            x, y = values[first][key].reshape(-1), values[second][key].reshape(-1)
            _check(measures, _expected(x, y), x.numel())
            assert measures.task_cosine is None and measures.sign_agreement is None


def test_the_thread_count_changes_no_bit(models, monkeypatch):
    paths, _ = models
    args = [_node(paths[m]) for m in "ab"]
    whole = mecha_core.diff(*args, base=_node(paths["base"]), threads=1)
    monkeypatch.setattr(compute, "SLICE_BYTES", 1 << 16)
    one = mecha_core.diff(*args, base=_node(paths["base"]), threads=1)
    four = mecha_core.diff(*args, base=_node(paths["base"]), threads=4)
    assert one.as_json() == four.as_json()  # exact: sums are added in one fixed order
    # slices add the same sums in other groupings: equal up to rounding
    large = whole.groups.index(ARCH.keys[LARGE].blocks[0])
    assert whole.pairs[0].groups[large].cosine == pytest.approx(one.pairs[0].groups[large].cosine, rel=1e-12)
    assert whole.pairs[0].groups[large].cosine != 1.0


def test_a_recipe_is_computed_on_the_fly(models, tmp_path):
    paths, values = models
    recipe = tmp_path / "mix.mecha"
    recipe.write_text(f'mecha 1\nweighted_sum(model("{paths["a"]}", arch="sd1-ldm"), '
                      f'model("{paths["c"]}", arch="sd1-ldm"), alpha=0.25)\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    result = mecha_core.diff(str(recipe), _node(paths["a"]))
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert result.models[0] == str(recipe)
    # the recipe's value in its float32 work dtype, not rounded to an output dtype
    mixed = {k: (values["a"][k].float() * 0.75 + values["c"][k].float() * 0.25).double() for k in KEYS}
    x, y = _flat(mixed, KEYS), _flat(values["a"], KEYS)
    expected = _expected(x, y)
    for name, value in expected.items():
        assert getattr(result.pairs[0].total, name) == pytest.approx(value, rel=1e-6)


def test_a_task_vector_of_zeros_has_no_cosine_and_identical_models_no_change(models):
    paths, _ = models
    result = mecha_core.diff(_node(paths["base"]), _node(paths["a"]), _node(paths["base"]),
                             base=_node(paths["base"]))
    base_vs_a, base_vs_base = result.pairs[0], result.pairs[1]
    assert base_vs_a.total.task_cosine is None and base_vs_a.total.sign_agreement is None  # base - base = 0
    assert base_vs_base.total.relative_l2 == 0.0 and base_vs_base.total.max_abs_change == 0.0
    assert base_vs_base.total.cosine == pytest.approx(1.0, abs=1e-15)


def test_keys_only_one_model_holds_are_counted_not_compared(tmp_path):
    save_file({"w": torch.ones(4), "only_a": torch.ones(2), "shape": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([1.0, 2.0, 3.0, 4.0]), "shape": torch.ones(5)}, tmp_path / "b.safetensors")
    result = mecha_core.diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    (pair,) = result.pairs
    assert result.architecture is None and result.groups == ("(all keys)",)
    assert pair.unmatched_keys == 2 and pair.total.keys == 1 and pair.total.elements == 4
    # [1,1,1,1] vs [1,2,3,4]: cos = 10 / (2 sqrt(30)), ||(0,1,2,3)|| / 2
    assert pair.total.cosine == pytest.approx(10 / (2 * math.sqrt(30)), rel=1e-12)
    assert pair.total.relative_l2 == pytest.approx(math.sqrt(14) / 2, rel=1e-12)
    assert pair.total.max_abs_change == 3.0


def test_models_without_a_common_key_are_refused_before_reading(tmp_path):
    save_file({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"y": torch.ones(2)}, tmp_path / "b.safetensors")
    with pytest.raises(mecha_core.MechaError, match=r"have no floating-point key of the same shape in common") as err:
        mecha_core.diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"))
    assert err.value.exit_code == 2


def test_loras_are_compared_as_the_deltas_they_convert_to(tmp_path):
    import mecha_lora.plugin
    from mecha_lora.tables import table

    module = table("sd1-ldm").by_kohya["unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"]
    g = torch.Generator().manual_seed(7)
    deltas = []
    for name in ("one", "two"):
        down, up = torch.randn(4, module.shape[1], generator=g), torch.randn(module.shape[0], 4, generator=g)
        save_file({f"{module.kohya_name}.lora_down.weight": down, f"{module.kohya_name}.lora_up.weight": up,
                   f"{module.kohya_name}.alpha": torch.tensor(2.0)}, tmp_path / f"{name}.safetensors")
        deltas.append((2.0 / 4 * up.double() @ down.double()).reshape(-1))
    with using(mecha_methods.plugin, mecha_sd1.plugin, mecha_lora.plugin):
        result = mecha_core.diff(str(tmp_path / "one.safetensors"), str(tmp_path / "two.safetensors"), keys=True)
    assert result.groups == (module.key,)
    measures = result.pairs[0].total
    x, y = deltas
    assert measures.elements == x.numel()
    for name, value in _expected(x, y).items():  # the converter computes in float32
        assert getattr(measures, name) == pytest.approx(value, rel=1e-5), name


def test_nan_in_an_input_is_null_in_json_not_invalid_json(tmp_path):
    import json

    save_file({"w": torch.tensor([1.0, float("nan")]), "v": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.tensor([1.0, 2.0]), "v": torch.full((2,), 2.0)}, tmp_path / "b.safetensors")
    result = mecha_core.diff(str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), keys=True)
    data = json.loads(json.dumps(result.as_json(), allow_nan=False))
    groups = {g["name"]: g for g in data["pairs"][0]["groups"]}
    assert groups["w"]["cosine"] is None and groups["w"]["relative_l2"] is None
    assert groups["v"]["cosine"] == pytest.approx(1.0) and groups["v"]["relative_l2"] == pytest.approx(1.0)
    assert math.isnan(result.pairs[0].groups[result.groups.index("w")].cosine)  # the value object keeps it


def test_two_models_sharing_a_shape_the_first_lacks_are_still_compared(tmp_path, capsys):
    save_file({"w": torch.ones(4), "v": torch.ones(3)}, tmp_path / "a.safetensors")
    save_file({"w": torch.ones(5), "v": torch.full((3,), 2.0)}, tmp_path / "b.safetensors")
    save_file({"w": torch.arange(5.0), "v": torch.full((3,), 3.0)}, tmp_path / "c.safetensors")
    result = mecha_core.diff(*(str(tmp_path / f"{n}.safetensors") for n in "abc"), keys=True, progress=True)
    ab, ac, bc = result.pairs
    assert (ab.unmatched_keys, ac.unmatched_keys, bc.unmatched_keys) == (1, 1, 0)
    assert (ab.total.keys, ac.total.keys, bc.total.keys) == (1, 1, 2)
    w = result.groups.index("w")
    # ones(5) vs 0..4: cos = 10 / (sqrt(5) sqrt(30))
    assert bc.groups[w].cosine == pytest.approx(10 / math.sqrt(5 * 30), rel=1e-12)
    assert ab.groups[w].keys == 0 and ab.groups[w].cosine is None
    assert "diffing 2/2 keys" in capsys.readouterr().err  # the progress line, on stderr
