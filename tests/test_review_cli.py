"""Review findings in the CLI and the recipe layer: each test pins a problem a user could hit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
HEAD = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'
TEMPLATE = ('mecha 1\nbase = parameter("base")\ntuned = parameter("tuned")\nk = parameter("k")\n'
            "add_difference(base, tuned, base, alpha=k)\n")


@pytest.fixture
def work(tmp_path, monkeypatch):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([3.0, 6.0])})
    (tmp_path / "template.mecha").write_text(TEMPLATE)
    monkeypatch.chdir(tmp_path)
    with using(mecha_methods.plugin):
        yield tmp_path


def merge(folder, text: str, *options: str, output: str = "merged.safetensors"):
    (folder / "recipe.mecha").write_bytes(text.encode())
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(folder / "recipe.mecha"), "-o", output, "-q", *options])
    return result, before


def compose(*args: str):
    return runner.invoke(app, ["compose", "template.mecha", *args])


# -- compose must never destroy a file ----------------------------------------------------------
@pytest.mark.parametrize("base_fill,fragment", [
    ("target.safetensors", "-p base"),       # -o is one of the fills
    ("a.safetensors", "safetensors model"),  # -o is some other model
])
def test_compose_never_writes_recipe_text_over_a_model(work, base_fill, fragment):
    write_checkpoint(work / "target.safetensors", {"w": torch.tensor([5.0, 5.0])})
    before = snapshot(work)
    result = compose("-p", "base", base_fill, "-p", "tuned", "b.safetensors", "-p", "k", "0.5",
                     "-o", "target.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("target.safetensors", fragment))


# -- one name, one parameter --------------------------------------------------------------------
def test_a_parameter_declared_with_two_spaces_is_refused_at_its_line(work):
    text = ('mecha 1\nk = parameter("k")\nj = parameter("k", space="delta")\na = model("a.safetensors")\n'
            'b = model("b.safetensors")\nc = add(a, j)\nweighted_sum(c, b, alpha=k)\n')
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:3:5", "parameter 'k'", "different merge spaces"))


def test_a_parameter_used_as_input_and_hyperparameter_is_refused(work):
    text = 'mecha 1\nk = parameter("k")\na = model("a.safetensors")\nweighted_sum(a, k, alpha=k)\n'
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:2:5", "both a method's input and a hyperparameter"))


def test_compose_refuses_a_fill_that_brings_a_clashing_parameter(work):
    (work / "fill.mecha").write_text('mecha 1\nk = parameter("k", space="weight")\nb = model("b.safetensors")\n'
                                     "weighted_sum(k, b, alpha=0.5)\n")
    before = snapshot(work)
    result = compose("-p", "base", "fill.mecha", "-p", "tuned", "b.safetensors", "-o", "out.mecha")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("parameter 'k'",))


def test_merge_refuses_the_same_parameter_given_twice(work):
    result, before = merge(work, TEMPLATE, "-p", "k=0.5", "-p", "k=0.6", "-p", "base=a.safetensors",
                           "-p", "tuned=b.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("-p k", "twice"))


# -- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["meta", "mps", "bogus"])
def test_a_device_other_than_cpu_or_cuda_is_a_one_line_error(work, device):
    result, before = merge(work, HEAD + "weighted_sum(a, b)\n", "--device", device)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=(f"'{device}'", "cpu or cuda"))


@pytest.mark.parametrize("kind", ["missing", "file"])
def test_a_models_dir_that_is_not_a_folder_is_refused(work, kind):
    # with a typo, same-named files beside the recipe would otherwise be merged without a word
    target = "nonexist" if kind == "missing" else "a.safetensors"
    result, before = merge(work, HEAD + "weighted_sum(a, b)\n", "--models-dir", target)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=(f"--models-dir {target}",))


def test_an_empty_load_plugins_variable_is_named_in_the_unknown_method_error(work):
    (work / "recipe.mecha").write_text(HEAD + "weighted_sum(a, b)\n")
    env = {**os.environ, "MECHA_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-m", "mecha_core", "merge", "recipe.mecha", "-o", "x.safetensors"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    check_clean_failure(proc.returncode, proc.stderr,
                        fragments=("unknown merge method 'weighted_sum'", "MECHA_LOAD_PLUGINS", "methods"))


# -- the recipe text ----------------------------------------------------------------------------
@pytest.mark.parametrize("header", ["mecha\t1", "mecha  1", "mecha 1 "])
def test_header_with_any_spaces_or_tabs_is_read(work, header):
    result, _ = merge(work, header + "\n" + HEAD.split("\n", 1)[1] + "weighted_sum(a, b, alpha=0.25)\n")
    assert result.exit_code == 0, result.output
    assert load_file(work / "merged.safetensors")["w"].tolist() == [1.5, 3.0]


@pytest.mark.parametrize("text", [
    HEAD + "weighted_sum(a, b, alpha=1" + "0" * 5000 + ")\n",
    'version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\nmerge "weighted_sum" &0 &1 alpha=1' + "0" * 5000 + "\n",
    'model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\nmerge "weighted_sum" &0 &1 alpha=1'
    + "0" * 5000 + "\n",
])
def test_a_number_too_long_for_python_is_a_recipe_error(work, text):
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:", "digits"))


def test_a_lone_cr_in_a_comment_does_not_split_the_line(work):
    # the format ends lines at LF only: reading the file must agree with reading its text
    text = HEAD.replace('b = model("b.safetensors")', 'b = model("b.safetensors")  # old\rnote') + "weighted_sum(a, b)\n"
    result, _ = merge(work, text)
    assert result.exit_code == 0, result.output
    assert load_file(work / "merged.safetensors")["w"].tolist() == [2.0, 4.0]


# -- the output path ----------------------------------------------------------------------------
def test_a_long_but_legal_output_name_is_written(work):
    name = "n" * 240 + ".safetensors"  # 252 bytes: a legal name, too long with a temp prefix added
    result, _ = merge(work, HEAD + "weighted_sum(a, b)\n", output=name)
    assert result.exit_code == 0, result.output
    assert load_file(work / name)["w"].tolist() == [2.0, 4.0]
    composed = "m" * 245 + ".mecha"
    result = compose("-p", "base", "a.safetensors", "-p", "tuned", "b.safetensors", "-o", composed)
    assert result.exit_code == 0, result.output
    assert (work / composed).read_text().startswith("mecha 1\n")


def test_an_output_symlink_is_written_through_and_an_existing_mode_kept(work):
    (work / "real.safetensors").write_bytes(b"old")
    os.chmod(work / "real.safetensors", 0o640)
    os.symlink("real.safetensors", work / "link.safetensors")
    result, _ = merge(work, HEAD + "weighted_sum(a, b)\n", output="link.safetensors")
    assert result.exit_code == 0, result.output
    assert os.path.islink(work / "link.safetensors")
    assert load_file(work / "real.safetensors")["w"].tolist() == [2.0, 4.0]
    assert os.stat(work / "real.safetensors").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("line,fragment", [
    ('b = model("bb")', "model file 'bb' not found"),
    ('b = model("b.safetensors", arch="sd9")', "unknown architecture 'sd9'"),
    ('b = model("b.safetensors", type="lora")', "unknown model type 'lora'"),
])
def test_errors_found_when_a_model_is_opened_name_its_recipe_line(work, line, fragment):
    text = f'mecha 1\na = model("a.safetensors")\n{line}\nweighted_sum(a, b)\n'
    result, before = merge(work, text)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha:3:5: ", fragment))
