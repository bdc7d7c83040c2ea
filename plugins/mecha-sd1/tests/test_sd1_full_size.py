"""Full-size SD1: a block-wise weighted sum of two real-layout fp16 checkpoints applies each
block's alpha to exactly that block's keys (every key checked against the MBW block map), and the
merged file loads in diffusers offline with the expected values.

The two inputs and the merge are built once for the module (~2 GB each, a few seconds to write).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mecha_core
import mecha_methods.plugin
import mecha_sd1.plugin
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sd1 import layout

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"
CONFIGS = DATA / "diffusers-configs" / "sd15"
DEFAULT = 0.9
LEFT_OUT = "OUT05"  # takes the default


def block_alphas() -> dict[str, float]:
    with gzip.open(DATA / "sd1-ldm-blocks.json.gz") as f:
        names = json.load(f)["blocks"]
    # distinct values, far enough apart that a key given its neighbour's alpha fails the check
    return {name: round(i / 25, 4) for i, name in enumerate(names) if name != LEFT_OUT}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd1-full")
    table = synthetic.key_table(layout.architecture(), dtype="float16")  # the 1130 required keys
    a = synthetic.write_layout(folder / "a.safetensors", table, seed=1)
    b = synthetic.write_layout(folder / "b.safetensors", table, seed=2)
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        alpha = mecha_core.blocks("sd1-ldm", default=DEFAULT, **block_alphas())
        recipe = mecha_core.weighted_sum(mecha_core.model(a), mecha_core.model(b), alpha=alpha)
        out = mecha_core.merge(recipe, folder / "merged.safetensors")
    yield {"a": a, "b": b, "out": out, "table": table}
    for p in folder.iterdir():
        p.unlink()


def test_each_block_gets_its_alpha(merged):
    with gzip.open(DATA / "sd1-ldm-blocks.json.gz") as f:
        key_to_block = json.load(f)["key_to_block"]
    alphas = block_alphas()
    seen_blocks = set()
    with safe_open(merged["a"], "pt") as fa, safe_open(merged["b"], "pt") as fb, \
            safe_open(merged["out"], "pt") as fo:
        assert set(fo.keys()) == set(merged["table"])
        for key in fo.keys():
            block = key_to_block[key]
            alpha = alphas.get(block, DEFAULT)
            seen_blocks.add(block)
            # one alpha per key: the leading rows (up to ~8k values) identify it; reading only
            # them keeps the check of 3 x 2 GB quick
            rows = _leading_rows(merged["table"][key][0])
            expected = fa.get_slice(key)[:rows].float() * (1 - alpha) + fb.get_slice(key)[:rows].float() * alpha
            got = fo.get_slice(key)[:rows]
            assert got.dtype == torch.float16, key
            torch.testing.assert_close(got.float(), expected.half().float(), rtol=2e-3, atol=1e-5,
                                       msg=lambda m, key=key, block=block: f"{key} ({block}): {m}")
    assert len(seen_blocks) == 26 and LEFT_OUT in seen_blocks


def _leading_rows(shape: tuple[int, ...]) -> int:
    per_row = 1
    for d in shape[1:]:
        per_row *= d
    return max(1, min(shape[0], 8192 // per_row))


def test_merged_checkpoint_loads_in_diffusers_offline(merged, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_single_file(
        merged["out"], config=str(CONFIGS), local_files_only=True, tokenizer=None, safety_checker=None,
        feature_extractor=None, torch_dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    checks = {
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": pipe.unet.down_blocks[0].attentions[0].proj_in.weight,
        "model.diffusion_model.output_blocks.8.1.transformer_blocks.0.attn2.to_k.weight":
            pipe.unet.up_blocks[2].attentions[2].transformer_blocks[0].attn2.to_k.weight,
        "cond_stage_model.transformer.text_model.encoder.layers.7.mlp.fc1.weight": next(
            p for n, p in pipe.text_encoder.named_parameters() if n.endswith("encoder.layers.7.mlp.fc1.weight")),
        "first_stage_model.decoder.mid.attn_1.q.weight": pipe.vae.decoder.mid_block.attentions[0].to_q.weight,
    }
    with gzip.open(DATA / "sd1-ldm-blocks.json.gz") as f:
        key_to_block = json.load(f)["key_to_block"]
    with safe_open(merged["a"], "pt") as fa, safe_open(merged["b"], "pt") as fb:
        for key, loaded in checks.items():
            alpha = block_alphas().get(key_to_block[key], DEFAULT)
            expected = (fa.get_tensor(key).float() * (1 - alpha) + fb.get_tensor(key).float() * alpha).half()
            assert loaded.dtype == torch.float16
            torch.testing.assert_close(loaded.detach().float(), expected.reshape(loaded.shape).float(),
                                       rtol=2e-3, atol=1e-5)
