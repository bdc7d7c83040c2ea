"""mergekit's whole-key methods (stacked deltas, sorts, whole-tensor draws) declare what they hold,
so the scheduler admits their keys within the memory budget and names a key that alone needs
more; the element-wise and statistics-based ones run in slices and declare nothing."""

from __future__ import annotations

import re

import mecha_core as mecha
from mecha_mergekit.methods import MERGEKIT_METHODS

WHOLE_KEY = {"mergekit_ties", "mergekit_dare_ties", "mergekit_dare_linear", "mergekit_breadcrumbs",
             "mergekit_breadcrumbs_ties", "mergekit_della", "mergekit_della_linear", "mergekit_model_stock",
             "mergekit_sce", "mergekit_nuslerp", "mergekit_multislerp", "mergekit_karcher", "mergekit_arcee_fusion"}


def test_every_method_either_slices_or_declares_its_working_set():
    for method in MERGEKIT_METHODS:
        sliced = method.elementwise or method.statistics is not None
        assert sliced != (method.name in WHOLE_KEY), method.name
        assert (method.working_set is not None) == (method.name in WHOLE_KEY), method.name


def test_a_ties_key_above_the_budget_is_named_and_the_merge_is_still_exact(tmp_path, llamas, capfd):
    """A 1 KiB budget: every key of the tiny Llama exceeds it alone; the warning names one of the
    largest (64×16, with base + 2 models at 5 float32 copies each: 61 KiB), and the result is the
    same bytes as with a budget that fits everything."""
    config = (f"merge_method: ties\nbase_model: {llamas['base']}\nparameters: {{density: 0.5, weight: 1}}\n"
              f"models:\n  - model: {llamas['a']}\n  - model: {llamas['b']}\n")
    (tmp_path / "c.yml").write_text(config)
    small = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "small") + "/", memory_budget=1024, threads=2)
    err = capfd.readouterr().err
    large = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "large") + "/", memory_budget=1 << 30, threads=2)
    # the largest keys (token embeddings and LM head, 64×16) are named; every other key is counted
    assert re.search(r"key '(lm_head|model\.embed_tokens)\.weight' and \d+ other key\(s\) cannot be sliced", err), err
    assert "more than --memory-budget" in err
    assert "cannot be sliced" not in capfd.readouterr().err
    read = [open(f"{folder}/model.safetensors", "rb").read() for folder in (small, large)]
    assert read[0] == read[1]
