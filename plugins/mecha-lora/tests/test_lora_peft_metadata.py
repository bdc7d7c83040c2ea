"""PEFT/diffusers LoRA strength from the file's ``__metadata__["lora_adapter_metadata"]``.

Expected weights are W + m·scale·B·A with scale worked out here from the config by hand
(lora_alpha / r, lora_alpha / sqrt(r) with rsLoRA, alpha_pattern overrides).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_lora
from mecha_core.errors import PlanError
from mecha_lora.adapter_config import ComponentConfig
from mecha_lora.tables import table

SD1 = "sd1-ldm"
TO_K = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"  # linear 320x768
TO_V = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v"  # linear 320x768
PROJ_IN = "lora_unet_down_blocks_0_attentions_0_proj_in"                       # 1x1 conv 320x320
Q_PROJ = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"               # linear 768x768
RANK = 4


def peft_name(mod) -> str:
    """The diffusers pipeline name of a table module (``unet.`` / ``text_encoder.text_model.``)."""
    return next(p for p, m in table(SD1).by_peft.items()
                if m is mod and (p.startswith("unet.") or p.startswith("text_encoder.text_model.")))


def factors(gen, mod, rank=RANK):
    """(A, B) = (down, up) with the layer's real shapes; conv factors are 1x1 like PEFT's."""
    conv = len(mod.shape) == 4
    a = torch.randn(rank, *mod.shape[1:], generator=gen) * 0.05
    b = torch.randn(mod.shape[0], rank, *([1, 1] if conv else []), generator=gen) * 0.05
    return a, b


def product(a, b, shape):
    """B·A flattened to [out, in·k·k] and shaped like the layer, computed independently here."""
    return torch.einsum("or,ri->oi", b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)).reshape(shape)


def write_peft(kit, path, mods_factors, names, metadata=None):
    tensors = {}
    for (_mod, (a, b)), name in zip(mods_factors, names):
        tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = a, b
    kit.write(path, tensors, metadata=None if metadata is None else {"lora_adapter_metadata": json.dumps(metadata)})
    return path


def merged(kit, tmp_path, base_path, lora_path, m, name="out.safetensors"):
    recipe = mecha_core.add_difference(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)), alpha=m)
    return kit.merge(recipe, tmp_path, name=name)


def setup(kit, tmp_path, names, seed):
    gen = torch.Generator().manual_seed(seed)
    mods = [kit.module(SD1, n) for n in names]
    base_path, base = kit.make_base(tmp_path, mods)
    return mods, [(mod, factors(gen, mod)) for mod in mods], base_path, base


def check(out, base, mods_factors, scales, m):
    for (mod, (a, b)), scale in zip(mods_factors, scales):
        expected = base[mod.key] + m * scale * product(a, b, mod.key_shape)
        torch.testing.assert_close(out[mod.key], expected, rtol=1e-5, atol=1e-6)
    touched = {mod.key for mod, _ in mods_factors}
    for key in base:
        if key not in touched:
            assert torch.equal(out[key], base[key]), key


@pytest.mark.parametrize("layout", ["model", "pipeline"])
def test_lora_alpha_from_metadata_sets_the_scale(host, kit, tmp_path, layout):
    """lora_alpha=8, r=4: scale 2. ``model``: save_lora_adapter (a bare U-Net config, U-Net paths
    without a component); ``pipeline``: save_lora_weights (fields prefixed by the component)."""
    mods, mf, base_path, base = setup(kit, tmp_path, [TO_K, PROJ_IN, Q_PROJ], seed=31)
    if layout == "model":
        mods, mf = mods[:2], mf[:2]  # one component: the U-Net
        names = [peft_name(mod).removeprefix("unet.") for mod in mods]
        metadata = {"r": RANK, "lora_alpha": 8, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
                    "target_modules": ["to_k", "proj_in"], "use_dora": False}
        scales = [8 / 4, 8 / 4]
    else:
        names = [peft_name(mod) for mod in mods]
        metadata = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.use_rslora": False, "unet.alpha_pattern": {},
                    "text_encoder.r": RANK, "text_encoder.lora_alpha": 2, "text_encoder.use_rslora": False}
        scales = [8 / 4, 8 / 4, 2 / 4]
    assert all(not n.startswith("lora_") for n in names)
    lora_path = write_peft(kit, tmp_path / "peft.safetensors", mf, names, metadata)
    out = merged(kit, tmp_path, base_path, lora_path, 0.7)
    check(out, base, mf, scales, 0.7)


def test_rslora_divides_by_the_square_root_of_the_rank(host, kit, tmp_path):
    mods, mf, base_path, base = setup(kit, tmp_path, [TO_K, Q_PROJ], seed=32)
    names = [peft_name(mod) for mod in mods]
    metadata = {"unet.r": RANK, "unet.lora_alpha": 8, "unet.use_rslora": True,
                "text_encoder.r": RANK, "text_encoder.lora_alpha": 8, "text_encoder.use_rslora": False}
    lora_path = write_peft(kit, tmp_path / "rs.safetensors", mf, names, metadata)
    out = merged(kit, tmp_path, base_path, lora_path, 1.0)
    check(out, base, mf, [8 / math.sqrt(4), 8 / 4], 1.0)  # 4 with rsLoRA, 2 without


def test_alpha_pattern_overrides_one_module_only(host, kit, tmp_path):
    mods, mf, base_path, base = setup(kit, tmp_path, [TO_K, TO_V, PROJ_IN], seed=33)
    names = [peft_name(mod) for mod in mods]
    # diffusers anchors its patterns with "^" on the path inside the component
    metadata = {"unet.r": RANK, "unet.lora_alpha": 8,
                "unet.alpha_pattern": {"^down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": 1}}
    lora_path = write_peft(kit, tmp_path / "pattern.safetensors", mf, names, metadata)
    out = merged(kit, tmp_path, base_path, lora_path, 0.5)
    check(out, base, mf, [1 / 4, 8 / 4, 8 / 4], 0.5)


def test_alpha_pattern_matches_whole_dotted_suffixes_in_order():
    """PEFT's rule: a pattern matches the path or a suffix starting after a dot; first one wins."""
    config = ComponentConfig(8.0, False, (("o_k", 1.0), ("attn2.to_k", 2.0), ("to_k", 3.0), ("to_.", 5.0)))
    assert config.scale("down_blocks.0.attn2.to_k", 4) == 2.0 / 4
    assert config.scale("up_blocks.0.attn1.to_k", 4) == 3.0 / 4
    assert config.scale("mid_block.attn1.to_v", 2) == 5.0 / 2  # patterns are regular expressions
    assert config.scale("mid_block.proj_in", 2) == 8.0 / 2
    assert ComponentConfig(None).scale("x", 3) == 1.0  # no lora_alpha: alpha = r


