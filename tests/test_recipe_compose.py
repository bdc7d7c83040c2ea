"""Templates, ``compose`` (API and ``mecha compose``), filling parameters, and ``mecha recipe show``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core as mecha
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.engine.safetensors_io import read_header
from mecha_core.errors import RecipeError, UnfilledParameterError
from mecha_core import compose, load_recipe  # the plugin host's methods
from mecha_core.recipe import ModelNode, ParameterNode, dump_recipe, parameters
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, snapshot

runner = CliRunner()

TEMPLATE = """mecha 1
# base + k * (tuned - orig): moves any base by a fine-tune's difference
base = parameter("base", space="weight")
tuned = parameter("tuned")
k = parameter("k")
orig = model("orig")
delta = subtract(tuned, orig)
result = add_difference(base, delta, alpha=k)
"""

WEIGHTED = """mecha 1
a = model("a.safetensors")
b = model("b.safetensors")
mix = weighted_sum(a, b, alpha=0.25)
"""


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """templates/ holds the template and orig; recipes/ a weighted sum beside its two models;
    models/ the fine-tune. Commands run from an unrelated folder, so only the rewritten
    relative paths can find the files."""
    g = torch.Generator().manual_seed(7)
    t = {name: {"w": torch.randn(3, 4, generator=g), "v": torch.randn(5, generator=g)}
         for name in ("a", "b", "c", "orig")}
    for folder, name in (("recipes", "a"), ("recipes", "b"), ("models", "c"), ("templates", "orig")):
        (tmp_path / folder).mkdir(exist_ok=True)
        write_checkpoint(tmp_path / folder / f"{name}.safetensors", t[name])
    (tmp_path / "templates" / "t.mecha").write_text(TEMPLATE)
    (tmp_path / "recipes" / "ws.mecha").write_text(WEIGHTED)
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with using(mecha_methods.plugin):
        yield tmp_path, t


def expected(t, k):
    base = 0.75 * t["a"]["w"] + 0.25 * t["b"]["w"], 0.75 * t["a"]["v"] + 0.25 * t["b"]["v"]
    return {"w": base[0] + k * (t["c"]["w"] - t["orig"]["w"]), "v": base[1] + k * (t["c"]["v"] - t["orig"]["v"])}


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compose_cli_fills_a_template_with_a_recipe_a_model_and_a_value(tree):
    root, t = tree
    out = root / "out" / "composed.mecha"
    r = cli("compose", root / "templates" / "t.mecha", "-p", "base", root / "recipes" / "ws.mecha",
            "-p", "tuned", os.path.relpath(root / "models" / "c.safetensors"), "-p", "k", "0.5", "-o", out)
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "parameter(" not in text
    # paths are rewritten relative to the composed file's folder
    assert 'model("../recipes/a.safetensors")' in text and 'model("../models/c.safetensors")' in text
    assert 'model("../templates/orig")' in text  # a bare name stays bare: found as orig.safetensors
    assert load_recipe(out) == load_recipe(text)
    merged = root / "out" / "m.safetensors"
    r = cli("merge", out, "-o", merged, "-q")
    assert r.exit_code == 0, r.output
    got, want = load_file(merged), expected(t, 0.5)
    assert set(got) == {"w", "v"}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


def test_unfilled_template_fails_naming_the_parameter_and_writes_nothing(tree):
    root, t = tree
    out = root / "out" / "partial.mecha"
    r = cli("compose", root / "templates" / "t.mecha", "-p", "base", root / "recipes" / "ws.mecha",
            "-p", "tuned", root / "models" / "c.safetensors", "-o", out)
    assert r.exit_code == 0, r.output
    assert [p.name for p in parameters(load_recipe(out))] == ["k"]
    merged = root / "out" / "m.safetensors"
    r = cli("merge", out, "-o", merged, "-q")
    assert r.exit_code == 2
    assert "'k'" in r.output and "not filled" in r.output
    assert not merged.exists() and os.listdir(root / "out") == ["partial.mecha"]
    # the remaining hole can be filled at merge time
    r = cli("merge", out, "-o", merged, "-q", "-p", "k=2")
    assert r.exit_code == 0, r.output
    got, want = load_file(merged), expected(t, 2)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-6)


def test_merging_the_bare_template_fails_naming_a_parameter(tree):
    root, _ = tree
    r = cli("merge", root / "templates" / "t.mecha", "-o", root / "out" / "m.safetensors", "-q")
    assert r.exit_code == 2
    assert "parameter '" in r.output and "not filled" in r.output
    assert os.listdir(root / "out") == []


def test_compose_errors_exit_2(tree):
    root, _ = tree
    out = root / "out" / "x.mecha"
    r = cli("compose", root / "templates" / "t.mecha", "-p", "bsae", root / "recipes" / "ws.mecha", "-o", out)
    assert r.exit_code == 2 and "no parameter 'bsae'" in r.output and "did you mean 'base'" in r.output
    r = cli("compose", root / "templates" / "t.mecha", "-p", "base", "-o", out)
    assert r.exit_code == 2 and "-p expects NAME=VALUE (or NAME PATH)" in r.output
    r = cli("compose", root / "templates" / "t.mecha", "-p", "k", root / "recipes" / "ws.mecha", "-o", out)
    assert r.exit_code == 2 and "hyperparameter 'alpha'" in r.output and "not a model" in r.output
    r = cli("compose", root / "templates" / "t.mecha", "-p", "base", "0.5", "-o", out)
    assert r.exit_code == 2 and "parameter 'base' is an input" in r.output
    r = cli("compose", root / "templates" / "t.mecha", "-p", "base", root / "nope.mecha", "-o", out)
    assert r.exit_code == 2 and "no such recipe file" in r.output
    assert not out.exists()


def test_compose_api_substitutes_by_name_and_checks_spaces(tree):
    root, _ = tree
    template = load_recipe(root / "templates" / "t.mecha")
    a, b = mecha.model("x.safetensors"), mecha.model("y.safetensors")
    filled = compose(template, base=mecha.weighted_sum(a, b), tuned="c.safetensors", k=0.5)
    assert parameters(filled) == []
    assert filled.args[0] == mecha.weighted_sum(a, b)
    assert filled.args[1].args[0] == ModelNode("c.safetensors")
    assert filled.kwargs == (("alpha", mecha.literal(0.5)),)
    # a partial fill leaves the other holes; filling one with another hole renames it
    partial = compose(template, k=mecha.parameter("strength"))
    assert [p.name for p in parameters(partial)] == ["base", "tuned", "strength"]
    with pytest.raises(RecipeError, match="expects weight space; the fill is delta"):
        compose(template, base=a - b)
    with pytest.raises(RecipeError, match="expects a number"):
        compose(template, k=mecha.literal("strong"))
    assert isinstance(parameters(template)[0], ParameterNode)  # the template itself is unchanged


def test_recipe_show_prints_a_recipe_that_reruns_to_the_same_bytes(tree):
    root, t = tree
    composed = root / "out" / "composed.mecha"
    assert cli("compose", root / "templates" / "t.mecha", "-p", "base", root / "recipes" / "ws.mecha",
               "-p", "tuned", root / "models" / "c.safetensors", "-p", "k", "0.5", "-o", composed).exit_code == 0
    first = root / "out" / "first.safetensors"
    assert cli("merge", composed, "-o", first, "-q").exit_code == 0
    shown = cli("recipe", "show", first)
    assert shown.exit_code == 0, shown.output
    assert shown.output == composed.read_text()
    _, metadata = read_header(first)
    assert set(json.loads(metadata["mecha_plugins"])) == {"methods"}  # the plugin the methods came from
    assert metadata["mecha_version"]
    rerun = root / "out" / "rerun.mecha"
    rerun.write_text(shown.output)
    second = root / "out" / "second.safetensors"
    assert cli("merge", rerun, "-o", second, "-q").exit_code == 0
    assert second.read_bytes() == first.read_bytes()


def test_recipe_show_on_a_file_without_a_recipe_exits_2(tree):
    root, _ = tree
    r = cli("recipe", "show", root / "models" / "c.safetensors")
    assert r.exit_code == 2 and "holds no mecha recipe" in r.output
    r = cli("recipe", "show", root / "models" / "missing.safetensors")
    assert r.exit_code == 2


def test_relative_paths_resolve_from_models_dir_then_recipe_folder_then_cwd(tree, monkeypatch):
    root, t = tree
    # the same name in --models-dir and beside the recipe: --models-dir wins
    (root / "md").mkdir()
    write_checkpoint(root / "md" / "a.safetensors", {"w": torch.full((3, 4), 10.0), "v": torch.full((5,), 10.0)})
    write_checkpoint(root / "md" / "b.safetensors", t["b"])
    merged = root / "out" / "m.safetensors"
    assert cli("merge", root / "recipes" / "ws.mecha", "-o", merged, "-q", "--models-dir", root / "md").exit_code == 0
    torch.testing.assert_close(load_file(merged)["w"], 0.75 * torch.full((3, 4), 10.0) + 0.25 * t["b"]["w"])
    # without it, the recipe's folder
    assert cli("merge", root / "recipes" / "ws.mecha", "-o", merged, "-q").exit_code == 0
    torch.testing.assert_close(load_file(merged)["w"], 0.75 * t["a"]["w"] + 0.25 * t["b"]["w"])
    # a recipe given as text has no folder: the current directory
    monkeypatch.chdir(root / "recipes")
    mecha.merge(WEIGHTED, merged)
    torch.testing.assert_close(load_file(merged)["w"], 0.75 * t["a"]["w"] + 0.25 * t["b"]["w"])
    # a missing model names what it looked for
    with pytest.raises(mecha.MechaError, match="model file 'zz.safetensors' not found"):
        mecha.merge(WEIGHTED.replace("a.safetensors", "zz.safetensors"), merged)


def test_unfilled_parameter_error_class(tree):
    root, _ = tree
    with pytest.raises(UnfilledParameterError, match="'base'"):
        mecha.merge(load_recipe(root / "templates" / "t.mecha"), root / "out" / "m.safetensors")
    assert dump_recipe(load_recipe(root / "templates" / "t.mecha")).count("parameter(") == 3


def test_same_relative_path_in_recipes_from_different_folders_stays_two_files(tmp_path, monkeypatch):
    for folder, value in (("x", 1.0), ("y", 5.0)):
        (tmp_path / folder).mkdir()
        write_checkpoint(tmp_path / folder / "m.safetensors", {"w": torch.full((2,), value)})
        (tmp_path / folder / "r.mecha").write_text('mecha 1\nm = model("m.safetensors")\nr = scale(m, alpha=1.0)\n')
    (tmp_path / "t.mecha").write_text('mecha 1\np = parameter("p")\nq = parameter("q")\nr = weighted_sum(p, q)\n')
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    with using(mecha_methods.plugin):
        recipe = compose(load_recipe(tmp_path / "t.mecha"), p=tmp_path / "x" / "r.mecha", q=tmp_path / "y" / "r.mecha")
        text = dump_recipe(recipe)
        assert 'model("../x/m.safetensors")' in text and 'model("../y/m.safetensors")' in text
        mecha.merge(recipe, tmp_path / "out.safetensors")
        torch.testing.assert_close(load_file(tmp_path / "out.safetensors")["w"], torch.full((2,), 3.0))


def test_compose_refuses_to_overwrite_its_template(tmp_path):
    from typer.testing import CliRunner

    import mecha_methods.plugin
    from mecha_core.cli import app
    from mecha_core.testing import using

    template = tmp_path / "t.mecha"
    text = 'mecha 1\na = parameter("a")\nb = parameter("b")\nm = weighted_sum(a, b)\n'
    template.write_text(text)
    with using(mecha_methods.plugin):
        result = CliRunner().invoke(app, ["compose", str(template), "-o", str(template)])
    assert result.exit_code == 2
    assert "overwrite its template" in result.output
    assert template.read_text() == text


# -- compose must never destroy a file, nor bring a clashing parameter (the `work` fixture: conftest.py)
def compose_cli(*args: str):
    return runner.invoke(app, ["compose", "template.mecha", *args])


@pytest.mark.parametrize("base_fill,fragment", [
    ("target.safetensors", "-p base"),       # -o is one of the fills
    ("a.safetensors", "safetensors model"),  # -o is some other model
])
def test_compose_never_writes_recipe_text_over_a_model(work, base_fill, fragment):
    write_checkpoint(work / "target.safetensors", {"w": torch.tensor([5.0, 5.0])})
    before = snapshot(work)
    result = compose_cli("-p", "base", base_fill, "-p", "tuned", "b.safetensors", "-p", "k", "0.5",
                     "-o", "target.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("target.safetensors", fragment))


def test_compose_refuses_a_fill_that_brings_a_clashing_parameter(work):
    (work / "fill.mecha").write_text('mecha 1\nk = parameter("k", space="weight")\nb = model("b.safetensors")\n'
                                     "weighted_sum(k, b, alpha=0.5)\n")
    before = snapshot(work)
    result = compose_cli("-p", "base", "fill.mecha", "-p", "tuned", "b.safetensors", "-o", "out.mecha")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before, fragments=("parameter 'k'",))
