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
    with pytest.raises(PlanError, match="for sd1-ldm \\(converter 'kohya-lora->sd1-ldm' of plugin 'lora' does not apply: "
                                           "the file is for sdxl-sgm, not sd1-ldm\\)"):
        kit.merge(recipe, tmp_path)


def test_lycoris_full_preset_modules_of_a_diffusers_named_sdxl_lora_apply(host, kit, tmp_path):
    # keys and shapes written out by hand from the sdxl-sgm layout, not taken from the table
    targets = {"lora_unet_conv_in": ("model.diffusion_model.input_blocks.0.0.weight", (320, 4, 3, 3)),
               "lora_unet_time_embedding_linear_1": ("model.diffusion_model.time_embed.0.weight", (1280, 320)),
               "lora_unet_add_embedding_linear_1": ("model.diffusion_model.label_emb.0.0.weight", (1280, 2816)),
               "lora_unet_conv_out": ("model.diffusion_model.out.2.weight", (4, 320, 3, 3))}
    gen = torch.Generator().manual_seed(6)
    base = {key: rnd(gen, *shape, scale=1.0) for key, shape in targets.values()}
    kit.write(tmp_path / "base.safetensors", base)
    lora, expected = {}, {}
    for name, (key, shape) in targets.items():
        rank = 2
        down = rnd(gen, rank, *shape[1:])
        up = rnd(gen, shape[0], rank, *([1, 1] if len(shape) == 4 else []))
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
        lora[f"{name}.alpha"] = torch.tensor(1.0)  # scale alpha / rank = 0.5
        delta = up.reshape(shape[0], rank) @ down.reshape(rank, -1)
        expected[key] = base[key] + 0.5 * delta.reshape(shape)
    kit.write(tmp_path / "full.safetensors", lora)
    recipe = mecha_core.apply_lora(mecha_core.model(str(tmp_path / "base.safetensors"), arch="sdxl-sgm"),
                                   mecha_core.model(str(tmp_path / "full.safetensors"), arch="sdxl-sgm"))
    out = kit.merge(recipe, tmp_path)
    for key in expected:
        torch.testing.assert_close(out[key], expected[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["int8", "bogus"])
def test_a_dtype_that_is_not_a_float_is_a_one_line_error(host, kit, tmp_path, capsys, dtype):
    # int8 rounded every factor to 0 (a LoRA that does nothing); an unknown name gave a traceback
    from mecha_lora.__main__ import main

    gen = torch.Generator().manual_seed(7)
    kit.write(tmp_path / "a.safetensors", lora_pair(gen, kit.module("sd1-ldm", SHARED.replace(
        "input_blocks_4_1", "down_blocks_1_attentions_0"))))
    code = main(["merge", str(tmp_path / "m.safetensors"), str(tmp_path / "a.safetensors"), "--dtype", dtype])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"got '{dtype}'" in err, err
    assert not (tmp_path / "m.safetensors").exists()
    code = main(["extract", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"),
                 str(tmp_path / "x.safetensors"), "--dtype", dtype])
    assert code == 2 and f"got '{dtype}'" in capsys.readouterr().err


def test_conv_rank_zero_leaves_convs_out_with_a_ratio_too(host, kit, tmp_path):
    import mecha_lora

    gen = torch.Generator().manual_seed(8)
    conv = kit.module("sd1-ldm", "lora_unet_down_blocks_0_resnets_0_conv1")  # 320 x 320 x 3 x 3
    lin = kit.module("sd1-ldm", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    base_path, base = kit.make_base(tmp_path, [conv, lin])
    tuned = {k: v + rnd(gen, *v.shape) if k in (conv.key, lin.key) else v for k, v in base.items()}
    kit.write(tmp_path / "tuned.safetensors", tuned)
    out = mecha_lora.extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "x.safetensors",
                                  ratio=0.05, conv_rank=0)
    from safetensors.torch import load_file

    names = {k.split(".")[0] for k in load_file(out)}
    assert names == {lin.kohya_name}
    assert load_file(out)[f"{lin.kohya_name}.lora_down.weight"].shape[0] == round(0.05 * 320)
    with pytest.raises(mecha_core.errors.MechaError, match="conv_rank must be 0"):
        mecha_lora.extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "y.safetensors", conv_rank=-1)
