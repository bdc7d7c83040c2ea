"""A diffusers pipeline folder (model_index.json, unet/ text_encoder/ vae/) is one SD1 model: read
through the sd1-diffusers layout and its converter, it merges like the same weights in one file.

The pipelines are SD1-shaped (the module tree of the published SD 1.5 configs, so every key name
is SD1's) with narrow widths, built by diffusers and transformers with random weights."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import mecha_core as mecha
import mecha_methods.plugin
import mecha_sd1.plugin
from mecha_core.testing import open_model, using
from mecha_sd1 import diffusers_layout

CONFIGS = Path(__file__).parents[1] / "plugins" / "mecha-sd1" / "tests" / "data" / "diffusers-configs" / "sd15"


def _pipeline(folder: Path, seed: int, unet_shards: bool) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet_config = dict(UNet2DConditionModel.load_config(CONFIGS / "unet"),
                       block_out_channels=[8, 8, 16, 16], norm_num_groups=4, cross_attention_dim=12,
                       attention_head_dim=2)
    unet = UNet2DConditionModel.from_config(unet_config)
    vae = AutoencoderKL.from_config(dict(AutoencoderKL.load_config(CONFIGS / "vae"),
                                         block_out_channels=[8, 8, 16, 16], norm_num_groups=4))
    # SD 1.5's text encoder has 12 layers; the widths are narrowed
    text = CLIPTextModel(CLIPTextConfig(num_hidden_layers=12, hidden_size=12, intermediate_size=24,
                                        num_attention_heads=2, projection_dim=12, vocab_size=50,
                                        max_position_embeddings=16))
    folder.mkdir()
    unet.save_pretrained(folder / "unet", max_shard_size="60KB" if unet_shards else "10GB")
    vae.save_pretrained(folder / "vae")
    text.save_pretrained(folder / "text_encoder")
    shutil.copy(CONFIGS / "model_index.json", folder / "model_index.json")
    return folder


def _flat(folder: Path) -> dict[str, torch.Tensor]:
    """The pipeline's weights under unet./text_encoder./vae., read with safetensors itself."""
    out = {}
    for component in ("unet", "text_encoder", "vae"):
        for name in sorted(os.listdir(folder / component)):
            if name.endswith(".safetensors"):
                out.update({f"{component}.{k}": v for k, v in load_file(folder / component / name).items()})
    return out


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return _pipeline(root / "p0", 0, unet_shards=True), _pipeline(root / "p1", 1, unet_shards=False)


def test_pipeline_folder_is_sd1_read_as_ldm(pipelines):
    p0, _ = pipelines
    assert any(n.endswith(".index.json") for n in os.listdir(p0 / "unet"))  # the sharded case is covered
    with using(mecha_sd1.plugin) as host:
        source = open_model(p0, host)
        try:
            assert source.arch == "sd1-ldm" and source.path == str(p0)
            flat = _flat(p0)
            assert len(source.keys) == len(flat)
            for ldm_key in source.keys:
                name = diffusers_layout.diffusers_name(ldm_key)
                if name not in flat:  # transformers 5 saves CLIP without the text_model. level
                    name = name.replace("text_encoder.text_model.", "text_encoder.")
                expected = flat[name]
                got = source.read(ldm_key)
                assert torch.equal(got.reshape(expected.shape), expected), ldm_key
        finally:
            source.close()


