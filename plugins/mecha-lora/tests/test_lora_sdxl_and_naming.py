"""SDXL (both U-Net spellings, CLIP-G q/k/v in the fused in_proj_weight), kohya vs PEFT naming,
name resolution against hand-derived keys, and unknown modules."""

from __future__ import annotations

import warnings

import pytest
import torch

import mecha_core
from mecha_core.errors import PlanError
from mecha_lora.resolve import ALLOW_UNKNOWN_ENV
from mecha_lora.tables import table

from .conftest import SHARED, module_lora_pair

SDXL = "sdxl-sgm"
TE2 = "lora_te2_text_model_encoder_layers_0_"
IN_PROJ = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"


def rnd(gen, *shape, scale=0.05):
    return torch.randn(*shape, generator=gen) * scale


def lora_pair(gen, name, out, inp, rank, alpha=None):
    t = {f"{name}.lora_down.weight": rnd(gen, rank, inp), f"{name}.lora_up.weight": rnd(gen, out, rank)}
    if alpha is not None:
        t[f"{name}.alpha"] = torch.tensor(alpha)
    return t


def delta_of(t, name, alpha=None):
    down, up = t[f"{name}.lora_down.weight"], t[f"{name}.lora_up.weight"]
    rank = down.shape[0]
    return (alpha if alpha is not None else rank) / rank * (up @ down)


def test_sdxl_lora_te2_qkv_and_both_unet_spellings(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(11)
    q, k, v = (kit.module(SDXL, TE2 + f"self_attn_{x}_proj") for x in "qkv")
    fc1 = kit.module(SDXL, TE2 + "mlp_fc1")
    te1 = kit.module(SDXL, "lora_te1_text_model_encoder_layers_3_self_attn_v_proj")
    sgm = kit.module(SDXL, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")
    diff_named = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"  # diffusers spelling
    diff_mod = table(SDXL).by_kohya[diff_named.removeprefix("lora_")]
    assert diff_mod.key == "model.diffusion_model.input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight"
    assert q.key == k.key == v.key == IN_PROJ
    assert fc1.key == "conditioner.embedders.1.model.transformer.resblocks.0.mlp.c_fc.weight"
    base_path, base = kit.make_base(tmp_path, [q, fc1, te1, sgm, diff_mod])
    lora = {}
    lora |= lora_pair(gen, q.kohya_name, 1280, 1280, 8, 4.0)
    lora |= lora_pair(gen, k.kohya_name, 1280, 1280, 4)
    lora |= lora_pair(gen, fc1.kohya_name, 5120, 1280, 4, 2.0)
    lora |= lora_pair(gen, te1.kohya_name, 768, 768, 4, 1.0)
    lora |= lora_pair(gen, sgm.kohya_name, 640, 2048, 4, 1.0)
    lora |= lora_pair(gen, diff_named, 640, 640, 4, 2.0)
    lora_path = tmp_path / "sdxl_lora.safetensors"
    kit.write(lora_path, lora)
    m = 0.9
    recipe = mecha_core.add_difference(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)), alpha=m)
    out = kit.merge(recipe, tmp_path)

    w = base[IN_PROJ]
    torch.testing.assert_close(out[IN_PROJ][:1280], w[:1280] + m * delta_of(lora, q.kohya_name, 4.0),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[IN_PROJ][1280:2560], w[1280:2560] + m * delta_of(lora, k.kohya_name),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(out[IN_PROJ][2560:], w[2560:])  # no v module: those rows untouched
    for mod, name, alpha in ((fc1, fc1.kohya_name, 2.0), (te1, te1.kohya_name, 1.0), (sgm, sgm.kohya_name, 1.0),
                             (diff_mod, diff_named, 2.0)):
        torch.testing.assert_close(out[mod.key], base[mod.key] + m * delta_of(lora, name, alpha), rtol=1e-5, atol=1e-6)
    for key in base:
        if key not in (IN_PROJ, fc1.key, te1.key, sgm.key, diff_mod.key):
            assert torch.equal(out[key], base[key]), key


def test_sdxl_fused_slice_mixing_dora_and_lora(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(12)
    q, v = (kit.module(SDXL, TE2 + f"self_attn_{x}_proj") for x in "qv")
    base_path, base = kit.make_base(tmp_path, [q])
    lora = lora_pair(gen, q.kohya_name, 1280, 1280, 4)
    lora |= lora_pair(gen, v.kohya_name, 1280, 1280, 4)
    mag = 1 + rnd(gen, 1280, 1, scale=0.2)
    lora[f"{v.kohya_name}.dora_scale"] = mag
    lora_path = tmp_path / "mixed.safetensors"
    kit.write(lora_path, lora)
    out = kit.merge(mecha_core.apply_lora(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)),
                                          strength=1.0), tmp_path)
    w = base[IN_PROJ]
    torch.testing.assert_close(out[IN_PROJ][:1280], w[:1280] + delta_of(lora, q.kohya_name), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[IN_PROJ][1280:2560], w[1280:2560])
    vv = w[2560:] + delta_of(lora, v.kohya_name)
    torch.testing.assert_close(out[IN_PROJ][2560:], mag * vv / vv.norm(dim=1, keepdim=True), rtol=1e-4, atol=1e-5)


