"""The registry itself: the plugin contract, documented hyperparameters, and that every method has
a numerical test here (docs/methods.md and `mecha methods NAME`: tests/test_docs.py)."""

from __future__ import annotations

import pathlib
import re

import mecha_methods.plugin
from mecha_core.testing import check_plugin

HERE = pathlib.Path(__file__).parent


def test_plugin_passes_the_contract_checks():
    assert check_plugin(mecha_methods.plugin) == []


def test_every_method_has_a_formula_and_documents_every_hyperparameter():
    for m in mecha_methods.plugin.METHODS:
        assert m.formula, m.name
        for h in m.hyperparameters:
            assert re.search(rf"\b{h.name}\b", m.doc), (m.name, h.name)


def test_every_method_is_exercised_by_a_test():
    sources = "".join(p.read_text(encoding="utf-8") for p in HERE.glob("test_methods_*.py")
                      if p.name != pathlib.Path(__file__).name)
    untested = [m.name for m in mecha_methods.plugin.METHODS
                if not re.search(rf"[\"'.]{m.name}[\"'(]", sources)]
    assert untested == []
