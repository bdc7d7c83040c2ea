"""A down-scaled Flux transformer built with diffusers, saved in BFL, ComfyUI and diffusers
naming, merged across namings; the merge loads into diffusers and gives the outputs of a
reference merge computed in plain torch."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
from mecha_core.testing import plugin_from_functions, using, write_checkpoint
from mecha_flux import diffusers_layout, layout

CONFIG = dict(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
              num_attention_heads=2, joint_attention_dim=40, pooled_projection_dim=24, guidance_embeds=True,
              axes_dims_rope=(4, 6, 6))
SHAPE = layout.FluxShape(double_blocks=2, single_blocks=3, hidden=32, mlp_hidden=128, head_dim=16, in_channels=8,
                         context_dim=40, pooled_dim=24, guidance=True)
HIDDEN = 32


def _small_plugin():
    canonical = layout.flux_architecture("flux-test", SHAPE)
    diffusers = diffusers_layout.diffusers_architecture(canonical, "flux-test-diffusers")
    return plugin_from_functions("flux_test", mecha_architectures=lambda: [canonical, diffusers],
                                 mecha_converters=lambda: diffusers_layout.converters(diffusers.name, canonical.name))


# -- the test's own conversions between diffusers and BFL names (written from diffusers' converter) --
_RENAMES = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_DOUBLE = {"norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin", "attn.to_out.0": "img_attn.proj",
           "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
           "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2"}
_DOUBLE_NORM = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}


def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for old, new in _RENAMES.items():
        for p in ("weight", "bias"):
            out[f"{new}.{p}"] = sd[f"{old}.{p}"]
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    for i in range(CONFIG["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            for old, new in _DOUBLE.items():
                out[f"{b}{new}.{p}"] = sd[f"{d}{old}.{p}"]
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
        for old, new in _DOUBLE_NORM.items():
            out[f"{b}{new}.scale"] = sd[f"{d}{old}.weight"]
    for i in range(CONFIG["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
            out[f"{b}linear1.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"] + [sd[f"{d}proj_mlp.{p}"]])
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return out


def to_diffusers(bfl: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for old, new in _RENAMES.items():
        for p in ("weight", "bias"):
            out[f"{old}.{p}"] = bfl[f"{new}.{p}"]
    for p in ("weight", "bias"):
        shift, scale = bfl[f"final_layer.adaLN_modulation.1.{p}"].chunk(2)
        out[f"norm_out.linear.{p}"] = torch.cat([scale, shift])
    for i in range(CONFIG["num_layers"]):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            for old, new in _DOUBLE.items():
                out[f"{d}{old}.{p}"] = bfl[f"{b}{new}.{p}"]
            for x, part in zip("qkv", bfl[f"{b}img_attn.qkv.{p}"].chunk(3)):
                out[f"{d}attn.to_{x}.{p}"] = part
            for x, part in zip("qkv", bfl[f"{b}txt_attn.qkv.{p}"].chunk(3)):
                out[f"{d}attn.add_{x}_proj.{p}"] = part
        for old, new in _DOUBLE_NORM.items():
            out[f"{d}{old}.weight"] = bfl[f"{b}{new}.scale"]
    for i in range(CONFIG["num_single_layers"]):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{d}norm.linear.{p}"] = bfl[f"{b}modulation.lin.{p}"]
            out[f"{d}proj_out.{p}"] = bfl[f"{b}linear2.{p}"]
            q, k, v, mlp = bfl[f"{b}linear1.{p}"].split([HIDDEN, HIDDEN, HIDDEN, 4 * HIDDEN])
            out[f"{d}attn.to_q.{p}"], out[f"{d}attn.to_k.{p}"], out[f"{d}attn.to_v.{p}"] = q, k, v
            out[f"{d}proj_mlp.{p}"] = mlp
        out[f"{d}attn.norm_q.weight"] = bfl[f"{b}norm.query_norm.scale"]
        out[f"{d}attn.norm_k.weight"] = bfl[f"{b}norm.key_norm.scale"]
    return out


def _model(seed: int):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    model = FluxTransformer2DModel(**CONFIG).eval()
    with torch.no_grad():  # diffusers zero-initialises some layers; random weights everywhere make the test sharper
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def _forward(model) -> torch.Tensor:
    gen = torch.Generator().manual_seed(7)
    img_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0), indexing="ij"),
                          -1).reshape(16, 3)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 16, 8, generator=gen),
                     encoder_hidden_states=torch.randn(1, 5, 40, generator=gen),
                     pooled_projections=torch.randn(1, 24, generator=gen), timestep=torch.tensor([0.5]),
                     img_ids=img_ids, txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5]),
                     return_dict=False)[0]


def test_to_bfl_and_back_is_the_identity():  # the test's own conversions agree with each other
    sd = _model(0).state_dict()
    back = to_diffusers(to_bfl(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("alphas", [(0.3, 0.5)])
def test_merge_across_namings_loads_in_diffusers(tmp_path, alphas):
    from diffusers import FluxTransformer2DModel

    models = [_model(seed) for seed in (1, 2, 3)]
    sds = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in models]
    paths = [tmp_path / "a-diffusers.safetensors", tmp_path / "b-bfl.safetensors", tmp_path / "c-comfy.safetensors"]
    write_checkpoint(paths[0], sds[0])
    write_checkpoint(paths[1], to_bfl(sds[1]))
    write_checkpoint(paths[2], {layout.PREFIX + k: v for k, v in to_bfl(sds[2]).items()})

    a1, a2 = alphas
    with using(mecha_methods.plugin, _small_plugin()):
        a, b, c = (mecha_core.model(str(p)) for p in paths)
        out = tmp_path / "merged.safetensors"
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.weighted_sum(a, b, alpha=a1), c, alpha=a2), out, threads=2)
    merged = load_file(str(out))
    assert all(k.startswith(layout.PREFIX) for k in merged)  # the canonical (ComfyUI) layout

    reference = {k: (sds[0][k] * (1 - a1) + sds[1][k] * a1) * (1 - a2) + sds[2][k] * a2 for k in sds[0]}
    loaded = FluxTransformer2DModel(**CONFIG).eval()
    loaded.load_state_dict(to_diffusers({k.removeprefix(layout.PREFIX): v for k, v in merged.items()}), strict=True)
    expected = FluxTransformer2DModel(**CONFIG).eval()
    expected.load_state_dict(reference, strict=True)
    for k, v in loaded.state_dict().items():
        torch.testing.assert_close(v, reference[k], rtol=1e-6, atol=1e-6, msg=k)
    got, want = _forward(loaded), _forward(expected)
    assert want.abs().max() > 0.1  # the reference is not degenerate
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the merge differs from each input: the comparison could fail
    assert not torch.allclose(_forward(models[0]), want, atol=1e-3)


def test_diffusers_file_missing_a_fused_part_is_reported(tmp_path):
    sd = _model(4).state_dict()
    del sd["single_transformer_blocks.1.proj_mlp.weight"]
    path = tmp_path / "broken.safetensors"
    write_checkpoint(path, sd)
    with using(mecha_methods.plugin, _small_plugin()):
        a = mecha_core.model(str(path), arch="flux-test-diffusers")
        with pytest.raises(mecha_core.MechaError) as err:
            mecha_core.merge(mecha_core.weighted_sum(a, a, alpha=0.5), tmp_path / "out.safetensors", threads=2)
    message = str(err.value)
    assert "single_blocks.1.linear1.weight" in message and "single_transformer_blocks.1.attn.to_q.weight" in message
    assert "\n" not in message and err.value.exit_code == 2
    assert not (tmp_path / "out.safetensors").exists()
    with using(mecha_methods.plugin, _small_plugin()):  # --allow-missing leaves the fused key out
        a = mecha_core.model(str(path), arch="flux-test-diffusers")
        mecha_core.merge(mecha_core.weighted_sum(a, a, alpha=0.5), tmp_path / "out.safetensors", threads=2,
                         allow_missing=True)
    merged = load_file(str(tmp_path / "out.safetensors"))
    assert "model.diffusion_model.single_blocks.1.linear1.weight" not in merged
    torch.testing.assert_close(merged["model.diffusion_model.single_blocks.0.linear1.weight"],
                               torch.cat([sd[f"single_transformer_blocks.0.{n}.weight"]
                                          for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]))