def to_peft(kohya, arch, dora_names=()):
    """The same factors under diffusers/PEFT names (lora_A = down, lora_B = up; no alpha: alpha = r)."""
    peft = {}
    for key, value in kohya.items():
        name, _, param = key.partition(".")
        path = table(arch).by_kohya[name.removeprefix("lora_")]
        module = next(p for p, m in table(arch).by_peft.items() if m is path and ".text_model." in p or
                      (m is path and p.startswith("unet.")))
        suffix = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight",
                  "dora_scale": "lora_magnitude_vector"}[param]
        if param == "dora_scale":
            value = value.reshape(-1)
        peft[f"{module}.{suffix}"] = value
    return peft


@pytest.mark.parametrize("arch", ["sd1-ldm", "sdxl-sgm"])
def test_kohya_and_peft_naming_give_identical_results(host, kit, tmp_path, arch):
    gen = torch.Generator().manual_seed(13)
    if arch == "sd1-ldm":
        names = ["lora_te_text_model_encoder_layers_2_mlp_fc2",
                 "lora_unet_down_blocks_0_attentions_0_proj_in",
                 "lora_unet_down_blocks_0_resnets_0_conv1",
                 "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v"]
    else:
        names = [TE2 + "self_attn_k_proj", "lora_te1_text_model_encoder_layers_0_mlp_fc1",
                 "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k"]
    mods = [kit.module(arch, n) for n in names]
    base_path, base = kit.make_base(tmp_path, mods)
    kohya = {}
    for mod in mods:
        rank = 4
        kohya[f"{mod.kohya_name}.lora_down.weight"] = rnd(gen, rank, *mod.shape[1:])
        kohya[f"{mod.kohya_name}.lora_up.weight"] = rnd(gen, mod.shape[0], rank,
                                                        *([1, 1] if len(mod.shape) == 4 else []))
    kohya[f"{mods[0].kohya_name}.dora_scale"] = 1 + rnd(gen, mods[0].shape[0], 1)
    peft = to_peft(kohya, arch)
    assert not any(k.startswith("lora_") for k in peft)
    kit.write(tmp_path / "kohya.safetensors", kohya)
    kit.write(tmp_path / "peft.safetensors", peft)
    results = []
    for name in ("kohya", "peft"):
        recipe = mecha_core.apply_lora(mecha_core.model(str(base_path)),
                                       mecha_core.model(str(tmp_path / f"{name}.safetensors")),
                                       strength=0.5)
        results.append(kit.merge(recipe, tmp_path, name=f"out_{name}.safetensors"))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    changed = [k for k in base if not torch.equal(results[0][k], base[k])]
    assert sorted(changed) == sorted({m.key for m in mods})


