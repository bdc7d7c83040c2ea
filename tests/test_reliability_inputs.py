"""Inputs that disagree, and values that are not finite, through ``mecha merge``."""

from __future__ import annotations

import struct

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.engine.safetensors_io import SafetensorsFile
from mecha_core.testing import read_tensors, using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
PREVIOUS = b"an earlier merge the user wants to keep"


@pytest.fixture
def work(tmp_path):
    (tmp_path / "merged.safetensors").write_bytes(PREVIOUS)
    with using(mecha_methods.plugin):
        yield tmp_path


def merge(folder, recipe: str, *options: str):
    """Run the recipe into merged.safetensors; returns the result and the folder as it was just
    before the command ran."""
    path = folder / "recipe.mecha"
    path.write_text("mecha 1\n" + recipe)
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(path), "-o", str(folder / "merged.safetensors"), "--quiet",
                                 *options])
    return result, before


def raw_bytes(path, key: str) -> bytes:
    f = SafetensorsFile(path)
    try:
        start = f.data_start + f._entries[key].begin
        with open(path, "rb") as fh:
            fh.seek(start)
            return fh.read(f.nbytes(key))
    finally:
        f.close()


def test_same_key_different_shapes_names_key_and_both_shapes(work):
    write_checkpoint(work / "a.safetensors", {"w": torch.zeros(4, 4), "bias": torch.zeros(4)})
    write_checkpoint(work / "b.safetensors", {"w": torch.zeros(4, 5), "bias": torch.zeros(4)})
    result, before = merge(work, 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n')
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'w'", "[4, 4]", "[4, 5]", "a.safetensors", "b.safetensors"))


def test_non_float_key_with_different_shapes_is_refused(work):
    write_checkpoint(work / "a.safetensors", {"ids": torch.arange(3)})
    write_checkpoint(work / "b.safetensors", {"ids": torch.arange(5)})
    result, before = merge(work, 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n')
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'ids'", "[3]", "[5]"))


def test_missing_key_is_named_and_allow_missing_takes_the_first_input(work):
    extra = torch.tensor([1.5, -2.25, 3.0])
    write_checkpoint(work / "a.safetensors", {"w": torch.ones(2, 2), "extra": extra})
    write_checkpoint(work / "b.safetensors", {"w": torch.full((2, 2), 3.0)})
    recipe = 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b, alpha=0.5)\n'
    result, before = merge(work, recipe)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'extra'", "b.safetensors", "--allow-missing"))

    result, before = merge(work, recipe, "--allow-missing")
    assert result.exit_code == 0, result.output
    out = read_tensors(work / "merged.safetensors")
    assert out["extra"].tolist() == [1.5, -2.25, 3.0]
    assert out["w"].tolist() == [[2.0, 2.0], [2.0, 2.0]]  # (1 + 3) / 2


def test_missing_key_in_the_first_input_is_named(work):
    write_checkpoint(work / "a.safetensors", {"w": torch.ones(2)})
    write_checkpoint(work / "b.safetensors", {"w": torch.ones(2), "only_in_b": torch.ones(2)})
    result, before = merge(work, 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n')
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'only_in_b'", "a.safetensors"))


def test_non_float_keys_are_copied_from_the_first_input(work):
    ids_a = torch.tensor([7, -3, 2**40], dtype=torch.int64)
    flags_a = torch.tensor([True, False, True])
    write_checkpoint(work / "a.safetensors", {"w": torch.tensor([0.0, 4.0]), "ids": ids_a,
                                              "flags": flags_a, "small": torch.tensor([1, 2], dtype=torch.uint8)})
    write_checkpoint(work / "b.safetensors", {"w": torch.tensor([8.0, 0.0]), "ids": torch.tensor([1, 2, 3]),
                                              "flags": torch.tensor([False, True, False]),
                                              "small": torch.tensor([250, 251], dtype=torch.uint8)})
    result, before = merge(work, 'a = model("a.safetensors")\nb = model("b.safetensors")\n'
                         'weighted_sum(a, b, alpha=0.25)\n')
    assert result.exit_code == 0, result.output
    out = work / "merged.safetensors"
    for key in ("ids", "flags", "small"):
        assert raw_bytes(out, key) == raw_bytes(work / "a.safetensors", key), key
    assert raw_bytes(out, "ids") == struct.pack("<3q", 7, -3, 2**40)
    assert read_tensors(out)["w"].tolist() == [2.0, 3.0]  # 0.75 * a + 0.25 * b


def test_nan_in_an_input_is_reported_by_key(work):
    write_checkpoint(work / "a.safetensors", {"fine": torch.ones(3), "broken": torch.tensor([1.0, float("nan"), 2.0])})
    write_checkpoint(work / "b.safetensors", {"fine": torch.ones(3), "broken": torch.ones(3)})
    recipe = 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n'
    result, before = merge(work, recipe)
    message = check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                                  fragments=("'broken'", "NaN", "--allow-nonfinite"), code=1)
    assert "'fine'" not in message

    result, before = merge(work, recipe, "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    broken = read_tensors(work / "merged.safetensors")["broken"]
    assert broken[0].item() == 1.0 and torch.isnan(broken[1]) and broken[2].item() == 1.5


def test_inf_produced_by_a_method_is_reported_by_key(work):
    # float32 tops out near 3.4e38: 1e38 * [10, -20] overflows to +-inf, 1e38 * [1, 2] does not
    write_checkpoint(work / "a.safetensors", {"w": torch.tensor([10.0, -20.0]), "z": torch.tensor([1.0, 2.0])})
    result, before = merge(work, 'a = model("a.safetensors")\nscale(a, alpha=1e38)\n')
    message = check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                                  fragments=("'w'", "2 NaN/Inf"), code=1)
    assert "'z'" not in message

    result, _ = merge(work, 'a = model("a.safetensors")\nscale(a, alpha=1e38)\n', "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    out = read_tensors(work / "merged.safetensors")
    assert out["w"].tolist() == [float("inf"), float("-inf")]
    assert out["z"].tolist() == [torch.tensor(1e38).item(), torch.tensor(2e38).item()]


def test_overflow_into_the_output_dtype_is_reported(work):
    """Finite in the float32 work dtype, infinite once stored as float16 (max 65504)."""
    write_checkpoint(work / "a.safetensors", {"w": torch.tensor([100.0, 1.0], dtype=torch.float16)})
    result, before = merge(work, 'a = model("a.safetensors")\nscale(a, alpha=1000.0)\n')
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("'w'", "float16"), code=1)

    result, before = merge(work, 'a = model("a.safetensors")\nscale(a, alpha=1000.0)\n', "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert read_tensors(work / "merged.safetensors")["w"].tolist() == [float("inf"), 1000.0]


def test_hostile_key_names_cannot_reach_the_terminal(work):
    """A key name holding terminal escape codes is printed escaped."""
    key = "evil\x1b[2J\x07key"
    write_checkpoint(work / "a.safetensors", {key: torch.zeros(2)})
    write_checkpoint(work / "b.safetensors", {key: torch.zeros(3)})
    result, before = merge(work, 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n')
    message = check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                                  fragments=("evil\\x1b[2J\\x07key", "[2]", "[3]"))
    assert "\x1b" not in message and "\x07" not in message


@pytest.mark.parametrize("threads", ["0", "-2"])
def test_a_thread_count_below_one_is_refused(work, threads):
    write_checkpoint(work / "a.safetensors", {"w": torch.ones(2)})
    write_checkpoint(work / "b.safetensors", {"w": torch.zeros(2)})
    recipe = 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b)\n'
    result, before = merge(work, recipe, "--threads", threads)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("threads", threads))


