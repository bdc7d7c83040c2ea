"""Every mergekit method runs over slices of a key (element-wise, row-wise, or statistics passes
then element-wise passes): none holds a whole key, so none declares a working set, and a key far
above the memory budget merges within it to the same bytes."""

from __future__ import annotations

import mecha_core as mecha
from mecha_mergekit.methods import MERGEKIT_METHODS


def test_every_method_slices_and_declares_no_working_set():
    for method in MERGEKIT_METHODS:
        assert method.elementwise or method.rowwise, method.name
        assert method.working_set is None, method.name


def test_a_ties_key_above_the_budget_is_sliced_and_the_merge_is_still_exact(tmp_path, llamas, capfd):
    """A 1 KiB budget and 64-element slices: every key of the tiny Llama is larger; nothing is
    refused or run whole with a warning, and the result is the same bytes as with a budget that
    fits everything."""
    config = (f"merge_method: ties\nbase_model: {llamas['base']}\nparameters: {{density: 0.5, weight: 1}}\n"
              f"models:\n  - model: {llamas['a']}\n  - model: {llamas['b']}\n")
    (tmp_path / "c.yml").write_text(config)
    small = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "small") + "/", memory_budget=1024, threads=2,
                        chunk_elements=64)
    err = capfd.readouterr().err
    large = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "large") + "/", memory_budget=1 << 30, threads=2)
    assert "cannot be sliced" not in err and "more than --memory-budget" not in err, err
    read = [open(f"{folder}/model.safetensors", "rb").read() for folder in (small, large)]
    assert read[0] == read[1]
