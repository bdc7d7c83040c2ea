"""PEFT adapters on language models: adapter folders made by peft itself on tiny transformers
models (random weights), applied by mecha and compared tensor by tensor with W + scale·B@A
computed here in plain torch, and with PEFT's own merge_and_unload (logits of the merged folder
loaded by transformers)."""

from __future__ import annotations

import json
import math
import os
import re

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import mecha_core
from mecha_core.errors import MechaError

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
INPUT_IDS = torch.tensor([[1, 5, 17, 33, 60, 7, 90, 2]])
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(folder, config_class=transformers.LlamaConfig, seed: int = 0, **fields):
    """A random tiny model saved with save_pretrained; returns (folder, model)."""
    config = config_class(**{**TINY, **fields})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
    return str(folder), model


def make_adapter(model, folder, seed: int = 1, **config) -> str:
    """A PEFT adapter of ``model`` with random (non-zero) LoRA weights, saved by peft."""
    torch.manual_seed(seed)
    lora = peft.LoraConfig(init_lora_weights=False, **config)
    peft_model = peft.get_peft_model(_copy(model), lora)
    with torch.no_grad():  # magnitudes and saved modules start as the base's: move them so they are tested
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name or "modules_to_save" in name:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    peft_model.save_pretrained(str(folder))
    return str(folder)


def _copy(model):
    clone = transformers.AutoModelForCausalLM.from_config(model.config)
    clone.load_state_dict(model.state_dict())
    return clone


def peft_merged(model, adapter: str):
    """PEFT's own merge (what mergekit's base+lora runs): the merged model."""
    merged = peft.PeftModel.from_pretrained(_copy(model), adapter).merge_and_unload()
    merged.eval()
    return merged


def _scale(config: dict, module: str, rank: int) -> float:
    """PEFT's rule, written here: alpha_pattern (whole path or dotted suffix, first match) or
    lora_alpha, over r (or sqrt(r) with use_rslora)."""
    alpha = config["lora_alpha"]
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def expected_weights(base: dict, adapter: str) -> dict:
    """W + scale·B@A (embeddings: + scale·(B@A)ᵀ; modules_to_save: the saved weight), plain torch."""
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    tensors = {k.removeprefix("base_model.model."): v for k, v in
               load_file(os.path.join(adapter, "adapter_model.safetensors")).items()}
    out = {k: v.clone() for k, v in base.items()}
    for key, value in tensors.items():
        if key.endswith("base_layer.weight") or not ("lora_" in key):
            out[key.replace(".base_layer", "")] = value.clone()
    for key, a in tensors.items():
        if ".lora_A." in key or key.endswith("lora_embedding_A"):
            embedding = key.endswith("lora_embedding_A")
            module = key.split(".lora_")[0]
            b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            delta = _scale(config, module, a.shape[0]) * (b.double() @ a.double())
            if embedding or config.get("fan_in_fan_out"):
                delta = delta.T
            out[module + ".weight"] = (out[module + ".weight"].double() + delta).float()
    return out


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(INPUT_IDS).logits


def test_adapter_folder_on_a_llama_folder_matches_plain_torch_and_peft(tmp_path):
    base_dir, model = build(tmp_path / "base")
    config = dict(r=4, lora_alpha=8, target_modules=LINEAR + ["embed_tokens"], modules_to_save=["lm_head"],
                  rank_pattern={"mlp.down_proj": 2}, alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3})
    adapter = make_adapter(model, tmp_path / "adapter", **config)
    out = str(tmp_path / "merged") + "/"
    mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter)), out, threads=2)

    got = load_file(os.path.join(out, "model.safetensors"))
    want = expected_weights(model.state_dict(), adapter)
    assert set(got) == set(model.state_dict())
    changed = 0
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
        changed += not torch.equal(value, model.state_dict()[key])
    assert changed == 2 * 7 + 2  # every linear layer, the embeddings (LoRA) and lm_head (modules_to_save)

    reference = peft_merged(model, adapter)  # PEFT's merge_and_unload, an independent implementation
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-4, atol=1e-5)


def test_rslora_and_the_adapter_file_given_alone_on_a_qwen2_model(tmp_path):
    base_dir, model = build(tmp_path / "base", transformers.Qwen2Config, seed=3)
    adapter = make_adapter(model, tmp_path / "adapter", r=8, lora_alpha=4, use_rslora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged.safetensors"
    recipe = mecha_core.apply_lora(mecha_core.model(os.path.join(base_dir, "model.safetensors")),
                                   mecha_core.model(os.path.join(adapter, "adapter_model.safetensors")))
    mecha_core.merge(recipe, out, threads=1)
    got = load_file(out)
    for key, value in expected_weights(model.state_dict(), adapter).items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           model.state_dict()["model.layers.0.self_attn.q_proj.weight"])