def test_a_nan_parameter_value_names_the_parameter(work):
    write_checkpoint(work / "a.safetensors", {"w": torch.ones(2)})
    write_checkpoint(work / "b.safetensors", {"w": torch.zeros(2)})
    recipe = 'a = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b, alpha=parameter("mix"))\n'
    result, before = merge(work, recipe, "-p", "mix=nan")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("-p mix", "NaN"))


def test_inspect_gives_small_files_a_readable_size(work):
    write_checkpoint(work / "a.safetensors", {"w": torch.ones(10)})  # 40 bytes of data
    result = runner.invoke(app, ["inspect", str(work / "a.safetensors")])
    assert result.exit_code == 0, result.output
    assert "40 B" in result.stdout and "0.0 MB" not in result.stdout


# -- model and recipe paths (the `methods` fixture: conftest.py)


def test_recipe_path_that_starts_like_recipe_text_is_read_as_a_file(tmp_path, monkeypatch, methods):
    # "mecha runs/mix.mecha" (a folder named "mecha runs") is a path, not .mecha text
    folder = tmp_path / "mecha runs"
    folder.mkdir()
    write_checkpoint(folder / "a.safetensors", {"w": torch.tensor([2.0])})
    (folder / "mix.mecha").write_text('mecha 1\na = model("a.safetensors")\nr = scale(a, alpha=3.0)\n')
    monkeypatch.chdir(tmp_path)
    out = load_file(mecha.merge("mecha runs/mix.mecha", tmp_path / "o.safetensors"))
    assert out["w"].tolist() == [6.0]


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
