"""Layer views (``model(..., layers="a:b", at=, of=, outside=)``): some of a model's layers,
renumbered, joined with ``|`` into a layer stack; checked tensor by tensor against the input
files, loaded back with transformers (Llama, and Qwen2 with per-layer ``layer_types``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
from mecha_core.errors import MechaError, RecipeError
from mecha_core.recipe import dump_recipe, load_recipe


def _tiny(kind: str, folder, seed: int, layers: int = 4):
    import transformers

    common = dict(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False)
    if kind == "qwen2":  # layers 2 and 3 use sliding-window attention: layer_types differ per layer
        config = transformers.Qwen2Config(**common, use_sliding_window=True, sliding_window=8, max_window_layers=2)
        model = transformers.Qwen2ForCausalLM
    else:
        config, model = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(seed)
    model(config).save_pretrained(str(folder))
    return load_file(os.path.join(folder, "model.safetensors"))


def _layer(key: str, number: int) -> str:
    parts = key.split(".")
    parts[2] = str(number)
    return ".".join(parts)


@pytest.fixture
def llamas(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return {name: (str(tmp_path / name), _tiny("llama", tmp_path / name, seed)) for seed, name in enumerate("ab")}


STACK = """mecha 1
a = model("{a}", layers="0:3", of=5, outside="before")
b = model("{b}", layers="2:4", at=3, outside="after")
a | b
"""


def test_views_joined_with_or_stack_layers_and_the_folder_loads(tmp_path, llamas):
    (a, wa), (b, wb) = llamas["a"], llamas["b"]
    out = mecha.merge(STACK.format(a=a, b=b), str(tmp_path / "out") + "/", threads=2)
    got = load_file(os.path.join(out, "model.safetensors"))
    expected = {k: v for k, v in wa.items() if ".layers." not in k and "embed" in k}
    expected.update({k: v for k, v in wb.items() if ".layers." not in k and "embed" not in k})
    for key, value in wa.items():
        if key.startswith("model.layers.") and int(key.split(".")[2]) < 3:
            expected[key] = value
    for key, value in wb.items():
        if key.startswith("model.layers.") and int(key.split(".")[2]) >= 2:
            expected[_layer(key, int(key.split(".")[2]) + 1)] = value
    assert set(got) == set(expected)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 5

    import transformers

    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig.from_pretrained(out))
    reference.load_state_dict(expected)
    ids = torch.tensor([[1, 4, 9, 16, 25]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits)


def test_layer_types_follow_the_layers_each_output_layer_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny("qwen2", tmp_path / "p", 0)
    _tiny("qwen2", tmp_path / "q", 1)
    recipe = (f'mecha 1\np = model("{tmp_path / "p"}", layers="1:4", of=5, outside="before")\n'
              f'q = model("{tmp_path / "q"}", layers="0:2", at=3, outside="after")\np | q\n')
    out = mecha.merge(recipe, str(tmp_path / "out") + "/")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    full, sliding = "full_attention", "sliding_attention"
    assert config["num_hidden_layers"] == 5
    assert config["layer_types"] == [full, sliding, sliding, full, full]

    import transformers

    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.layer_types == config["layer_types"]


def test_a_view_prints_and_reads_back_as_the_same_node(llamas):
    (a, _), _ = llamas["a"], llamas["b"]
    node = mecha.model(a, layers="1:3", at=4, of=9, outside="none")
    text = dump_recipe(node)
    assert 'layers="1:3", at=4, of=9, outside="none"' in text
    assert load_recipe(text) == node
    assert load_recipe(dump_recipe(mecha.model(a, layers="0:2"))) == mecha.model(a, layers="0:2")
    assert mecha.model(a, layers="0:2") != mecha.model(a, layers="0:3")


@pytest.mark.parametrize("line,words", [
    ('a = model("x", layers="3")', 'must be "START:STOP"'),
    ('a = model("x", layers="3:1")', "0 <= START < STOP"),
    ('a = model("x", layers="0:4", at=3, of=5)', "do not fit in a stack of 5 layers"),
    ('a = model("x", layers="0:4", outside="middle")', "must be one of all, none, before, after"),
    ('a = model("x", at=2)', 'go with layers="START:STOP"'),
    ('a = model("x", layers="0:2", at=1.5)', "must be a whole number"),
])
def test_bad_views_are_one_line_errors_naming_the_line(tmp_path, line, words):
    (tmp_path / "r.mecha").write_text(f"mecha 1\n\n{line}\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(str(tmp_path / "r.mecha"))
    message = str(err.value)
    assert "\n" not in message and words in message and "r.mecha:3:" in message.split(" ")[0], message


def test_a_range_outside_the_model_fails_before_any_output(tmp_path, llamas):
    (a, _), _ = llamas["a"], llamas["b"]
    (tmp_path / "r.mecha").write_text(f'mecha 1\n\na = model("{a}", layers="2:6")\n')
    with pytest.raises(MechaError) as err:
        mecha.merge(str(tmp_path / "r.mecha"), str(tmp_path / "o.safetensors"))
    message = str(err.value)
    assert "r.mecha:3:" in message and "not inside its 4 layers (0:4)" in message and "\n" not in message
    assert not os.path.exists(tmp_path / "o.safetensors")


def test_a_model_without_layers_is_refused(tmp_path):
    from safetensors.torch import save_file

    path = str(tmp_path / "plain.safetensors")
    save_file({"encoder.0.weight": torch.ones(2, 2), "encoder.1.weight": torch.ones(2, 2)}, path)
    with pytest.raises(MechaError, match="needs a model of a layered architecture family.*no detected"):
        mecha.merge(mecha.model(path, layers="0:2"), str(tmp_path / "o.safetensors"))
