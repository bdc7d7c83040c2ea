"""Where a merge is written: long names, symlinks, the mode of a file replaced, the recipe's own file.

The `work` and `methods` fixtures are in conftest.py.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core as mecha
from mecha_core.cli import app
from mecha_core.testing import write_checkpoint
from mecha_core.testing_corpus import snapshot

runner = CliRunner()
HEAD = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'


def merge(folder, text: str, *options: str, output: str = "merged.safetensors"):
    (folder / "recipe.mecha").write_bytes(text.encode())
    before = snapshot(folder)
    result = runner.invoke(app, ["merge", str(folder / "recipe.mecha"), "-o", output, "-q", *options])
    return result, before


def compose(*args: str):
    return runner.invoke(app, ["compose", "template.mecha", *args])


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


def test_api_merge_refuses_to_write_over_its_own_recipe_file(tmp_path, methods):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.ones(1)})
    recipe = tmp_path / "r.mecha"
    text = 'mecha 1\na = model("a.safetensors")\nscale(a, alpha=2.0)\n'
    recipe.write_text(text)
    with pytest.raises(mecha.errors.OutputError, match="recipe"):
        mecha.merge(str(recipe), recipe)
    assert recipe.read_text() == text


def test_the_recipe_files_of_a_recipe_read_through_a_folder_are_named_once_and_rightly(tmp_path, monkeypatch):
    # a recipe read as "sub/t.mecha": its model node knows the folder, its call node only the
    # path as given; both name one file, which the output guard then protects
    from mecha_core.api import recipe_files

    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "t.mecha").write_text('mecha 1\na = model("a.safetensors")\nm = scale(a, alpha=2.0)\n')
    assert recipe_files(mecha.load_recipe("sub/t.mecha")) == [str(tmp_path / "sub" / "t.mecha")]