def test_without_metadata_alpha_is_the_rank(host, kit, tmp_path):
    mods, mf, base_path, base = setup(kit, tmp_path, [TO_K, PROJ_IN], seed=34)
    names = [peft_name(mod) for mod in mods]
    lora_path = write_peft(kit, tmp_path / "plain.safetensors", mf, names, metadata=None)
    out = merged(kit, tmp_path, base_path, lora_path, 0.8)
    check(out, base, mf, [1.0, 1.0], 0.8)
    # metadata without a config for this component (here: only a text encoder) changes nothing
    lora_path = write_peft(kit, tmp_path / "other.safetensors", mf, names, {"text_encoder.lora_alpha": 64})
    out = merged(kit, tmp_path, base_path, lora_path, 0.8, name="out2.safetensors")
    check(out, base, mf, [1.0, 1.0], 0.8)


def test_kohya_alpha_tensors_and_peft_metadata_give_identical_bytes(host, kit, tmp_path):
    mods, mf, base_path, base = setup(kit, tmp_path, [TO_K, PROJ_IN, Q_PROJ], seed=35)
    gen = torch.Generator().manual_seed(36)
    magnitude = 1 + torch.randn(mods[0].shape[0], generator=gen) * 0.1  # DoRA on to_k: scale inside the norm
    kohya, peft = {}, {}
    for mod, (a, b) in mf:
        kohya |= {f"{mod.kohya_name}.lora_down.weight": a, f"{mod.kohya_name}.lora_up.weight": b,
                  f"{mod.kohya_name}.alpha": torch.tensor(8.0)}
        peft |= {f"{peft_name(mod)}.lora_A.weight": a, f"{peft_name(mod)}.lora_B.weight": b}
    kohya[f"{mods[0].kohya_name}.dora_scale"] = magnitude.reshape(-1, 1)
    peft[f"{peft_name(mods[0])}.lora_magnitude_vector"] = magnitude
    kit.write(tmp_path / "kohya.safetensors", kohya)
    config = {"lora_alpha": 8, "r": RANK, "use_dora": True}
    kit.write(tmp_path / "peft.safetensors", peft, metadata={
        "lora_adapter_metadata": json.dumps({f"{c}.{k}": v for c in ("unet", "text_encoder")
                                             for k, v in config.items()})})
    results = []
    for name in ("kohya", "peft"):
        recipe = mecha_core.apply_lora(mecha_core.model(str(base_path)),
                                       mecha_core.model(str(tmp_path / f"{name}.safetensors")), strength=0.6)
        results.append(kit.merge(recipe, tmp_path, name=f"out_{name}.safetensors"))
    assert results[0].keys() == results[1].keys()
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key]), key
    # and the plain modules are really at scale 8/4 (not the alpha = r default)
    check({k: v for k, v in results[1].items() if k != mods[0].key},
          {k: v for k, v in base.items() if k != mods[0].key},
          mf[1:], [2.0, 2.0], 0.6)