def test_kohya_names_resolve_to_hand_derived_keys():
    """Keys worked out by hand from the diffusers -> ldm U-Net rules (formats.md section b)."""
    sd1 = table("sd1-ldm").kohya
    u = "model.diffusion_model."
    cases = {
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to_q":
            u + "input_blocks.5.1.transformer_blocks.0.attn1.to_q.weight",
        "lora_unet_up_blocks_1_resnets_2_conv1": u + "output_blocks.5.0.in_layers.2.weight",
        "lora_unet_up_blocks_3_resnets_0_conv_shortcut": u + "output_blocks.9.0.skip_connection.weight",
        "lora_unet_mid_block_attentions_0_proj_out": u + "middle_block.1.proj_out.weight",
        "lora_unet_mid_block_resnets_1_time_emb_proj": u + "middle_block.2.emb_layers.1.weight",
        "lora_unet_down_blocks_2_downsamplers_0_conv": u + "input_blocks.9.0.op.weight",
        "lora_unet_up_blocks_0_upsamplers_0_conv": u + "output_blocks.2.1.conv.weight",
        "lora_unet_up_blocks_2_upsamplers_0_conv": u + "output_blocks.8.2.conv.weight",
        "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2":
            u + "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight",
        "lora_te_text_model_encoder_layers_11_self_attn_out_proj":
            "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.out_proj.weight",
    }
    for name, key in cases.items():
        assert sd1(name).key == key, name
    assert sd1("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn1_to.q") is None
    sdxl = table("sdxl-sgm")
    v = sdxl.kohya(TE2.replace("layers_0", "layers_31") + "self_attn_v_proj")
    assert (v.key, v.rows) == ("conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                               (2560, 3840))
    assert sdxl.kohya("lora_unet_output_blocks_2_2_conv").key == u + "output_blocks.2.2.conv.weight"
    assert sdxl.kohya("lora_unet_up_blocks_0_upsamplers_0_conv").key == u + "output_blocks.2.2.conv.weight"


def test_unknown_modules_are_listed_or_skipped(host, kit, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(14)
    good = [kit.module("sd1-ldm", n) for n in ("lora_te_text_model_encoder_layers_0_mlp_fc1",
                                               "lora_unet_down_blocks_0_attentions_0_proj_out")]
    base_path, base = kit.make_base(tmp_path, good)
    lora = {}
    for mod in good:
        lora[f"{mod.kohya_name}.lora_down.weight"] = rnd(gen, 2, *mod.shape[1:])
        lora[f"{mod.kohya_name}.lora_up.weight"] = rnd(gen, mod.shape[0], 2, *([1, 1] if len(mod.shape) == 4 else []))
    lora["lora_unet_not_a_layer_at_all.lora_down.weight"] = rnd(gen, 2, 8)
    lora["lora_unet_not_a_layer_at_all.lora_up.weight"] = rnd(gen, 8, 2)
    # a real name with the wrong shape (an SDXL-sized cross-attention on SD1)
    lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"] = rnd(gen, 2, 2048)
    lora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"] = rnd(gen, 320, 2)
    lora_path = tmp_path / "odd.safetensors"
    kit.write(lora_path, lora)
    recipe = mecha_core.add_difference(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)))
    with pytest.raises(PlanError) as err:
        mecha_core.merge(recipe, tmp_path / "out.safetensors")
    message = str(err.value)
    assert "2 module(s)" in message and "lora_unet_not_a_layer_at_all" in message
    assert "attn2_to_k" in message and "[320, 2048]" in message and "--allow-missing" in message
    assert not (tmp_path / "out.safetensors").exists()

    for how in ("option", "environment"):  # --allow-missing, or the variable for tools that cannot pass it
        kwargs = {"allow_missing": True} if how == "option" else {}
        if how == "environment":
            monkeypatch.setenv(ALLOW_UNKNOWN_ENV, "1")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = kit.merge(recipe, tmp_path, name=f"out_{how}.safetensors", **kwargs)
        assert any("lora_unet_not_a_layer_at_all" in str(w.message) for w in caught), how
        for mod in good:
            assert not torch.equal(out[mod.key], base[mod.key])
        assert torch.equal(out["model.diffusion_model.time_embed.0.weight"],
                           base["model.diffusion_model.time_embed.0.weight"])


