"""SDXL kohya and diffusers layouts: names match diffusers' own models, and converted values are
the sgm values (q/k/v stacked into in_proj, text_projection transposed, VAE attention reshaped)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
import mecha_sdxl.plugin
from mecha_core.testing import using, write_checkpoint
from mecha_sdxl import conversions, layout

CONFIGS = Path(__file__).parent / "data" / "diffusers-configs" / "sdxl"
G = "conditioner.embedders.1.model."


def test_diffusers_layout_matches_diffusers_models():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    expected = {}
    with torch.device("meta"):
        models = {
            "unet.": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet")),
            "vae.": AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae")),
            "text_encoder.": CLIPTextModel(CLIPTextConfig.from_json_file(CONFIGS / "text_encoder" / "config.json")),
            "text_encoder_2.": CLIPTextModelWithProjection(
                CLIPTextConfig.from_json_file(CONFIGS / "text_encoder_2" / "config.json")),
        }
    for prefix, model in models.items():
        expected.update({_plain(prefix + k): tuple(v.shape) for k, v in model.state_dict().items()})
    arch = conversions.diffusers_architecture()
    mine = {_plain(k): s.shape for k, s in arch.keys.items() if not k.endswith("position_ids")}
    assert mine == expected


def _plain(key: str) -> str:
    # transformers 5 drops text_model. from CLIPTextModel (not ...WithProjection) state dicts;
    # the layout accepts both spellings (aliases), so compare without it
    return key.replace(".text_model.", ".", 1)


def _rand(shape, gen):
    return torch.randn(shape, generator=gen)


def test_kohya_and_diffusers_values_become_sgm_values(tmp_path):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (_rand((1280, 1280), gen) for _ in range(3))
    qb, kb, vb = (_rand((1280,), gen) for _ in range(3))
    proj = _rand((1280, 1280), gen)
    attn_q = _rand((512, 512), gen)
    conv = _rand((320, 4, 3, 3), gen)
    te1 = _rand((768,), gen)
    layer = "text_model.encoder.layers.3.self_attn."
    kohya = {f"te2.{layer}q_proj.weight": q, f"te2.{layer}k_proj.weight": k, f"te2.{layer}v_proj.weight": v,
             f"te2.{layer}q_proj.bias": qb, f"te2.{layer}k_proj.bias": kb, f"te2.{layer}v_proj.bias": vb,
             "te2.text_projection.weight": proj, "unet.input_blocks.0.0.weight": conv,
             "te1.text_model.final_layer_norm.bias": te1}
    diffusers = {k.replace("te2.", "text_encoder_2.").replace("te1.", "text_encoder."): t for k, t in kohya.items()}
    del diffusers["unet.input_blocks.0.0.weight"]
    diffusers["unet.conv_in.weight"] = conv
    diffusers["vae.decoder.mid_block.attentions.0.to_q.weight"] = attn_q
    sgm_expected = {
        G + "transformer.resblocks.3.attn.in_proj_weight": torch.cat([q, k, v]),
        G + "transformer.resblocks.3.attn.in_proj_bias": torch.cat([qb, kb, vb]),
        G + "text_projection": proj.t(),
        "model.diffusion_model.input_blocks.0.0.weight": conv,
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.bias": te1,
    }
    write_checkpoint(tmp_path / "kohya.safetensors", kohya)
    write_checkpoint(tmp_path / "diffusers.safetensors", diffusers)
    with using(mecha_methods.plugin, mecha_sdxl.plugin):
        for name, arch in (("kohya", "sdxl-kohya"), ("diffusers", "sdxl-diffusers")):
            recipe = mecha_core.scale(mecha_core.model(str(tmp_path / f"{name}.safetensors"), arch=arch), alpha=2.0)
            merged = load_file(mecha_core.merge(recipe, tmp_path / f"{name}-out.safetensors"))
            expected = dict(sgm_expected)
            if name == "diffusers":
                expected["first_stage_model.decoder.mid.attn_1.q.weight"] = attn_q.reshape(512, 512, 1, 1)
            assert set(merged) == set(expected), name
            for key, value in expected.items():
                torch.testing.assert_close(merged[key], 2.0 * value, rtol=0, atol=0, msg=f"{name}: {key}")


def test_a_sgm_key_with_part_of_its_sources_is_left_for_the_plan_to_report():
    half = {"te2.text_model.encoder.layers.0.self_attn.q_proj.weight":
            mecha_core.specs.TensorInfo((1280, 1280), "float16"),
            "te2.text_model.encoder.layers.0.self_attn.k_proj.weight":
            mecha_core.specs.TensorInfo((1280, 1280), "float16")}
    planned = conversions.planner(conversions.KOHYA)(half)
    assert G + "transformer.resblocks.0.attn.in_proj_weight" not in planned
    assert set(planned) == set(half)  # passed through under their own names, so nothing is lost


def test_conversion_tables_cover_every_key_of_each_layout():
    sgm = layout.architecture()
    for naming, arch in ((conversions.KOHYA, conversions.kohya_architecture()),
                         (conversions.DIFFUSERS, conversions.diffusers_architecture())):
        table = conversions.table(naming)
        used = [s for sources, _, _ in table.values() for s in sources]
        assert sorted(used) == sorted(arch.keys), naming  # each layout key read exactly once
        assert set(table) == {k for k, s in sgm.keys.items()
                              if s.component not in ("scheduler",) and k not in
                              ("v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max",
                               G + "logit_scale")}
