"""The streaming engine: values, dtypes, key handling, determinism, atomic output, memory."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.errors import MergeError, PlanError, PluginCodeError
from mecha_core.plugins import plugin_from_functions
from mecha_core.testing import host_with, using, write_checkpoint


def _rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_weighted_sum_matches_closed_form_per_dtype(tmp_path, methods):
    a = {"h": _rand(40, 30, dtype=torch.float16, seed=1), "b": _rand(30, dtype=torch.bfloat16, seed=2),
         "f": _rand(5, 7, seed=3), "ids": torch.arange(10)}
    b = {"h": _rand(40, 30, dtype=torch.float16, seed=4), "b": _rand(30, dtype=torch.bfloat16, seed=5),
         "f": _rand(5, 7, seed=6), "ids": torch.arange(10) * 3}
    pa = write_checkpoint(tmp_path / "a.safetensors", a)
    pb = write_checkpoint(tmp_path / "b.safetensors", b)
    out = mecha.merge(mecha.weighted_sum(mecha.model(pa), mecha.model(pb), alpha=0.25), tmp_path / "o.safetensors")
    got = load_file(out)
    assert set(got) == set(a)
    for key in ("h", "b", "f"):
        expected = (a[key].double() * 0.75 + b[key].double() * 0.25)
        assert got[key].dtype == a[key].dtype  # default output dtype: the first input's
        # computed in float32, then rounded once to the stored dtype
        assert torch.equal(got[key], expected.float().to(a[key].dtype)) or torch.allclose(
            got[key].double(), expected, rtol=1e-2, atol=1e-3)
    assert torch.equal(got["h"], (a["h"].float() * 0.75 + b["h"].float() * 0.25).half())
    assert torch.equal(got["ids"], a["ids"])  # integer buffers are copied from the first input


def test_output_and_work_dtype_options(tmp_path, methods):
    a = {"w": _rand(64, seed=1, dtype=torch.float16)}
    b = {"w": _rand(64, seed=2, dtype=torch.float16)}
    pa = write_checkpoint(tmp_path / "a.safetensors", a)
    pb = write_checkpoint(tmp_path / "b.safetensors", b)
    recipe = mecha.weighted_sum(mecha.model(pa), mecha.model(pb), alpha=0.3)
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors", output_dtype="float32", work_dtype="float64"))
    assert out["w"].dtype == torch.float32
    assert torch.equal(out["w"], (a["w"].double() * 0.7 + b["w"].double() * 0.3).float())


def test_add_difference_three_models_and_n_average(tmp_path, methods):
    ms = [{"w": _rand(16, 8, seed=i), "v": _rand(3, seed=10 + i)} for i in range(4)]
    paths = [write_checkpoint(tmp_path / f"m{i}.safetensors", m) for i, m in enumerate(ms)]
    nodes = [mecha.model(p) for p in paths]
    out = load_file(mecha.merge(mecha.add_difference(nodes[0], nodes[1], nodes[2], alpha=0.5),
                                tmp_path / "ad.safetensors"))
    for k in ("w", "v"):
        assert torch.allclose(out[k], ms[0][k] + 0.5 * (ms[1][k] - ms[2][k]), rtol=1e-6, atol=1e-7)
    out = load_file(mecha.merge(mecha.n_average(*nodes), tmp_path / "avg.safetensors"))
    for k in ("w", "v"):
        assert torch.allclose(out[k], sum(m[k] for m in ms) / 4, rtol=1e-6, atol=1e-7)


def test_shared_subresult_is_computed_once_per_key(tmp_path):
    calls = []

    @mecha.merge_method
    def counted(a, *, tag: int = 0):
        """Counts its calls."""
        calls.append(tag)
        return a * 2

    @mecha.merge_method
    def plus(a, b):
        """a + b"""
        return a + b

    host = host_with(plugin_from_functions("p", mecha_merge_methods=lambda: [counted, plus]), names=["p"])
    with using(host):
        p = write_checkpoint(tmp_path / "a.safetensors", {"k1": torch.ones(3), "k2": torch.ones(2)})
        shared = counted(mecha.model(p))
        again = counted(mecha.model(p))  # structurally equal: the same sub-result
        out = load_file(mecha.merge(plus(shared, again), tmp_path / "o.safetensors"))
    assert len(calls) == 2  # once per key, not twice per key
    assert torch.equal(out["k1"], torch.full((3,), 4.0))


def test_missing_keys_error_lists_them_and_allow_missing_takes_first(tmp_path, methods):
    a = {"both": torch.ones(2), "only_a": torch.ones(3)}
    b = {"both": torch.zeros(2), "only_b": torch.zeros(4)}
    pa = write_checkpoint(tmp_path / "a.safetensors", a)
    pb = write_checkpoint(tmp_path / "b.safetensors", b)
    recipe = mecha.weighted_sum(mecha.model(pa), mecha.model(pb), alpha=0.5)
    with pytest.raises(PlanError, match=r"only_(a|b)"):
        mecha.merge(recipe, tmp_path / "o.safetensors")
    assert not os.path.exists(tmp_path / "o.safetensors")
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors", allow_missing=True))
    assert set(out) == {"both", "only_a", "only_b"}
    assert torch.equal(out["only_a"], a["only_a"]) and torch.equal(out["only_b"], b["only_b"])
    assert torch.equal(out["both"], torch.full((2,), 0.5))


def test_fallback_covers_missing_keys(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"x": torch.ones(2)})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"x": torch.zeros(2), "y": torch.full((3,), 7.0)})
    out = load_file(mecha.merge(mecha.model(pa) | mecha.model(pb), tmp_path / "o.safetensors"))
    assert torch.equal(out["x"], torch.ones(2)) and torch.equal(out["y"], torch.full((3,), 7.0))


def test_delta_missing_a_key_leaves_the_base_untouched(tmp_path, methods):
    base = {"touched": _rand(4, 4, seed=1), "untouched": _rand(5, seed=2, dtype=torch.float16)}
    delta = {"touched": _rand(4, 4, seed=3)}
    pb = write_checkpoint(tmp_path / "base.safetensors", base)
    pd = write_checkpoint(tmp_path / "delta.safetensors", delta)
    recipe = mecha.add_difference(mecha.model(pb), mecha.model(pd, type="delta"), alpha=0.5)
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors"))
    assert torch.equal(out["untouched"], base["untouched"])
    assert torch.allclose(out["touched"], base["touched"] + 0.5 * delta["touched"])


def test_shape_mismatch_names_key_and_both_shapes(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2, 3)})
    pb = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(3, 2)})
    with pytest.raises(PlanError) as err:
        mecha.merge(mecha.weighted_sum(mecha.model(pa), mecha.model(pb)), tmp_path / "o.safetensors")
    msg = str(err.value)
    assert "'w'" in msg and "[2, 3]" in msg and "[3, 2]" in msg and "b.safetensors" in msg


def test_same_bytes_for_any_thread_count_and_slice_size(tmp_path, methods):
    tensors = [{f"k{j}": _rand(300 + 17 * j, 129, seed=10 * i + j, dtype=torch.float16) for j in range(6)}
               for i in range(3)]
    paths = [write_checkpoint(tmp_path / f"m{i}.safetensors", t) for i, t in enumerate(tensors)]
    recipe = mecha.add_difference(mecha.model(paths[0]), mecha.model(paths[1]), mecha.model(paths[2]), alpha=0.7)
    digests = set()
    for threads, chunk in ((1, 1 << 20), (2, 1 << 20), (4, 1000), (3, 4097)):
        out = tmp_path / f"o_{threads}_{chunk}.safetensors"
        mecha.merge(recipe, out, threads=threads, chunk_elements=chunk, memory_budget=1 << 20)
        digests.add(_digest(out))
    assert len(digests) == 1


def test_output_file_layout_is_valid_safetensors(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"z": torch.ones(3, dtype=torch.float16), "a": torch.ones(1)})
    out = mecha.merge(mecha.scale(mecha.model(pa), alpha=2.0), tmp_path / "o.safetensors")
    raw = open(out, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    assert header["__metadata__"]["mecha_recipe"].startswith("mecha 1\n")
    assert "time" not in json.dumps(header["__metadata__"])
    assert str(tmp_path) not in header["__metadata__"]["mecha_plugins"]
    with safe_open(out, "pt") as f:
        assert torch.equal(f.get_tensor("z"), torch.full((3,), 2.0, dtype=torch.float16))
        assert set(f.keys()) == {"z", "a"}


def test_output_bytes_do_not_depend_on_output_name(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": _rand(50, seed=1)})
    recipe = mecha.scale(mecha.model(pa), alpha=0.5)
    first = mecha.merge(recipe, tmp_path / "one.safetensors")
    os.makedirs(tmp_path / "sub")
    second = mecha.merge(recipe, tmp_path / "sub" / "two.safetensors", threads=1)
    assert _digest(first) == _digest(second)


def test_failure_mid_merge_leaves_existing_output_untouched(tmp_path):
    @mecha.merge_method
    def explode_on_b(a, *, ctx):
        """Fails on key 'b'."""
        if ctx.key == "b":
            raise ValueError("boom")
        return a

    host = host_with(plugin_from_functions("p", mecha_merge_methods=lambda: [explode_on_b]), names=["p"])
    with using(host):
        pa = write_checkpoint(tmp_path / "a.safetensors", {"a": torch.ones(2), "b": torch.ones(2), "c": torch.ones(2)})
        target = tmp_path / "out.safetensors"
        target.write_bytes(b"previous result")
        with pytest.raises(PluginCodeError, match=r"^plugin 'p': method 'explode_on_b' failed on key 'b' "
                                                  r"\(file a\.safetensors\): ValueError: boom$"):
            mecha.merge(explode_on_b(mecha.model(pa)), target)
    assert target.read_bytes() == b"previous result"
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "out.safetensors"]


def test_success_replaces_existing_output(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"old")
    mecha.merge(mecha.scale(mecha.model(pa), alpha=3.0), target)
    assert torch.equal(load_file(target)["w"], torch.full((2,), 3.0))
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "out.safetensors"]


def test_nonfinite_result_is_reported_by_key(tmp_path, methods):
    pa = write_checkpoint(tmp_path / "a.safetensors", {"good": torch.ones(2), "bad": torch.tensor([1.0, float("inf")])})
    recipe = mecha.scale(mecha.model(pa), alpha=1.0)
    with pytest.raises(MergeError, match="'bad'"):
        mecha.merge(recipe, tmp_path / "o.safetensors")
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors", allow_nonfinite=True))
    assert torch.isinf(out["bad"][1])


def _private_peak_script(paths, out, extra=""):
    return textwrap.dedent(f"""
        import json
        import torch  # noqa: F401  (imported before the baseline, as a merge would)
        import mecha_core as m
        from mecha_core.testing import PeakPrivateMemory
        paths = {paths!r}
        with PeakPrivateMemory() as memory:
            m.merge(m.n_average(*[m.model(p) for p in paths]), {out!r}{extra})
        print(json.dumps({{"baseline": memory.start, "peak": memory.peak}}))
    """)


def test_many_model_merge_memory_is_bounded(tmp_path):
    """Sixteen 32 MB models: loading them would cost 512 MB (1 GB in float32); streaming costs a few slices."""
    n, numel = 16, 16 * 1024 * 1024
    paths = []
    for i in range(n):
        t = {"big": torch.full((numel,), float(i), dtype=torch.float16), "small": torch.full((10,), float(i))}
        paths.append(write_checkpoint(tmp_path / f"m{i}.safetensors", t))
    script = _private_peak_script(paths, str(tmp_path / "o.safetensors"), ", threads=2")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    grown = stats["peak"] - stats["baseline"]
    total_inputs = n * numel * 2
    print(f"private memory grew by {grown / 1e6:.0f} MB")
    assert grown < total_inputs / 2, f"private memory grew by {grown / 1e6:.0f} MB"
    out = load_file(tmp_path / "o.safetensors")
    assert torch.equal(out["big"][:5], torch.full((5,), sum(range(n)) / n, dtype=torch.float16))


def test_hyperparameter_of_the_wrong_kind_is_refused_before_writing(tmp_path, methods):
    from mecha_core.errors import RecipeError

    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    with pytest.raises(RecipeError, match=r"alpha.*half"):
        mecha.merge(mecha.weighted_sum(mecha.model(pa), mecha.model(pa), alpha="half"), tmp_path / "o.safetensors")
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_progress_line_reports_keys_bytes_rate_and_eta(capsys):
    from mecha_core.engine.schedule import Progress

    p = Progress(total_keys=2, total_bytes=2_000_000, enabled=True)
    p.update(1_000_000, key_done=True)
    p.update(1_000_000, key_done=True)
    p.close()
    err = capsys.readouterr().err
    assert "2/2 keys" in err and "2.0 MB/2.0 MB" in err and "/s" in err and "ETA" in err
    quiet = Progress(total_keys=1, total_bytes=1, enabled=False)
    quiet.update(1, key_done=True)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_deep_recipe_chain_evaluates(tmp_path, methods):
    """Hundreds of chained steps (e.g. many LoRAs applied in turn) must not hit recursion limits."""
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(4)})
    pd = write_checkpoint(tmp_path / "d.safetensors", {"w": torch.full((4,), 0.5)})
    node = mecha.model(pa)
    delta = mecha.model(pd, type="delta")
    for i in range(400):
        node = mecha.add_difference(node, delta, alpha=0.01 * (i % 3))
    out = load_file(mecha.merge(node, tmp_path / "o.safetensors"))
    expected = torch.ones(4)
    for i in range(400):
        expected = expected + torch.full((4,), 0.5) * (0.01 * (i % 3))
    assert torch.allclose(out["w"], expected, rtol=1e-5)


def test_bare_model_names_find_safetensors_files_even_with_dots(tmp_path, methods):
    write_checkpoint(tmp_path / "ghostmix_v2.0.safetensors", {"w": torch.ones(2)})
    write_checkpoint(tmp_path / "plain.safetensors", {"w": torch.zeros(2)})
    recipe = mecha.weighted_sum(mecha.model("ghostmix_v2.0"), mecha.model("plain"), alpha=0.25)
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors", models_dir=tmp_path))
    assert torch.equal(out["w"], torch.full((2,), 0.75))


def test_converter_plan_may_read_the_file_metadata(tmp_path, methods):
    from mecha_core.specs import ConvertedKey, Converter, ModelType

    def plan(header, metadata):
        scale = float(metadata["scale"])
        return {k.removeprefix("scaled."): ConvertedKey(info, (k,), lambda t, k=k: t[k] * scale)
                for k, info in header.items()}

    plugin = plugin_from_functions(
        "scaled",
        mecha_model_types=lambda: [ModelType("scaled", "delta",
                                             detect=lambda keys: all(k.startswith("scaled.") for k in keys)
                                             and bool(keys))],
        mecha_converters=lambda: [Converter("scaled-to-delta", None, "scaled", None, "delta", plan)],
    )
    host = host_with(mecha_methods.plugin, plugin, names=["methods", "scaled"])
    with using(host):
        pb = write_checkpoint(tmp_path / "base.safetensors", {"w": torch.ones(3)})
        pd = write_checkpoint(tmp_path / "d.safetensors", {"scaled.w": torch.full((3,), 2.0)},
                              metadata={"scale": "0.25"})
        out = load_file(mecha.merge(mecha.add_difference(mecha.model(pb), mecha.model(pd)), tmp_path / "o.safetensors"))
    assert torch.equal(out["w"], torch.full((3,), 1.5))


def test_nonfinite_in_a_sliced_key_says_which_elements(tmp_path, methods):
    values = torch.ones(100)
    values[57] = float("nan")
    pa = write_checkpoint(tmp_path / "a.safetensors", {"w": values})
    with pytest.raises(MergeError, match=r"key 'w': 1 NaN/Inf value\(s\) in the result \(elements 50\.\.74 of 100\)"):
        mecha.merge(mecha.scale(mecha.model(pa), alpha=2.0), tmp_path / "o.safetensors", chunk_elements=25, threads=1)


# -- missing keys, output dtypes, block maps


def test_allow_missing_difference_of_weights_lacking_a_key_is_zero_not_a_weight(tmp_path, methods):
    # subtract(d, e) where e lacks "y": the difference must not be d's whole weight, or
    # add(c, ...) doubles the weight: c.y + d.y instead of c.y.
    c = write_checkpoint(tmp_path / "c.safetensors", {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([10.0])})
    d = write_checkpoint(tmp_path / "d.safetensors", {"x": torch.tensor([5.0, 7.0]), "y": torch.tensor([20.0])})
    e = write_checkpoint(tmp_path / "e.safetensors", {"x": torch.tensor([4.0, 4.0])})
    recipe = mecha.add(mecha.model(c), mecha.subtract(mecha.model(d), mecha.model(e)))
    out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors", allow_missing=True))
    assert out["x"].tolist() == [1.0 + 1.0, 2.0 + 3.0]
    assert out["y"].tolist() == [10.0]


def test_output_dtype_float8_e4m3fn_refuses_values_it_would_clamp(tmp_path, methods):
    # float8_e4m3fn has no infinity: torch clamps 1000.0 to 448.0 silently, so the overflow
    # check (which looks for Inf after the cast) must catch it before.
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1000.0, 1.0])})
    b = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([1000.0, 3.0])})
    recipe = mecha.weighted_sum(mecha.model(a), mecha.model(b), alpha=0.5)
    with pytest.raises(mecha.errors.MergeError, match="overflow float8_e4m3fn"):
        mecha.merge(recipe, tmp_path / "o.safetensors", output_dtype="float8_e4m3fn")
    assert not (tmp_path / "o.safetensors").exists()
    # in range (450 rounds to 448, as float16 rounds 65519 to 65504): written
    c = write_checkpoint(tmp_path / "c.safetensors", {"w": torch.tensor([450.0, 2.0])})
    out = load_file(mecha.merge(mecha.weighted_sum(mecha.model(c), mecha.model(c), alpha=0.5),
                                tmp_path / "o.safetensors", output_dtype="float8_e4m3fn"))
    assert out["w"].float().tolist() == [448.0, 2.0]


def test_float16_output_accepts_values_that_round_down_to_its_largest_and_refuses_inf(tmp_path, methods):
    # 65510 is above float16's largest finite value (65504) but rounds down to it; 65520 rounds to Inf
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([65510.0, -65510.0, 1.0])})
    out = load_file(mecha.merge(mecha.weighted_sum(mecha.model(a), mecha.model(a), alpha=0.5),
                                tmp_path / "o.safetensors", output_dtype="float16"))
    assert out["w"].dtype == torch.float16 and out["w"].float().tolist() == [65504.0, -65504.0, 1.0]
    b = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([1.0, -65520.0, 65520.0, 2.0])})
    with pytest.raises(mecha.errors.MergeError, match="2 value.*overflow float16"):
        mecha.merge(mecha.weighted_sum(mecha.model(b), mecha.model(b), alpha=0.5),
                    tmp_path / "p.safetensors", output_dtype="float16")
    assert not (tmp_path / "p.safetensors").exists()
    # a NaN anywhere in a long key is found (the check reduces; it must not miss one)
    c = torch.randn(100_003)
    c[77_777] = float("nan")
    cpath = write_checkpoint(tmp_path / "c.safetensors", {"w": c})
    with pytest.raises(mecha.errors.MergeError, match="1 NaN/Inf"):
        mecha.merge(mecha.weighted_sum(mecha.model(cpath), mecha.model(cpath), alpha=0.5), tmp_path / "q.safetensors")


def test_float64_key_copied_unchanged_keeps_its_bits(tmp_path, methods):
    # a key taken from the first input (--allow-missing) or a recipe that is one model is a copy:
    # it must not go through the float32 work dtype
    value = torch.tensor([1.0 + 2.0 ** -40, 1e-300], dtype=torch.float64)
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1), "only_a": value})
    b = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.ones(1)})
    out = load_file(mecha.merge(mecha.weighted_sum(mecha.model(a), mecha.model(b), alpha=0.5),
                                tmp_path / "o.safetensors", allow_missing=True))
    assert torch.equal(out["only_a"], value)
    out = load_file(mecha.merge(mecha.model(a), tmp_path / "o2.safetensors"))
    assert torch.equal(out["only_a"], value)


def test_block_map_of_another_architecture_is_refused_not_silently_the_default(tmp_path):
    # blocks("sdxl-sgm", ...) on an sd1 merge matches no key: every key would silently take
    # the method's default alpha
    import mecha_sd1.plugin
    import mecha_sdxl.plugin
    from mecha_core.kit import synthetic
    from mecha_sd1 import layout

    arch = layout.architecture()
    keys = [k for k, s in arch.keys.items() if not s.optional and len(s.shape) == 1]
    table = synthetic.key_table(arch, keys, "float32")
    synthetic.write_layout(tmp_path / "a.safetensors", table, seed=1)
    synthetic.write_layout(tmp_path / "b.safetensors", table, seed=2)
    with using(mecha_methods.plugin, mecha_sd1.plugin, mecha_sdxl.plugin):
        a, b = mecha.model(tmp_path / "a.safetensors"), mecha.model(tmp_path / "b.safetensors")
        with pytest.raises(mecha.errors.PlanError, match="sdxl-sgm"):
            mecha.merge(mecha.weighted_sum(a, b, alpha=mecha.blocks("sdxl-sgm", IN04=0.9)),
                        tmp_path / "o.safetensors")
        assert not (tmp_path / "o.safetensors").exists()
        # the architecture's own map still merges
        out = load_file(mecha.merge(mecha.weighted_sum(a, b, alpha=mecha.blocks("sd1-ldm", default=1.0)),
                                    tmp_path / "o.safetensors"))
        assert torch.equal(out[keys[0]], load_file(tmp_path / "b.safetensors")[keys[0]])


class _IntBlocksPlugin:
    """A toy architecture with one key in two blocks, and a method whose hyperparameter is an int."""

    @staticmethod
    @mecha.hookimpl
    def mecha_architectures():
        from mecha_core.specs import Architecture, KeySpec

        keys = {"shared": KeySpec((2,), "float32", "net", blocks=("B0", "B1")),
                "only_b1": KeySpec((2,), "float32", "net", blocks=("B1",))}
        return [Architecture("toy-int", keys, blocks=("B0", "B1"))]

    @staticmethod
    @mecha.hookimpl
    def mecha_merge_methods():
        @mecha.merge_method
        def stamp_count(a, *, count: int = 0):
            assert type(count) is int, f"count arrived as {type(count).__name__}"
            return torch.full_like(a, float(count))

        return [stamp_count]


def test_int_hyperparameter_from_a_block_map_stays_an_int(tmp_path):
    a = write_checkpoint(tmp_path / "a.safetensors", {"shared": torch.zeros(2), "only_b1": torch.zeros(2)})
    with using(_IntBlocksPlugin):
        # "shared" sits in B0 and B1: the mean of 2 and 5 is 3.5, which rounds half to even to 4
        recipe = mecha.stamp_count(mecha.model(a), count=mecha.blocks("toy-int", B0=2, B1=5))
        out = load_file(mecha.merge(recipe, tmp_path / "o.safetensors"))
        assert out["shared"].tolist() == [4.0, 4.0] and out["only_b1"].tolist() == [5.0, 5.0]
        # a non-whole value in a map for an int hyperparameter is refused before anything is written
        bad = mecha.stamp_count(mecha.model(a), count=mecha.blocks("toy-int", B0=2.5))
        with pytest.raises(mecha.errors.RecipeError, match="count.*must be int"):
            mecha.merge(bad, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


class _OptionalKeyPlugin:
    @staticmethod
    @mecha.hookimpl
    def mecha_architectures():
        from mecha_core.specs import Architecture, KeySpec

        keys = {"w": KeySpec((2,), "float32", "net"),
                "last_layer": KeySpec((2,), "float32", "net", optional=True)}
        return [Architecture("toy-opt", keys)]


def test_a_delta_for_an_optional_key_the_weights_lack_is_dropped_not_an_error(tmp_path):
    # exporters drop the last CLIP layer (optional in the layout); a LoRA trained with it must
    # still apply. A delta key that is not optional still needs --allow-missing.
    import mecha_methods.plugin as methods_plugin

    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0])})
    b = write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([3.0, 3.0]), "last_layer": torch.ones(2)})
    c = write_checkpoint(tmp_path / "c.safetensors", {"w": torch.tensor([1.0, 1.0]), "last_layer": torch.zeros(2)})
    with using(methods_plugin, _OptionalKeyPlugin):
        def recipe(arch):
            return mecha.add(mecha.model(a, arch=arch),
                             mecha.subtract(mecha.model(b, arch=arch), mecha.model(c, arch=arch)))

        out = load_file(mecha.merge(recipe("toy-opt"), tmp_path / "o.safetensors"))
        assert sorted(out) == ["w"] and out["w"].tolist() == [3.0, 4.0]
        # a key the layout does not list at all
        b = write_checkpoint(tmp_path / "b2.safetensors", {"w": torch.tensor([3.0, 3.0]), "stray": torch.ones(2)})
        c = write_checkpoint(tmp_path / "c2.safetensors", {"w": torch.tensor([1.0, 1.0]), "stray": torch.zeros(2)})
        with pytest.raises(mecha.errors.PlanError, match="a delta input has 1 key.*'stray'"):
            mecha.merge(recipe("toy-opt"), tmp_path / "p.safetensors")
