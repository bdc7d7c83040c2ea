"""Options of `mecha merge`: devices, --models-dir, --memory-budget, -p, MECHA_LOAD_PLUGINS.

Each is checked before anything is written: a wrong value is a one-line error naming the option.
The `work` fixture (two models and template.mecha in the current folder) is in conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import mecha_methods.plugin
import pytest
import torch
from typer.testing import CliRunner

from mecha_core.cli import app
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()
HEAD = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'
TEMPLATE = ('mecha 1\nbase = parameter("base")\ntuned = parameter("tuned")\nk = parameter("k")\n'
            "add_difference(base, tuned, base, alpha=k)\n")


def merge(folder, text: str, *options: str, output: str = "merged.safetensors"):
    (folder / "recipe.mecha").write_bytes(text.encode())
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(folder / "recipe.mecha"), "-o", output, "-q", *options])
    return result, before


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


def test_merge_refuses_the_same_parameter_given_twice(work):
    result, before = merge(work, TEMPLATE, "-p", "k=0.5", "-p", "k=0.6", "-p", "base=a.safetensors",
                           "-p", "tuned=b.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("-p k", "twice"))


def test_an_empty_load_plugins_variable_is_named_in_the_unknown_method_error(work):
    (work / "recipe.mecha").write_text(HEAD + "weighted_sum(a, b)\n")
    env = {**os.environ, "MECHA_LOAD_PLUGINS": ""}
    proc = subprocess.run([sys.executable, "-m", "mecha_core", "merge", "recipe.mecha", "-o", "x.safetensors"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=120)
    check_clean_failure(proc.returncode, proc.stderr,
                        fragments=("unknown merge method 'weighted_sum'", "MECHA_LOAD_PLUGINS", "methods"))


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
