"""The registry itself: the plugin contract, the generated docs, `mecha methods NAME`, and that
every method has a numerical test here."""

from __future__ import annotations

import pathlib
import re

import mecha_methods.plugin
from mecha_methods import docgen
from typer.testing import CliRunner

from mecha_core.cli.app import app
from mecha_core.testing import check_plugin, using

HERE = pathlib.Path(__file__).parent


def test_plugin_passes_the_contract_checks():
    assert check_plugin(mecha_methods.plugin) == []


def test_every_method_has_a_formula_and_documents_every_hyperparameter():
    for m in mecha_methods.plugin.METHODS:
        assert m.formula, m.name
        for h in m.hyperparameters:
            assert re.search(rf"\b{h.name}\b", m.doc), (m.name, h.name)


def test_docs_methods_md_is_generated_from_the_registry():
    committed = docgen.DEFAULT_PATH.read_text(encoding="utf-8")
    assert committed == docgen.render(), (
        "docs/methods.md is out of date; run `python -m mecha_methods.docgen`")
    for m in mecha_methods.plugin.METHODS:
        assert f"\n## {m.name}\n" in committed


def test_mecha_methods_name_prints_signature_formula_and_doc():
    with using(mecha_methods.plugin):
        result = CliRunner().invoke(app, ["methods", "ties"])
    assert result.exit_code == 0, result.output
    text = result.output
    assert "ties(base: weight, *models: weight, *, density=0.2, alpha=1.0, vote='sum', weights=None) -> weight" in text
    assert mecha_methods.plugin.METHODS[0].name != "ties"  # sanity: not the first, a real lookup
    assert "elect(top_k(" in text
    assert 'vote="count"' in text


def test_every_method_is_exercised_by_a_test():
    sources = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_methods_*.py")
                      if p.name != pathlib.Path(__file__).name)
    untested = [m.name for m in mecha_methods.plugin.METHODS
                if not re.search(rf"[\"'.]{m.name}[\"'(]", sources)]
    assert untested == []
