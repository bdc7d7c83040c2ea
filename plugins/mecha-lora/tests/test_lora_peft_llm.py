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
        if key.endswith("base_layer.weight") or "lora_" not in key:
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


# -- extraction: a fine-tune and its base (folders) to a PEFT adapter folder ----------------------------
def fine_tune(model, folder, seed: int, true_rank: int = 3, noise: float = 0.0):
    """The model plus a rank-``true_rank`` change of every linear layer (and ``noise``), its
    embeddings and one norm changed too; saved with save_pretrained."""
    tuned = _copy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if p.dim() == 2 and "embed" not in name and "lm_head" not in name:
                u = torch.randn(p.shape[0], true_rank, generator=gen) * 0.1
                v = torch.randn(true_rank, p.shape[1], generator=gen) * 0.1
                p.add_(u @ v + noise * torch.randn(p.shape, generator=gen))
            elif ("embed" in name or "lm_head" in name or name.endswith("layers.1.input_layernorm.weight")
                  or name.endswith("proj.bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    tuned.save_pretrained(str(folder))
    return str(folder), tuned


def truncated_svd(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_extracted_adapter_is_the_truncated_svd_and_loads_with_peft(tmp_path):
    import mecha_lora

    base_dir, model = build(tmp_path / "base", seed=10)
    tuned_dir, tuned = fine_tune(model, tmp_path / "tuned", seed=11, true_rank=4, noise=1e-3)
    out = mecha_lora.extract_lora(tuned_dir, base_dir, str(tmp_path / "adapter"), rank=4)
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 4)
    assert config["target_modules"] == sorted(LINEAR)
    assert config["modules_to_save"] == ["embed_tokens", "input_layernorm", "lm_head"]
    stored = load_file(os.path.join(out, "adapter_model.safetensors"))
    base, fine = model.state_dict(), tuned.state_dict()
    linear = [k for k in base if base[k].dim() == 2 and "embed" not in k and "lm_head" not in k]
    assert len(linear) == 14
    for key in linear:
        module = "base_model.model." + key.removesuffix(".weight")
        a, b = stored[module + ".lora_A.weight"], stored[module + ".lora_B.weight"]
        assert a.shape == (4, base[key].shape[1]) and b.shape == (base[key].shape[0], 4)
        want = truncated_svd(fine[key] - base[key], 4)
        torch.testing.assert_close((b.double() @ a.double()), want, rtol=0, atol=1e-5, msg=key)
        # the singular values are split evenly: A·Aᵀ and Bᵀ·B have the same diagonal (S)
        torch.testing.assert_close(torch.diag(a @ a.T), torch.diag(b.T @ b), rtol=1e-4, atol=1e-6)
    for key in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.input_layernorm.weight"):
        assert torch.equal(stored["base_model.model." + key], fine[key]), key
    # PEFT wraps every module of a modules_to_save name: the unchanged ones are saved too
    layer0_norm = "model.layers.0.input_layernorm.weight"
    assert torch.equal(stored["base_model.model." + layer0_norm], base[layer0_norm])
    assert "base_model.model.model.layers.0.post_attention_layernorm.weight" not in stored

    # PEFT loads it, and its merge is the base plus the truncated differences
    merged = peft_merged(model, out).state_dict()
    for key in linear:
        torch.testing.assert_close(merged[key].double(), base[key].double() + truncated_svd(fine[key] - base[key], 4),
                                   rtol=0, atol=1e-5, msg=key)
    torch.testing.assert_close(merged["lm_head.weight"], fine["lm_head.weight"])


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_extract_then_apply_round_trips_a_low_rank_fine_tune(tmp_path, family):
    """A rank-3 fine-tune extracted at full rank with embeddings="lora" (lora_embedding_A/B),
    applied back by mecha and by PEFT: the fine-tune again. Qwen2's q/k/v biases, changed too,
    are written whole as base_layer.bias."""
    import mecha_lora

    config = transformers.LlamaConfig if family == "llama" else transformers.Qwen2Config
    base_dir, model = build(tmp_path / "base", config, seed=12)
    tuned_dir, tuned = fine_tune(model, tmp_path / "tuned", seed=13)
    adapter = mecha_lora.extract_lora(tuned_dir, base_dir, str(tmp_path / "adapter"), rank=32, embeddings="lora")
    stored = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert "base_model.model.lm_head.lora_A.weight" in stored
    assert stored["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (32, 96)
    assert stored["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 32)
    biases = [k for k in stored if k.endswith(".bias")]
    if family == "llama":
        assert biases == []
    else:
        assert len(biases) == 2 * 3
        bias = "model.layers.1.self_attn.k_proj.bias"
        assert torch.equal(stored[f"base_model.model.{bias.removesuffix('.bias')}.base_layer.bias"],
                           tuned.state_dict()[bias])
    out = tmp_path / "round.safetensors"
    mecha_core.merge(mecha_core.apply_lora(mecha_core.model(base_dir), mecha_core.model(adapter)), out, threads=1)
    got = load_file(out)
    by_peft = peft_merged(model, adapter).state_dict()
    for key, value in tuned.state_dict().items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=2e-6, msg=key)
        torch.testing.assert_close(by_peft[key], value, rtol=1e-5, atol=2e-6, msg=key)


def test_extract_command_writes_a_folder_and_refuses_a_file_output(tmp_path):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    base_dir, model = build(tmp_path / "base", seed=14)
    tuned_dir, _ = fine_tune(model, tmp_path / "tuned", seed=15)
    runner = CliRunner()
    done = runner.invoke(app, ["lora", "extract", tuned_dir, base_dir, str(tmp_path / "ad"), "--rank", "2",
                               "--embeddings", "skip"])
    assert done.exit_code == 0, done.output
    stored = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert not any("embed" in k or "lm_head" in k for k in stored)
    assert stored["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape == (2, 32)
    failed = runner.invoke(app, ["lora", "extract", tuned_dir, base_dir, str(tmp_path / "x.safetensors")])
    assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and "PEFT adapter folder" in failed.stderr
    assert not (tmp_path / "x.safetensors").exists()