def test_generic_decoder_without_config_and_strength(tmp_path):
    """A model no family claims by config (config.json removed: the generic decoder family) takes
    the adapter all the same; strength 0.5 halves every LoRA change."""
    base_dir, model = build(tmp_path / "base", seed=4)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=16, target_modules=["o_proj", "up_proj"])
    os.remove(os.path.join(base_dir, "config.json"))
    out = tmp_path / "merged.safetensors"
    mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter), strength=0.5),
                     out, threads=1)
    got = load_file(out)
    full = expected_weights(model.state_dict(), adapter)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(got[key], value + 0.5 * (full[key] - value), rtol=1e-6, atol=1e-6, msg=key)


def test_dora_is_merged_as_peft_merges_it(tmp_path):
    base_dir, model = build(tmp_path / "base", seed=5)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, use_dora=True,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged.safetensors"
    mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter)), out, threads=1)
    got = load_file(out)
    plain = expected_weights(model.state_dict(), adapter)  # W + ΔW
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    changed = 0
    for key, value in model.state_dict().items():
        magnitude = tensors.get("base_model.model." + key.removesuffix(".weight") + ".lora_magnitude_vector")
        if magnitude is None:
            assert torch.equal(got[key], value), key
            continue
        v = plain[key].double()
        want = magnitude.double()[:, None] * v / v.norm(dim=1, keepdim=True)  # DoRA: m · V / ||V||_row
        torch.testing.assert_close(got[key], want.float(), rtol=1e-5, atol=1e-6, msg=key)
        changed += 1
    assert changed == 6
    reference = peft_merged(model, adapter)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fan_in_fan_out_on_gpt2_conv1d(tmp_path):
    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(6)
    model = transformers.AutoModelForCausalLM.from_config(config)
    base_dir = str(tmp_path / "base")
    model.save_pretrained(base_dir)
    adapter = make_adapter(model, tmp_path / "adapter", r=4, lora_alpha=8, fan_in_fan_out=True,
                           target_modules=["c_attn", "c_fc"])
    out = tmp_path / "merged.safetensors"
    mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter)), out, threads=1)
    got = load_file(out)
    want = expected_weights({k: v for k, v in load_file(os.path.join(base_dir, "model.safetensors")).items()},
                            adapter)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)
    reference = peft_merged(model, adapter).state_dict()
    torch.testing.assert_close(got["transformer.h.1.mlp.c_fc.weight"], reference["transformer.h.1.mlp.c_fc.weight"],
                               rtol=1e-5, atol=1e-6)


def test_a_module_the_model_lacks_is_one_line_naming_the_key(tmp_path):
    base_dir, model = build(tmp_path / "base", seed=7)
    adapter = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["q_proj"])
    tensors = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    a = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
    b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"] = a.clone()
    tensors["base_model.model.model.layers.7.self_attn.q_proj.lora_B.weight"] = b.clone()
    save_file(tensors, os.path.join(adapter, "adapter_model.safetensors"))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(MechaError) as info:
        mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter)), out)
    message = str(info.value)
    assert "model.layers.7.self_attn.q_proj.weight" in message and "\n" not in message
    assert info.value.exit_code == 2 and not out.exists()


def test_dora_on_embeddings_and_bad_configs_are_refused(tmp_path):
    base_dir, model = build(tmp_path / "base", seed=8)
    adapter = make_adapter(model, tmp_path / "adapter", r=2, lora_alpha=2, use_dora=True,
                           target_modules=["embed_tokens"])
    recipe = mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter))
    with pytest.raises(MechaError, match=r"model\.embed_tokens' is a DoRA embedding"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    config_path = os.path.join(adapter, "adapter_config.json")
    config = json.load(open(config_path))
    config["lora_alpha"] = "eight"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(MechaError, match=r"adapter_config.json field 'lora_alpha' must be a finite number"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    config["peft_type"] = "IA3"
    json.dump(config, open(config_path, "w"))
    with pytest.raises(MechaError, match=r"peft_type 'IA3' is not a LoRA"):
        mecha_core.merge(recipe, tmp_path / "o.safetensors")
    assert not (tmp_path / "o.safetensors").exists()
