"""The generated and executable parts of the docs: docs/methods.md and `mecha methods NAME` from
the method registry; docs/plugins.md's spec reference against the classes, its kit table against
`mecha_core.kit`, and its complete plugin example, run as printed."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from pathlib import Path

import attrs
import pytest
from typer.testing import CliRunner

import mecha_methods.plugin
from mecha_core import kit, method, specs
from mecha_core.cli.app import app
from mecha_core.testing import check_plugin, host_with, using

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _tool(name: str):
    """A generator script from docs/tools, imported from its file."""
    spec = importlib.util.spec_from_file_location(f"docs_tools_{name}", DOCS / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- docs/methods.md ------------------------------------------------------------------------------
def test_docs_methods_md_is_generated_from_the_registry():
    gen = _tool("gen_methods")
    committed = (DOCS / "methods.md").read_text(encoding="utf-8")
    assert committed == gen.render(), "docs/methods.md is out of date; run `python docs/tools/gen_methods.py`"
    for m in mecha_methods.plugin.METHODS:
        assert f"\n## {m.name}\n" in committed


def test_mecha_methods_name_prints_signature_formula_and_doc():
    with using(mecha_methods.plugin):
        result = CliRunner().invoke(app, ["methods", "ties"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert ("ties(base: weight, *models: weight, *, density=0.2, alpha=1.0, vote='sum', weights=None, "
            "trim='top_k') -> weight") in text
    assert mecha_methods.plugin.METHODS[0].name != "ties"  # sanity: not the first, a real lookup
    assert "elect(top_k(" in text
    assert 'vote="count"' in text


# -- docs/plugins.md: spec reference ------------------------------------------------------------
PLUGINS_MD = DOCS / "plugins.md"
SPEC_CLASSES = {"TensorInfo": specs.TensorInfo, "KeySpec": specs.KeySpec, "Architecture": specs.Architecture,
                "LazyArchitecture": specs.LazyArchitecture,
                "ArchitectureFamily": specs.ArchitectureFamily,
                "ModelType": specs.ModelType, "ConvertedKey": specs.ConvertedKey, "Converter": specs.Converter,
                "Hyperparameter": specs.Hyperparameter, "MethodInput": specs.MethodInput,
                "MergeMethod": method.MergeMethod, "MergeContext": method.MergeContext,
                "CliCommand": specs.CliCommand, "FileFormat": specs.FileFormat, "RecipeFormat": specs.RecipeFormat,
                "Executor": specs.Executor}


def test_the_spec_reference_is_generated_from_the_classes():
    gen = _tool("gen_plugin_specs")
    page = PLUGINS_MD.read_text(encoding="utf-8")
    assert page == gen.updated(page), "docs/plugins.md's spec reference is out of date; run " \
                                      "`python docs/tools/gen_plugin_specs.py`"


def _documented_fields(page: str, name: str) -> list[str]:
    section = page.split(f"\n### `{name}`\n", 1)[1].split("\n### ", 1)[0].split("<!-- END", 1)[0]
    return re.findall(r"^\| `(\w+)` \|", section, flags=re.M)


@pytest.mark.parametrize("name", sorted(SPEC_CLASSES))
def test_every_field_of_every_spec_type_is_listed_in_order(name):
    page = PLUGINS_MD.read_text(encoding="utf-8")
    assert _documented_fields(page, name) == [f.name for f in attrs.fields(SPEC_CLASSES[name])]


def test_the_spec_reference_covers_every_spec_class_plugins_build():
    classes = {n for n, c in vars(specs).items() if attrs.has(c) and c.__module__ == specs.__name__}
    assert classes <= set(SPEC_CLASSES)


# -- docs/plugins.md: the kit ----------------------------------------------------------------------
def test_every_kit_name_is_documented_and_importable():
    page = PLUGINS_MD.read_text(encoding="utf-8")
    kit_section = page.split("## The plugin kit", 1)[1].split("\n## ", 1)[0]
    for name in kit.__all__:
        assert f"`{name}`" in kit_section, name
        assert getattr(kit, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        kit.nothing_here  # noqa: B018


# -- docs/plugins.md: the complete example, run as printed ----------------------------------------
def _examples(page: str) -> dict[str, str]:
    """path -> code of every ``<!-- example: PATH -->`` block."""
    return dict(re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)\n```", page, flags=re.S))


def test_the_complete_plugin_example_runs_as_printed(tmp_path, monkeypatch):
    files = _examples(PLUGINS_MD.read_text(encoding="utf-8"))
    assert sorted(files) == ["mecha_toy/plugin.py", "tests/test_toy.py"]
    for path, code in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(code + "\n", encoding="utf-8")
    (tmp_path / "mecha_toy" / "__init__.py").write_text("", encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path / "tests"))
    for name in ("mecha_toy", "mecha_toy.plugin", "test_toy"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    plugin = importlib.import_module("mecha_toy.plugin")
    # the host sees what the docs say it provides
    host = host_with(plugin)
    toy = host.architecture("toy")
    assert (toy.name, toy.blocks, toy.classes) == ("toy-ldm", ("IN", "OUT"), ("norm", "proj"))
    assert isinstance(toy.keys["encoder.proj.weight"], specs.KeySpec)
    assert host.architecture("toy-hf").keys["enc.w_t"].shape == (3, 2)
    assert sorted(host.converters.names()) == ["toy-hf-to-ldm-base", "toy-hf-to-ldm-delta"]
    assert [n for n in host.merge_methods.names() if host.merge_methods.provider(n) != "mecha-core"] == ["toy_mix"]
    assert check_plugin(plugin) == []
    # and its tests pass
    tests = importlib.import_module("test_toy")
    tests.test_contract()
    out = tmp_path / "run"
    out.mkdir()
    tests.test_an_hf_file_merges_with_an_ldm_file_block_by_block(out)
    assert (out / "out.safetensors").is_file()
    for name in ("mecha_toy", "mecha_toy.plugin", "test_toy"):
        sys.modules.pop(name, None)
