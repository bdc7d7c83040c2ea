"""Review findings in mecha-lora: each test pins a problem a user of SD LoRAs could hit."""

from __future__ import annotations

import pytest
import torch

import mecha_core
from mecha_core.errors import PlanError

SHARED = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"  # same key and shape in SD1 and SDXL


def rnd(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def lora_pair(gen, mod, rank=4):
    return {f"{mod.kohya_name}.lora_down.weight": rnd(gen, rank, mod.shape[1]),
            f"{mod.kohya_name}.lora_up.weight": rnd(gen, mod.shape[0], rank)}


@pytest.mark.parametrize("allow_missing", [False, True])
def test_an_sdxl_lora_on_sd1_weights_is_refused_naming_both_architectures(host, kit, tmp_path, allow_missing):
    # the U-Net module exists in both with one key and shape: --allow-missing used to apply it to SD1
    gen = torch.Generator().manual_seed(3)
    sd1_mod = kit.module("sd1-ldm", SHARED.replace("input_blocks_4_1", "down_blocks_1_attentions_0"))
    base_path, _ = kit.make_base(tmp_path, [sd1_mod])
    xl = {**lora_pair(gen, kit.module("sdxl-sgm", SHARED)),
          **lora_pair(gen, kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_mlp_fc1"))}
    kit.write(tmp_path / "xl.safetensors", xl)
    recipe = mecha_core.apply_lora(mecha_core.model(str(base_path), arch="sd1-ldm"),
                                   mecha_core.model(str(tmp_path / "xl.safetensors")))
    with pytest.raises(PlanError, match="different architectures: base.safetensors is sd1-ldm, "
                                        "xl.safetensors is sdxl-sgm"):
        kit.merge(recipe, tmp_path, allow_missing=allow_missing)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_lora_that_fits_two_architectures_follows_the_one_named(host, kit, tmp_path):
    # PEFT LoRA of CLIP-L only: SD1's text encoder and SDXL's first one have the same layers
    gen = torch.Generator().manual_seed(4)
    mod = kit.module("sdxl-sgm", "lora_te1_text_model_encoder_layers_0_self_attn_q_proj")
    down, up = rnd(gen, 4, 768), rnd(gen, 768, 4)
    peft = {"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": down,
            "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": up}
    kit.write(tmp_path / "te.safetensors", peft)
    base_path, base = kit.make_base(tmp_path, [mod])
    unnamed = mecha_core.apply_lora(mecha_core.model(str(base_path), arch="sdxl-sgm"),
                                    mecha_core.model(str(tmp_path / "te.safetensors")))
    with pytest.raises(PlanError, match="te.safetensors is sd1-ldm.*model\\(\\.\\.\\., arch=\\.\\.\\.\\)"):
        kit.merge(unnamed, tmp_path)
    named = mecha_core.apply_lora(mecha_core.model(str(base_path), arch="sdxl-sgm"),
                                  mecha_core.model(str(tmp_path / "te.safetensors"), arch="sdxl-sgm"))
    out = kit.merge(named, tmp_path)
    # PEFT without a LoraConfig: scale 1, ΔW = B·A
    torch.testing.assert_close(out[mod.key], base[mod.key] + up @ down, rtol=1e-5, atol=1e-6)


def test_naming_an_architecture_a_lora_does_not_fit_says_why(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(5)
    kit.write(tmp_path / "xl.safetensors",
              lora_pair(gen, kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_mlp_fc1")))
    base_path, _ = kit.make_base(tmp_path, [])
    recipe = mecha_core.apply_lora(mecha_core.model(str(base_path), arch="sd1-ldm"),
                                   mecha_core.model(str(tmp_path / "xl.safetensors"), arch="sd1-ldm"))
    with pytest.raises(PlanError, match="for sd1-ldm \\(kohya-lora->sd1-ldm: the file is for sdxl-sgm, not sd1-ldm\\)"):
        kit.merge(recipe, tmp_path)
