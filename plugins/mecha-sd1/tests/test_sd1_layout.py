"""The sd1-ldm architecture: keys, components, blocks (checked against the MBW rules and the block
map), classes, aliases; detection of real-layout files from their header alone."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch

import mecha_sd1.plugin
from mecha_core.errors import PlanError
from mecha_core.testing import detect_architecture, open_model
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sd1 import diffusers_layout, layout

DATA = Path(__file__).parent / "data"


def _json(name: str):
    with gzip.open(DATA / name) as f:
        return json.load(f)


def mbw_block(key: str) -> str:
    """The supermerger/MBW rules, written out independently of the plugin's data."""
    if not key.startswith("model.diffusion_model.") or ".time_embed" in key:
        return "BASE"
    if ".out." in key:
        return "OUT11"
    for pattern, name in ((r"\.input_blocks\.(\d+)\.", "IN"), (r"\.output_blocks\.(\d+)\.", "OUT")):
        m = re.search(pattern, key)
        if m:
            return f"{name}{int(m.group(1)):02d}"
    return "M00" if ".middle_block." in key else "OUT11"


@pytest.fixture(scope="module")
def arch():
    return layout.architecture()


def test_counts_components_and_optional_keys(arch):
    assert len(arch.keys) == 1831 and len(arch.required_keys) == 1130
    by_comp = {}
    for spec in arch.keys.values():
        by_comp[spec.component] = by_comp.get(spec.component, 0) + 1
    assert by_comp == {"clip_l": 197, "vae": 248, "diffuser": 686, "ema": 688, "scheduler": 12}
    optional = {k for k, s in arch.keys.items() if s.optional}
    assert "cond_stage_model.transformer.text_model.embeddings.position_ids" in optional
    assert all(k.startswith("model_ema.") or arch.keys[k].component in ("scheduler", "clip_l") for k in optional)
    assert arch.keys["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape == (320, 320, 1, 1)


def test_blocks_follow_the_mbw_rules_and_the_block_map(arch):
    block_map = _json("sd1-ldm-blocks.json.gz")
    assert arch.blocks == tuple(block_map["blocks"])
    assert len(arch.blocks) == 26 and arch.blocks[0] == "BASE" and arch.blocks[-1] == "OUT11"
    for key, spec in arch.keys.items():
        assert spec.blocks == (mbw_block(key),) == (block_map["key_to_block"][key],), key
    counts = {}
    for key in arch.required_keys:
        counts[arch.keys[key].blocks[0]] = counts.get(arch.keys[key].blocks[0], 0) + 1
    assert counts == {b: s["keys"] for b, s in block_map["block_stats_required_keys"].items()}


@pytest.mark.parametrize("key, klass", [
    ("cond_stage_model.transformer.text_model.encoder.layers.3.mlp.fc1.weight", "mlp_fc1"),
    ("cond_stage_model.transformer.text_model.encoder.layers.11.layer_norm1.bias", "layer_norm1"),
    ("cond_stage_model.transformer.text_model.final_layer_norm.weight", "final_layer_norm"),
    ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "self_attn_q_proj"),
    ("model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight", "attn1_to_k"),
    ("model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.bias", "attn2_to_out_0"),
    ("model.diffusion_model.middle_block.1.proj_in.weight", "proj_in"),
    ("model.diffusion_model.output_blocks.4.0.in_layers.2.bias", "in_layers_2"),
    ("model.diffusion_model.input_blocks.0.0.weight", "conv_in"),
    ("model.diffusion_model.input_blocks.3.0.op.weight", "op"),
    ("model.diffusion_model.time_embed.2.weight", "time_embed_2"),
    ("model.diffusion_model.out.0.weight", "out_0"),
    ("first_stage_model.decoder.up.1.block.0.conv1.weight", "conv1"),
    ("first_stage_model.encoder.mid.attn_1.q.weight", "attn_1_q"),
    ("first_stage_model.encoder.down.2.downsample.conv.bias", "downsample_conv"),
    ("model_ema.diffusion_modelinput_blocks00bias", None),
    ("alphas_cumprod", None),
])
def test_classes_name_the_layer_type(arch, key, klass):
    assert arch.keys[key].klass == klass


