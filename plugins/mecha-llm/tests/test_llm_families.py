"""mecha-llm: families detected from tiny transformers models, layer-gradient merges checked
against plain torch, merged files loaded back with transformers and their logits compared."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mecha_core
from mecha_core.errors import MechaError
from mecha_core.plugins import get_host
from mecha_core.testing import check_plugin, open_model

FAMILIES = ["gemma2", "gemma3", "llama", "mistral", "mixtral", "phi3", "qwen2", "qwen3"]  # conftest.CONFIGS
INPUT_IDS = torch.tensor([[1, 5, 17, 33, 60, 7, 90, 2]])


def _arch(path: str):
    source = open_model(path, get_host())
    try:
        return get_host().architecture(source.arch)
    finally:
        source.close()


def _gradient(anchors, t):
    """mergekit's gradient, written independently: anchors evenly spaced on [0, 1], interpolated."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(anchors)), anchors))


def _position(key: str, layers: int) -> float:
    parts = key.split(".")
    if "layers" not in parts:
        return 0.0  # embeddings, final norm, head: the gradient's start (mergekit's t = 0)
    index = int(parts[parts.index("layers") + 1])
    return index / (layers - 1) if layers > 1 else 1.0


def _logits(folder: str) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    with torch.no_grad():
        return model(INPUT_IDS).logits


def _reference_logits(template_folder: str, tensors: dict, folder) -> torch.Tensor:
    """Logits of the model of ``template_folder``'s config with ``tensors`` (computed by plain
    torch), saved by safetensors itself into ``folder`` and loaded by transformers."""
    os.makedirs(folder)
    shutil.copy(os.path.join(template_folder, "config.json"), os.path.join(folder, "config.json"))
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, "model.safetensors"),
              metadata={"format": "pt"})
    return _logits(str(folder))


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_is_detected_with_its_layer_count(tiny, family):
    arch = _arch(tiny("a", family))
    experts = "-4e" if family == "mixtral" else ""
    assert arch.name == f"{family}-2l{experts}"
    assert arch.layers == ("layer_0", "layer_1")
    assert arch.blocks == ("embed", "layer_0", "layer_1", "final_norm", "lm_head", "other")
    assert f"{family} family: 2 layers, hidden size 32, vocabulary 96" in arch.description
    assert arch.keys["model.layers.1.input_layernorm.weight"].blocks == ("layer_1",)
    assert arch.keys["model.embed_tokens.weight"].klass == "embed_tokens"


def test_six_layers_and_twice_as_wide_are_members_with_their_own_blocks(tiny):
    six = _arch(tiny("six", num_hidden_layers=6))
    assert six.name == "llama-6l" and len(six.layers) == 6 and six.layers[-1] == "layer_5"
    wide = _arch(tiny("wide", hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4))
    assert "hidden size 64" in wide.description
    assert wide.keys["model.layers.0.mlp.gate_proj.weight"].shape == (96, 64)
    eleven = _arch(tiny("eleven", num_hidden_layers=11))  # zero-padded to the count's width
    assert eleven.layers[0] == "layer_00" and eleven.layers[-1] == "layer_10"


def test_classes_name_sub_modules_and_experts(tiny):
    mixtral = _arch(tiny("m", "mixtral"))
    assert "mixtral family: 2 layers, hidden size 32, vocabulary 96, 4 experts" in mixtral.description
    assert mixtral.keys["model.layers.0.block_sparse_moe.experts.3.w1.weight"].klass == "block_sparse_moe_experts_w1"
    assert {"self_attn_q_proj", "block_sparse_moe_gate", "input_layernorm", "lm_head"} <= set(mixtral.classes)
    qwen2 = _arch(tiny("q", "qwen2"))
    assert qwen2.keys["model.layers.1.self_attn.q_proj.bias"].klass == "self_attn_q_proj"


def test_generic_decoder_family_needs_no_config(tiny, tmp_path):
    path = tiny("a", "llama", num_hidden_layers=3)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(path, bare / "model.safetensors")
    arch = _arch(str(bare / "model.safetensors"))
    assert arch.name == "decoder-3l" and len(arch.layers) == 3


def _gradient_reference(a: dict, b: dict, layers: int, ffn: str, attn, mlp, default) -> dict:
    out = {}
    for key in a:
        sub = key.split(".")
        filt = attn if "self_attn" in sub else mlp if ffn in sub else default
        alpha = _gradient(filt, _position(key, layers)) if isinstance(filt, list) else filt
        out[key] = a[key] * (1 - alpha) + b[key] * alpha
    return out


@pytest.mark.parametrize("family,layers", [("llama", 4), ("mistral", 2), ("qwen2", 3), ("qwen3", 3), ("gemma2", 2),
                                           ("gemma3", 3), ("phi3", 2), ("mixtral", 2)])