@pytest.mark.parametrize("arch,spelling", [("sd1-ldm", "kohya"), ("sdxl-sgm", "kohya"),
                                           ("sdxl-sgm", "diffusers"), ("sd1-ldm", "peft")])
def test_every_table_module_resolves_from_a_header(arch, spelling):
    """A header naming every module of the table (LoCon set, rank 1) plans one delta per weight
    key, on the right architecture; no tensor is read."""
    from mecha_core.specs import TensorInfo
    from mecha_lora.resolve import checked_resolution, converted_keys

    tab = table(arch)
    alt = {m: n for n, m in tab.by_kohya.items() if n != m.name}
    peft = {}
    for p, m in tab.by_peft.items():
        peft.setdefault(m, p)
    header = {}
    for m in tab.modules:
        if spelling == "peft":
            name, down, up = peft[m], ".lora_A.weight", ".lora_B.weight"
        else:
            name = "lora_" + (alt[m] if spelling == "diffusers" and m in alt else m.name)
            down, up = ".lora_down.weight", ".lora_up.weight"
        conv = len(m.shape) == 4
        header[name + down] = TensorInfo((1,) + m.shape[1:], "float16")
        header[name + up] = TensorInfo((m.shape[0], 1) + ((1, 1) if conv else ()), "float16")
    res = checked_resolution(header, "peft" if spelling == "peft" else "kohya")
    assert res.arch == arch and not res.unknown and len(res.changes) == len(tab.modules)
    keys = converted_keys(header, res)
    assert set(keys) == {m.key for m in tab.modules}
    for key, ck in keys.items():
        assert ck.info.shape == next(m.key_shape for m in tab.modules if m.key == key)
    if arch == "sdxl-sgm":
        assert sum(1 for m in tab.modules if m.rows) == 96  # 32 CLIP-G layers x q/k/v
        fused = keys["conditioner.embedders.1.model.transformer.resblocks.5.attn.in_proj_weight"]
        assert len(fused.sources) == 6 and fused.info.shape == (3840, 1280)


# -- which architecture a LoRA is for


@pytest.mark.parametrize("allow_missing", [False, True])
def test_an_sdxl_lora_on_sd1_weights_is_refused_naming_both_architectures(host, kit, tmp_path, allow_missing):
    # the U-Net module exists in both with one key and shape: --allow-missing used to apply it to SD1
    gen = torch.Generator().manual_seed(3)
    sd1_mod = kit.module("sd1-ldm", SHARED.replace("input_blocks_4_1", "down_blocks_1_attentions_0"))
    base_path, _ = kit.make_base(tmp_path, [sd1_mod])
    xl = {**module_lora_pair(gen, kit.module("sdxl-sgm", SHARED)),
          **module_lora_pair(gen, kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_mlp_fc1"))}
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
              module_lora_pair(gen, kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_mlp_fc1")))
    base_path, _ = kit.make_base(tmp_path, [])
    recipe = mecha_core.apply_lora(mecha_core.model(str(base_path), arch="sd1-ldm"),
                                   mecha_core.model(str(tmp_path / "xl.safetensors"), arch="sd1-ldm"))
    with pytest.raises(PlanError, match="for sd1-ldm \\(converter 'kohya-lora->sd1-ldm' of plugin 'lora' "
                                        "does not apply: "
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