def test_every_class_is_listed_and_used(arch):
    used = {s.klass for s in arch.keys.values() if s.klass}
    assert set(arch.classes) == used
    # the 16 transformer attentions of SD1 each hold one attn1_to_k
    assert sum(s.klass == "attn1_to_k" for s in arch.keys.values()) == 16
    assert sum(s.klass == "mlp_fc1" for s in arch.keys.values()) == 24  # 12 layers x weight, bias


def test_names_for_old_recipes(arch):
    with using(mecha_sd1.plugin) as host:
        assert host.architecture("sd1") is host.architecture("sd1-ldm")
    assert arch.component_aliases["txt"] == "clip_l" and arch.component_aliases["unet"] == "diffuser"
    assert set(arch.component_aliases.values()) <= set(arch.components)


def test_old_clip_spellings_are_detected_and_renamed(tmp_path, arch):
    old = "cond_stage_model.transformer.embeddings.token_embedding.weight"
    new = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    assert old in arch.keys[new].aliases
    tables = synthetic.key_table(arch, dtype="float16")
    tables = {(old if k == new else k): v for k, v in tables.items()}
    path = synthetic.write_header_only(tmp_path / "old.safetensors", tables)
    with using(mecha_sd1.plugin) as host:
        source = open_model(str(path), host)
        try:
            assert source.arch == "sd1-ldm"
            assert new in source.keys and old not in source.keys
        finally:
            source.close()


@pytest.mark.parametrize("with_optional", [False, True])
def test_real_layout_headers_are_detected(tmp_path, arch, with_optional):
    keys = arch.keys if with_optional else None  # all 1831 (EMA, scheduler) or the 1130 required
    path = synthetic.write_header_only(tmp_path / "sd1.safetensors", synthetic.key_table(arch, keys, "float32"))
    with using(mecha_sd1.plugin) as host:
        found = detect_architecture(path, frozenset(json_keys(path)), host)
    assert found is not None and found.name == "sd1-ldm"


def json_keys(path) -> list[str]:
    """The key names of a safetensors header, read here without mecha's reader."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return [k for k in json.loads(f.read(n)) if k != "__metadata__"]


def test_a_unet_only_file_is_not_sd1(tmp_path, arch):
    unet = [k for k, s in arch.keys.items() if s.component == "diffuser"]
    path = synthetic.write_header_only(tmp_path / "unet.safetensors", synthetic.key_table(arch, unet))
    with using(mecha_sd1.plugin) as host:
        assert detect_architecture(path, frozenset(json_keys(path)), host) is None


def test_both_layouts_in_one_file_is_ambiguous(tmp_path, arch):
    both = synthetic.key_table(arch, dtype="float16")
    diff = diffusers_layout.architecture()
    both.update(synthetic.key_table(diff, dtype="float16"))
    path = synthetic.write_header_only(tmp_path / "both.safetensors", both)
    with using(mecha_sd1.plugin) as host:
        with pytest.raises(PlanError, match=r"ambiguous \(candidates: .*sd1-diffusers.*\)") as err:
            detect_architecture(str(path), frozenset(both), host)
    assert "sd1-ldm" in str(err.value) and "both.safetensors" in str(err.value)


def test_real_values_round_trip_through_the_synthetic_writer(tmp_path, arch):
    keys = ["model.diffusion_model.out.2.bias", "cond_stage_model.transformer.text_model.embeddings.position_ids"]
    path = synthetic.write_layout(tmp_path / "small.safetensors", synthetic.key_table(arch, keys, "float16"), seed=3)
    from safetensors.torch import load_file

    loaded = load_file(path)
    assert loaded[keys[0]].dtype == torch.float16 and loaded[keys[0]].shape == (4,)
    assert torch.equal(loaded[keys[1]], torch.arange(77).reshape(1, 77))
    assert torch.equal(loaded[keys[0]], synthetic.layout_values(0, (4,), "float16", seed=3))