def test_layer_gradient_with_class_filters_matches_plain_torch_and_loads(tiny, tmp_path, family, layers):
    a = tiny("a", family, 1, num_hidden_layers=layers)
    b = tiny("b", family, 2, num_hidden_layers=layers)
    attn, mlp, default = [0.0, 0.5, 0.25, 1.0], [1.0, 0.2], 0.3
    ffn = "block_sparse_moe" if family == "mixtral" else "mlp"  # mixtral's feed-forward is its experts
    alpha = mecha_core.layers(family, self_attn=attn, default=default, **{ffn: mlp})
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b), alpha=alpha),
                     out_dir / "model.safetensors", threads=2)
    merged = load_file(out_dir / "model.safetensors")
    ta, tb = load_file(a), load_file(b)
    reference = _gradient_reference(ta, tb, layers, ffn, attn, mlp, default)
    assert set(merged) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(merged[key], value, rtol=1e-6, atol=1e-6, msg=key)
    # one key's value spelled out: the last layer's attention takes the gradient's last anchor
    last = f"model.layers.{layers - 1}.self_attn.o_proj.weight"
    torch.testing.assert_close(merged[last], tb[last])
    shutil.copy(os.path.join(os.path.dirname(a), "config.json"), out_dir / "config.json")
    torch.testing.assert_close(_logits(str(out_dir)), _reference_logits(os.path.dirname(a), reference,
                                                                         tmp_path / "reference"),
                               rtol=1e-5, atol=1e-5)
    if family in ("gemma2", "gemma3"):  # tied embeddings: no head in the inputs, none in the output
        assert "lm_head.weight" not in merged


def test_layer_gradient_in_mecha_text_round_trips_and_merges(tiny, tmp_path):
    a = tiny("a", "mixtral", 1, num_hidden_layers=3)
    b = tiny("b", "mixtral", 2, num_hidden_layers=3)
    text = (f'mecha 1\nmerged = weighted_sum(model("{a}"), model("{b}"), '
            f'alpha=layers("mixtral", [0, 1], block_sparse_moe_experts=[1, 0]))\n')
    recipe = mecha_core.load_recipe(text)
    assert mecha_core.load_recipe(mecha_core.dump_recipe(recipe)) == recipe
    assert 'layers("mixtral", [0, 1], block_sparse_moe_experts=[1, 0])' in mecha_core.dump_recipe(recipe)
    out = tmp_path / "out.safetensors"
    mecha_core.merge(recipe, out, threads=1)
    merged, ta, tb = load_file(out), load_file(a), load_file(b)
    for key in ta:
        anchors = [1, 0] if ".experts." in key else [0, 1]
        alpha = _gradient(anchors, _position(key, 3))
        torch.testing.assert_close(merged[key], ta[key] * (1 - alpha) + tb[key] * alpha, msg=key)


def test_a_filter_no_class_matches_is_refused(tiny, tmp_path):
    a, b = tiny("a"), tiny("b", seed=1)
    recipe = mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b),
                                     alpha=mecha_core.layers("llama", [0, 1], self_atn=0.5))
    with pytest.raises(MechaError, match="llama-2l has no class 'self_atn'; did you mean 'self_attn"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_a_map_naming_another_family_is_refused(tiny, tmp_path):
    a, b = tiny("a"), tiny("b", seed=1)
    recipe = mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b),
                                     alpha=mecha_core.blocks("qwen2", layer_0=1.0))
    with pytest.raises(MechaError, match="names the qwen2 family, but the models of this merge are not qwen2"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")


def test_block_maps_name_the_family_and_reach_each_layer(tiny, tmp_path):
    a, b = tiny("a", num_hidden_layers=6), tiny("b", seed=1, num_hidden_layers=6)
    recipe = mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b),
                                     alpha=mecha_core.blocks("llama", default=0.0, layer_4=1.0, embed=0.5))
    mecha_core.merge(recipe, tmp_path / "o.safetensors", threads=1)
    merged, ta, tb = load_file(tmp_path / "o.safetensors"), load_file(a), load_file(b)
    for key in ta:
        alpha = 1.0 if ".layers.4." in key else 0.5 if "embed_tokens" in key else 0.0
        torch.testing.assert_close(merged[key], ta[key] * (1 - alpha) + tb[key] * alpha, msg=key)


