"""Review findings in mecha_core: each test pins a bug a user could hit."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.testing import using, write_checkpoint


@pytest.fixture
def methods():
    with using(mecha_methods.plugin) as host:
        yield host


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


@pytest.mark.parametrize("size", ["infG", "nanM", "-5G", "0"])
def test_memory_budget_that_is_not_a_positive_size_is_a_one_line_error(tmp_path, size):
    from typer.testing import CliRunner

    from mecha_core.cli.app import app

    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(2)})
    recipe = tmp_path / "r.mecha"
    recipe.write_text(f'mecha 1\na = model("{os.path.basename(a)}")\nr = weighted_sum(a, a, alpha=0.5)\n')
    with using(mecha_methods.plugin):
        result = CliRunner().invoke(app, ["merge", str(recipe), "-o", str(tmp_path / "o.safetensors"),
                                          "--memory-budget", size, "-q"])
    assert result.exit_code == 2, result.output
    assert "--memory-budget" in result.output
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_path_that_starts_like_recipe_text_is_read_as_a_file(tmp_path, monkeypatch, methods):
    # "mecha runs/mix.mecha" (a folder named "mecha runs") is a path, not .mecha text
    folder = tmp_path / "mecha runs"
    folder.mkdir()
    write_checkpoint(folder / "a.safetensors", {"w": torch.tensor([2.0])})
    (folder / "mix.mecha").write_text('mecha 1\na = model("a.safetensors")\nr = scale(a, alpha=3.0)\n')
    monkeypatch.chdir(tmp_path)
    out = load_file(mecha.merge("mecha runs/mix.mecha", tmp_path / "o.safetensors"))
    assert out["w"].tolist() == [6.0]


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


def test_bare_model_name_skips_a_folder_of_that_name(tmp_path, monkeypatch, methods):
    # model("sd15") beside a folder "sd15" (a diffusers download) and the file "sd15.safetensors"
    (tmp_path / "sd15").mkdir()
    write_checkpoint(tmp_path / "sd15.safetensors", {"w": torch.tensor([2.0])})
    monkeypatch.chdir(tmp_path)
    out = load_file(mecha.merge(mecha.scale(mecha.model("sd15"), alpha=2.0), tmp_path / "o.safetensors"))
    assert out["w"].tolist() == [4.0]
    (tmp_path / "only_folder").mkdir()
    with pytest.raises(mecha.errors.PlanError, match="only_folder is a directory"):
        mecha.merge(mecha.model("only_folder"), tmp_path / "o.safetensors")


def test_one_relative_model_path_naming_two_files_is_refused(tmp_path, monkeypatch, methods):
    # two recipes from two folders both say model("m.safetensors") but mean different files;
    # the nodes compare equal, so the merge silently read X's file twice
    for folder, value in (("X", 0.0), ("Y", 10.0)):
        (tmp_path / folder).mkdir()
        write_checkpoint(tmp_path / folder / "m.safetensors", {"w": torch.tensor([value])})
        (tmp_path / folder / "r.mecha").write_text('mecha 1\nm = model("m.safetensors")\nscale(m, alpha=1.0)\n')
    monkeypatch.chdir(tmp_path)
    recipe = mecha.weighted_sum(mecha.load_recipe("X/r.mecha"), mecha.load_recipe("Y/r.mecha"), alpha=0.5)
    with pytest.raises(mecha.errors.PlanError, match="m.safetensors"):
        mecha.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
    # the same file reached from both recipes is fine
    same = mecha.weighted_sum(mecha.load_recipe("X/r.mecha"), mecha.load_recipe("X/r.mecha"), alpha=0.5)
    assert load_file(mecha.merge(same, tmp_path / "o.safetensors"))["w"].tolist() == [0.0]


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


def _raw_safetensors(path, header_json: str, data: bytes) -> None:
    import struct

    raw = header_json.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


@pytest.mark.parametrize("header", [
    '{"\\ud800x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    '{"__metadata__":{"note":"\\udfff"},"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
])
def test_header_with_a_lone_surrogate_is_a_one_line_error_not_a_crash(tmp_path, methods, header):
    # JSON accepts "\ud800" escapes, but no UTF-8 text holds them: writing the output header
    # crashed with UnicodeEncodeError after planning
    path = tmp_path / "bad.safetensors"
    _raw_safetensors(path, header, b"\x00\x00\x80\x3f")
    with pytest.raises(mecha.errors.SafetensorsError, match="bad.safetensors"):
        mecha.merge(mecha.scale(mecha.model(path), alpha=2.0), tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_recipe_string_with_a_lone_surrogate_is_a_recipe_error_not_a_crash(tmp_path, methods):
    a = write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    text = 'mecha 1\na = model("a.safetensors")\nb = cast(a, dtype="\\udc80")\n'
    with pytest.raises(mecha.errors.RecipeError, match=r"<recipe>:3:.*surrogate"):
        mecha.load_recipe(text)
    # built in Python, a free-form string fails when the recipe is printed (before any file is
    # written); one with fixed choices (cast's dtype) already when the call is built
    with pytest.raises(mecha.errors.RecipeError, match=r"^cast\(dtype='\\udc80'\): use one of"):
        mecha.cast(mecha.model(a), dtype="\udc80")
    recipe = mecha.pick_component(mecha.model(a), component="\udc80")
    with pytest.raises(mecha.errors.RecipeError, match="surrogate"):
        mecha.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_api_merge_refuses_to_write_over_its_own_recipe_file(tmp_path, methods):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    recipe = tmp_path / "r.mecha"
    text = 'mecha 1\na = model("a.safetensors")\nscale(a, alpha=2.0)\n'
    recipe.write_text(text)
    with pytest.raises(mecha.errors.OutputError, match="recipe"):
        mecha.merge(str(recipe), recipe)
    assert recipe.read_text() == text


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