@pytest.mark.parametrize("raw,message", [
    ("{'r': 4, 'lora_alpha': 8}",
     r"PEFT/diffusers LoRA 'my style': __metadata__ entry 'lora_adapter_metadata' is not valid JSON"),
    ("[8]", r"'lora_adapter_metadata' must be a JSON object"),
    ('{"unet.lora_alpha": "eight"}', r"field 'unet.lora_alpha' must be a finite number, not 'eight'"),
    ('{"lora_alpha": 8, "alpha_pattern": {"to_k(": 2}}', r"pattern 'to_k\(', which is not a valid regular expression"),
])
def test_malformed_metadata_is_a_clear_error_and_writes_nothing(host, kit, tmp_path, raw, message):
    mods, mf, base_path, _ = setup(kit, tmp_path, [TO_K], seed=37)
    tensors = {f"{peft_name(mods[0])}.lora_A.weight": mf[0][1][0], f"{peft_name(mods[0])}.lora_B.weight": mf[0][1][1]}
    lora_path = tmp_path / "bad.safetensors"
    kit.write(lora_path, tensors, metadata={"lora_adapter_metadata": raw, "modelspec.title": "my style"})
    recipe = mecha_core.add_difference(mecha_core.model(str(base_path)), mecha_core.model(str(lora_path)))
    with pytest.raises(PlanError, match=message):
        mecha_core.merge(recipe, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    # merge_loras knows the path and names it
    with pytest.raises(PlanError) as err:
        mecha_lora.merge_loras([lora_path], tmp_path / "merged.safetensors")
    assert str(err.value).startswith(f"{lora_path}: ") and re.search(message.split(": ", 1)[-1], str(err.value))
    assert not (tmp_path / "merged.safetensors").exists()


def test_merge_loras_keeps_the_metadata_scale(host, kit, tmp_path):
    mods, mf, _, _ = setup(kit, tmp_path, [TO_K, PROJ_IN], seed=38)
    names = [peft_name(mod) for mod in mods]
    lora_path = write_peft(kit, tmp_path / "peft.safetensors", mf, names,
                           {"unet.lora_alpha": 8, "unet.r": RANK, "unet.use_rslora": True})
    out_path = mecha_lora.merge_loras([lora_path], tmp_path / "merged.safetensors", weights=[0.5])
    written = load_file(out_path)
    for mod, (a, b) in mf:
        down, up = written[f"{mod.kohya_name}.lora_down.weight"], written[f"{mod.kohya_name}.lora_up.weight"]
        r = down.shape[0]
        got = float(written[f"{mod.kohya_name}.alpha"]) / r * product(down, up, mod.shape)
        torch.testing.assert_close(got, 0.5 * (8 / math.sqrt(4)) * product(a, b, mod.shape), rtol=1e-5, atol=1e-7)
