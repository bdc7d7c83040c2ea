"""The recipe-format hook: a plugin's format reads the recipes it detects, the core reads its own,
and an sd-mecha recipe without the plugin that reads it is a one-line error with an install hint."""

from __future__ import annotations

import importlib.metadata

import pytest
from typer.testing import CliRunner

import mecha_core
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.errors import RecipeError
from mecha_core.kit import Location, ModelNode, call
from mecha_core.specs import RecipeFormat
from mecha_core.testing import check_plugin, host_with, plugin_from_functions, using

SD_MECHA_TEXT = 'version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\nmerge "weighted_sum" &0 &1\n'


def _read_pairs(text, *, source, base_dir, host):
    """A toy format: 'pairs' then one line 'A B' — weighted_sum(A, B) at alpha 0.25."""
    a, b = text.splitlines()[1].split()
    where = Location(None if source == "<recipe>" else source, 2, 1)
    return call(host.method("weighted_sum"), (ModelNode(a, base_dir=base_dir), ModelNode(b, base_dir=base_dir)),
                {"alpha": 0.25}, where=where)


PAIRS = RecipeFormat("pairs", detect=lambda text, path: text.startswith("pairs\n") or (path or "").endswith(".pairs"),
                     read=_read_pairs, description="two model paths on one line")
PAIRS_PLUGIN = plugin_from_functions("pairs", mecha_recipe_formats=lambda: [PAIRS])


def test_a_format_reads_the_text_it_detects_with_the_host_passed_in():
    host = host_with(mecha_methods.plugin, PAIRS_PLUGIN)
    got = mecha_core.load_recipe("pairs\na.safetensors b.safetensors\n", host=host)
    assert got == mecha_core.weighted_sum(mecha_core.model("a.safetensors"), mecha_core.model("b.safetensors"),
                                          alpha=0.25)
    assert str(got.where) == "<recipe>:2:1"


def test_a_format_detects_a_file_by_its_path_and_gets_its_folder(tmp_path):
    path = tmp_path / "x.pairs"
    path.write_text("anything\na.safetensors b.safetensors\n")
    got = mecha_core.load_recipe(path, host=host_with(mecha_methods.plugin, PAIRS_PLUGIN))
    assert got.args[0].base_dir == str(tmp_path) and got.where.file == str(path)


def test_mechas_own_format_is_never_offered_to_a_plugin():
    greedy = RecipeFormat("greedy", detect=lambda text, path: True, read=lambda *a, **k: 1 / 0)
    host = host_with(mecha_methods.plugin, plugin_from_functions("greedy", mecha_recipe_formats=lambda: [greedy]),
                     strict=False)
    got = mecha_core.load_recipe('mecha 1\na = model("a")\nweighted_sum(a, a)\n', host=host)
    assert got.method.name == "weighted_sum"


def test_two_formats_claiming_one_text_is_an_error_naming_both():
    twin = RecipeFormat("twin", detect=PAIRS.detect, read=_read_pairs)
    host = host_with(mecha_methods.plugin, PAIRS_PLUGIN,
                     plugin_from_functions("twin", mecha_recipe_formats=lambda: [twin]))
    with pytest.raises(RecipeError, match="recipe formats 'pairs' and 'twin' both claim this recipe"):
        mecha_core.load_recipe("pairs\na b\n", host=host)


def test_a_raising_detector_is_skipped_and_reported_by_the_contract_check():
    def bad(text, path):
        raise ValueError("nope")

    broken = RecipeFormat("broken", detect=bad, read=_read_pairs, description="x")
    plugin = plugin_from_functions("broken", mecha_recipe_formats=lambda: [broken])
    got = mecha_core.load_recipe("pairs\na b\n", host=host_with(mecha_methods.plugin, PAIRS_PLUGIN, plugin))
    assert got.method.name == "weighted_sum"
    assert check_plugin(plugin) == ["recipe format 'broken': detect('', None) raised ValueError: nope"]


def test_the_contract_checks_a_formats_fields():
    odd = RecipeFormat("", detect="no", read=None, description=3)
    problems = check_plugin(plugin_from_functions("odd", mecha_recipe_formats=lambda: [odd]))
    assert "recipe format '': detect must be callable, got str" in " ".join(problems)
    assert "read must be callable, got NoneType" in " ".join(problems)
    claims_v1 = RecipeFormat("v1", detect=lambda text, path: text.startswith("mecha"), read=_read_pairs,
                             description="claims mecha's own")
    assert check_plugin(plugin_from_functions("v1", mecha_recipe_formats=lambda: [claims_v1])) == [
        "recipe format 'v1': detect('mecha 1\\n', None) must be False (empty text and mecha's own format are "
        "never another format's), got True"]


def test_plugins_list_verbose_shows_the_recipe_formats():
    with using(mecha_methods.plugin, PAIRS_PLUGIN):
        shown = CliRunner().invoke(app, ["plugins", "list", "-v"])
    assert shown.exit_code == 0, shown.output
    assert "    recipe formats: pairs" in shown.output.splitlines()


def test_an_sd_mecha_recipe_without_its_plugin_names_what_to_install(monkeypatch):
    real = importlib.metadata.distribution

    def distribution(name):
        if name == "mecha-sdmecha":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", distribution)
    with pytest.raises(RecipeError) as info:
        mecha_core.load_recipe(SD_MECHA_TEXT, host=host_with(mecha_methods.plugin))
    assert str(info.value) == ("<recipe>:1: this is an sd-mecha recipe; reading it needs the recipe format "
                               "'sd-mecha': it is in mecha-sdmecha: pip install mecha-sdmecha")
    assert "\n" not in str(info.value)


def test_an_sd_mecha_recipe_with_the_plugin_installed_but_not_loaded_says_so(tmp_path):
    path = tmp_path / "old.mecha"
    path.write_text('model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\n'
                    'merge "weighted_sum" &0 &1 alpha=0.5\n')
    with pytest.raises(RecipeError, match=r"^.*old\.mecha:1: this is an sd-mecha recipe; reading it needs the "
                                          r"recipe format 'sd-mecha' \(from the mecha-sdmecha plugin, which is "
                                          r"not loaded\)$"):
        mecha_core.load_recipe(path, host=host_with(mecha_methods.plugin))


def test_the_cli_exits_2_on_an_sd_mecha_recipe_when_the_plugin_is_disabled(tmp_path, monkeypatch):
    path = tmp_path / "r.mecha"
    path.write_text(SD_MECHA_TEXT)
    monkeypatch.setenv("MECHA_DISABLE_PLUGINS", "sdmecha")
    from mecha_core.plugins import reset_host

    reset_host()
    try:
        r = CliRunner().invoke(app, ["merge", str(path), "-o", str(tmp_path / "o.safetensors"), "-q"])
    finally:
        reset_host()
    assert r.exit_code == 2
    assert "this is an sd-mecha recipe" in r.output and "plugins disabled by" in r.output and "sdmecha" in r.output
    assert not (tmp_path / "o.safetensors").exists()