def test_inputs_of_different_vocabularies_are_refused_naming_key_and_sizes(tiny, tmp_path):
    a, b = tiny("a"), tiny("b", seed=1, vocab_size=120)
    recipe = mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b), alpha=0.5)
    with pytest.raises(MechaError, match=r"key 'lm_head.weight' has a vocabulary of 96 rows in "
                                         r"model.safetensors but 120 in model.safetensors.*keep_vocab=true"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("keep", ["small", "large"])
def test_keep_vocab_takes_rows_from_the_models_that_have_them(tiny, tmp_path, keep):
    small, large = tiny("small"), tiny("large", seed=1, vocab_size=120)
    kept = small if keep == "small" else large
    recipe = mecha_core.weighted_sum(mecha_core.model(small, keep_vocab=keep == "small"),
                                     mecha_core.model(large, keep_vocab=keep == "large"), alpha=0.25)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    mecha_core.merge(recipe, out_dir / "model.safetensors", threads=2)
    merged, ts, tl = load_file(out_dir / "model.safetensors"), load_file(small), load_file(large)
    rows = 96 if keep == "small" else 120
    for key in ts:
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = tl[key][:rows].clone()  # rows only the large model has are its own
            expected[:96] = ts[key] * 0.75 + tl[key][:96] * 0.25
        else:
            expected = ts[key] * 0.75 + tl[key] * 0.25
        torch.testing.assert_close(merged[key], expected, msg=key)
    shutil.copy(os.path.join(os.path.dirname(kept), "config.json"), out_dir / "config.json")
    assert _logits(str(out_dir)).shape[-1] == rows


def test_inspect_and_info_show_the_family(tiny):
    path = tiny("m", "mixtral", num_hidden_layers=3)
    run = subprocess.run([sys.executable, "-m", "mecha_core", "inspect", path, "--json"], capture_output=True,
                         text=True, check=True)
    found = json.loads(run.stdout)
    assert (found["architecture"], found["family"]) == ("mixtral-3l-4e", "mixtral")
    assert found["architecture_description"] == ("mixtral family: 3 layers, hidden size 32, vocabulary 96, 4 experts, "
                                                 "separate LM head")
    assert found["missing"] == [] and found["unexpected"] == []
    text = subprocess.run([sys.executable, "-m", "mecha_core", "inspect", path], capture_output=True, text=True,
                          check=True).stdout
    assert "mixtral-3l-4e" in text and "3 layers, hidden size 32" in text
    info = subprocess.run([sys.executable, "-m", "mecha_core", "info", "gemma3"], capture_output=True, text=True,
                          check=True).stdout
    assert info.startswith("gemma3: architecture family: ") and "gemma3_text" in info


def test_members_of_other_layouts_do_not_merge(tiny, tmp_path):
    a = tiny("a")
    deeper = tiny("deeper", seed=1, num_hidden_layers=3)
    wider = tiny("wider", seed=2, hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4)
    with pytest.raises(MechaError, match="inputs are of different architectures: model.safetensors is llama-2l, "
                                         "model.safetensors is llama-3l"):
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(deeper)),
                         tmp_path / "o.safetensors")
    with pytest.raises(MechaError, match=r"key '.*' has shape \[\d+(, \d+)?\] in model.safetensors but"):
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(wider)),
                         tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()


def test_the_text_part_of_a_multimodal_gemma3_is_a_member(tmp_path):
    text = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    transformers.Gemma3ForConditionalGeneration(config).save_pretrained(str(tmp_path / "g"))
    arch = _arch(str(tmp_path / "g" / "model.safetensors"))
    assert arch.name == "gemma3-3l" and "vocabulary 300, tied embeddings" in arch.description
    stack = [k for k in arch.keys if ".layers." in k and not k.startswith("vision_tower")]
    assert stack and all(arch.keys[k].blocks[0].startswith("layer_") for k in stack)
    vision_keys = [k for k in arch.keys if k.startswith("vision_tower.")]
    assert vision_keys and all(arch.keys[k].blocks == ("other",) for k in vision_keys)
    assert arch.vocab_keys[0].endswith("embed_tokens.weight")


def test_the_plugin_keeps_the_contract():
    import mecha_llm.plugin

    assert check_plugin(mecha_llm.plugin) == []


def test_a_folder_output_keeping_a_vocabulary_takes_that_models_config_and_loads(tiny, tmp_path):
    small, large = tiny("small"), tiny("large", seed=1, vocab_size=120)
    (tmp_path / "large" / "tokenizer.json").write_text('{"marker": "large"}')
    (tmp_path / "small" / "tokenizer.json").write_text('{"marker": "small"}')
    recipe = mecha_core.weighted_sum(mecha_core.model(str(tmp_path / "small")),
                                     mecha_core.model(str(tmp_path / "large"), keep_vocab=True), alpha=0.5)
    out = tmp_path / "merged"
    mecha_core.merge(recipe, str(out) + os.sep, threads=2)
    assert json.loads((out / "tokenizer.json").read_text()) == {"marker": "large"}
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 120
    ts, tl = load_file(small), load_file(large)
    reference = {}
    for key in ts:
        reference[key] = ts[key] * 0.5 + tl[key][:ts[key].shape[0]] * 0.5
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            reference[key] = torch.cat([reference[key], tl[key][96:]])
    torch.testing.assert_close(_logits(str(out)), _reference_logits(str(tmp_path / "large"), reference,
                                                                    tmp_path / "reference"), rtol=1e-5, atol=1e-5)