def test_pipeline_folders_merge_like_their_weights_in_one_file(pipelines, tmp_path):
    p0, p1 = pipelines
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        out = mecha.merge(mecha.weighted_sum(mecha.model(str(p0)), mecha.model(str(p1)), alpha=0.4),
                          tmp_path / "merged.safetensors", threads=2)
        got = load_file(out)
        f0, f1 = _flat(p0), _flat(p1)
        for ldm_key, value in got.items():
            name = diffusers_layout.diffusers_name(ldm_key)
            name = name if name in f0 else name.replace("text_encoder.text_model.", "text_encoder.")
            ref = 0.6 * f0[name] + 0.4 * f1[name]
            assert torch.allclose(value.reshape(ref.shape), ref, atol=1e-6), ldm_key
        assert len(got) == len(f0)
        # the same weights as single diffusers-named files merge to the same bytes
        save_file(f0, tmp_path / "p0.safetensors")
        save_file(f1, tmp_path / "p1.safetensors")
        single = mecha.merge(mecha.weighted_sum(mecha.model(str(tmp_path / "p0.safetensors")),
                                                mecha.model(str(tmp_path / "p1.safetensors")), alpha=0.4),
                             tmp_path / "single.safetensors", threads=2)
        from_single = load_file(single)
        assert from_single.keys() == got.keys()
        assert all(torch.equal(from_single[k], got[k]) for k in got)


def test_a_pipeline_component_without_weights_is_named(pipelines, tmp_path):
    p0, _ = pipelines
    broken = tmp_path / "broken"
    shutil.copytree(p0, broken)
    for name in os.listdir(broken / "vae"):
        if name.endswith(".safetensors"):
            os.remove(broken / "vae" / name)
    with using(mecha_sd1.plugin) as host:
        with pytest.raises(mecha.errors.PlanError) as info:
            open_model(broken, host)
    text = str(info.value)
    assert "\n" not in text and str(broken / "vae") in text and "holds no diffusion_pytorch_model.safetensors" in text


def test_inspect_shows_the_pipeline_as_sd1(pipelines):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    p0, _ = pipelines
    with using(mecha_sd1.plugin):
        result = CliRunner().invoke(app, ["inspect", str(p0), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["architecture"] == "sd1-diffusers" and data["converts_to"] == "sd1-ldm"
    files = [s["file"] for s in data["shards"]]
    assert "text_encoder/model.safetensors" in files and "vae/diffusion_pytorch_model.safetensors" in files
    assert sum(s["keys"] for s in data["shards"]) == len(_flat(p0)) == data["keys"]


def _header_only_pipeline(folder: Path, arch, components: tuple[str, ...]) -> int:
    """A pipeline folder of full-size component files whose data areas are holes (no disk used),
    keys split by the layout's own prefixes; returns the number of keys written."""
    from mecha_core.kit.synthetic import write_header_only

    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({c: ["x", "y"] for c in components}))
    written = 0
    for component in components:
        prefix = component + "."
        table = {k[len(prefix):]: (spec.shape, "float16") for k, spec in arch.keys.items()
                 if k.startswith(prefix) and not k.endswith("position_ids")}
        (folder / component).mkdir()
        name = "model.safetensors" if component.startswith("text") else "diffusion_pytorch_model.safetensors"
        write_header_only(folder / component / name, table)
        written += len(table)
    return written


def test_full_size_sdxl_and_sd1_pipelines_are_detected(tmp_path):
    import mecha_sdxl.plugin
    from mecha_sdxl import conversions

    with using(mecha_sd1.plugin, mecha_sdxl.plugin) as host:
        # SDXL's CLIP-G stores q, k, v (weight and bias) apart in diffusers and packed in sgm: 4 keys
        # fewer per layer, 32 layers
        cases = ((tmp_path / "sdxl", conversions.diffusers_architecture(),
                  ("unet", "text_encoder", "text_encoder_2", "vae"), "sdxl-sgm", 4 * 32),
                 (tmp_path / "sd1", diffusers_layout.architecture(), ("unet", "text_encoder", "vae"), "sd1-ldm", 0))
        for folder, arch, components, expected, packed in cases:
            n = _header_only_pipeline(folder, arch, components)
            source = open_model(folder, host)
            try:
                assert source.arch == expected, folder
                assert n > 1000 and len(source.keys) == n - packed
                assert set(source.keys) <= set(host.architecture(expected).keys)
            finally:
                source.close()
