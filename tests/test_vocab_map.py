"""Vocabulary maps (``model(..., vocab=MAP)``): a model's vocabulary rows gathered into another
vocabulary, on a toy family whose vocabulary keys are embed.w and head.w."""

from __future__ import annotations

import json
import os

import pytest
import torch

import mecha_core
from mecha_core.engine.plan import make_plan
from mecha_core.errors import RecipeError
from mecha_core.plugins import plugin_from_functions
from mecha_core.recipe.format import dump, load_v1
from mecha_core.specs import Architecture, ArchitectureFamily, KeySpec
from mecha_core.testing import host_with, read_tensors, using, write_checkpoint


def toy_layout(header, config):
    """Members: config.json says model_type "toyvocab"; any vocabulary size."""
    if not config or config.get("model_type") != "toyvocab":
        return None
    keys = {k: KeySpec(header[k].shape, "float32", "text", blocks=(k.split(".")[0],), klass=k.split(".")[0])
            for k in ("embed.w", "ff.w", "head.w")}
    return Architecture("toyvocab", keys, blocks=("embed", "ff", "head"), classes=("embed", "ff", "head"),
                        vocab_keys=("embed.w", "head.w"), description="toy vocabulary model")


def toy_plugin():
    return plugin_from_functions("toyvocab", mecha_architecture_families=lambda: [
        ArchitectureFamily("toyvocab", detect=toy_layout, description="a toy")])


def write_toy(folder, vocab, seed):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {"embed.w": torch.randn(vocab, 4, generator=g), "ff.w": torch.randn(4, 4, generator=g),
               "head.w": torch.randn(vocab, 4, generator=g)}
    (folder / "config.json").write_text(json.dumps({"model_type": "toyvocab"}))
    return write_checkpoint(folder / "model.safetensors", tensors)


def write_map(path, **fields):
    path.write_text(json.dumps({"mecha_vocab_map": 1, **fields}))
    return str(path)


@pytest.fixture
def toys(tmp_path):
    return (write_toy(tmp_path / "a", vocab=5, seed=0), write_toy(tmp_path / "b", vocab=6, seed=1),
            write_toy(tmp_path / "c", vocab=4, seed=2))


def test_rows_are_gathered_filled_and_padded(tmp_path, toys):
    a, b, c = toys
    files = tmp_path / "tok"
    files.mkdir()
    (files / "tokenizer.json").write_text("{}")
    # output vocabulary of 7 tokens + 1 padding row; a: rows 0-2 as is, 3 <- a's 4, 4 <- mean(b's 5, c's 1),
    # 5 zeros (nothing names it), 6 <- b's 0 alone; 7: padding (mean of rows 0-6)
    ma = write_map(tmp_path / "ma.json", rows=8, tokens=7, own=[[0, 0, 3], [3, 4, 1]],
                   fill=[[4, [[os.path.relpath(b, tmp_path), 5], [c, 1]]],
                         [6, [[b, 0]]]], files="tok")
    mb = write_map(tmp_path / "mb.json", rows=8, tokens=7, own=[[0, 1, 5]], fill=[[6, []]], files="tok")
    recipe = mecha_core.subtract(mecha_core.model(a, vocab=ma), mecha_core.model(b, vocab=mb))
    mc = write_map(tmp_path / "mc.json", rows=8, tokens=7, own=[[0, 0, 4]], files="tok")
    c_rows = mecha_core.model(c, vocab=mc)  # c is in the recipe (a's fills read it): c - c adds nothing
    recipe = mecha_core.add(recipe, mecha_core.subtract(c_rows, c_rows))
    with using(toy_plugin()):
        with make_plan(recipe, host=host_with(toy_plugin())) as plan:
            assert plan.vocab_from == str(files)
            assert plan.output["embed.w"].shape == (8, 4)
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    ta, tb, tc = read_tensors(a), read_tensors(b), read_tensors(c)
    out = read_tensors(tmp_path / "o.safetensors")
    for key in ("embed.w", "head.w"):
        ra = torch.zeros(8, 4)
        ra[0:3], ra[3] = ta[key][0:3], ta[key][4]
        ra[4] = (tb[key][5] + tc[key][1]) / 2
        ra[6] = tb[key][0]
        ra[7] = ra[:7].mean(dim=0)
        rb = torch.zeros(8, 4)
        rb[0:5] = tb[key][1:6]
        rb[7] = rb[:7].mean(dim=0)
        torch.testing.assert_close(out[key], ra - rb, rtol=0, atol=0)
    torch.testing.assert_close(out["ff.w"], ta["ff.w"] - tb["ff.w"], rtol=0, atol=0)


def test_the_option_is_written_and_read_in_mecha_text(tmp_path, toys):
    a, b, _ = toys
    recipe = mecha_core.add(mecha_core.model(a, vocab="maps/a.json"), mecha_core.model(b, type="delta"))
    text = dump(recipe)
    assert 'vocab="maps/a.json"' in text
    assert load_v1(text) == recipe


@pytest.mark.parametrize("fields,words", [
    (dict(rows=6, own=[[0, 3, 3]]), "rows 3..5 of key 'embed.w' are past its 5 rows"),
    (dict(rows=6, fill=[[5, [["nowhere", 0]]]]), "which is not a model of the recipe"),
    (dict(rows=6, fill=[[5, [["b/model.safetensors", 9]]]]), "row 9 of key 'embed.w'"),
    (dict(rows=6, tokens=7), "0 < tokens <= rows"),
    (dict(rows=6, own=[[4, 0, 3]]), "inside the 6 rows"),
])
def test_a_bad_map_is_one_line_before_any_tensor_is_read(tmp_path, toys, fields, words):
    a, b, _ = toys
    vmap = write_map(tmp_path / "m.json", **fields)
    (tmp_path / "r.mecha").write_text(f'mecha 1\na = model("{a}", vocab="m.json")\nb = model("{b}")\n'
                                      f'out = subtract(a, b)\n')
    with using(toy_plugin()):
        with pytest.raises(RecipeError) as err:
            mecha_core.merge(str(tmp_path / "r.mecha"), tmp_path / "o.safetensors")
    message = str(err.value)
    assert "\n" not in message and words in message and vmap in message and "r.mecha:2" in message, message
    assert not (tmp_path / "o.safetensors").exists()


def test_unreadable_maps_and_keep_vocab_together_are_refused(tmp_path, toys):
    a, b, _ = toys
    (tmp_path / "bad.json").write_text("{oops")
    with using(toy_plugin()):
        with pytest.raises(RecipeError, match="bad.json: is not valid JSON"):
            mecha_core.merge(mecha_core.subtract(mecha_core.model(a, vocab=str(tmp_path / "bad.json")),
                                                 mecha_core.model(b)), tmp_path / "o.safetensors")
        good = write_map(tmp_path / "g.json", rows=5, own=[[0, 0, 5]])
        with pytest.raises(RecipeError, match="either keep_vocab or vocab maps"):
            mecha_core.merge(mecha_core.subtract(mecha_core.model(a, vocab=good),
                                                 mecha_core.model(b, keep_vocab=True)), tmp_path / "o.safetensors")


def test_a_map_with_files_only_leaves_the_rows(tmp_path, toys):
    a, _, _ = toys
    (tmp_path / "tok").mkdir()
    only = write_map(tmp_path / "f.json", files="tok")
    with make_plan(mecha_core.scale(mecha_core.model(a, vocab=only), alpha=2.0), host=host_with(toy_plugin())) as plan:
        assert plan.vocab_from == str(tmp_path / "tok")
        assert plan.output["embed.w"].shape == (5, 4)
