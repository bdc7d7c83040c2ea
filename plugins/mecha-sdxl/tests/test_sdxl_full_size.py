"""Full-size SDXL: a block-wise merge of a real-layout fp16 checkpoint with a scaled copy of itself
loads in diffusers offline (fp16) with the expected values.

One 5.2 GB input keeps disk and memory moderate: weighted_sum(a, scale(a, 0.5), alpha) = a(1 - alpha/2),
exact in float32 for the alphas used, so the expected fp16 values are exact too.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import mecha_core
import mecha_methods.plugin
import mecha_sdxl.plugin
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sdxl import layout

pytestmark = pytest.mark.slow

CONFIGS = Path(__file__).parent / "data" / "diffusers-configs" / "sdxl"
FLAGS = ("v_pred", "ztsnr", "edm_vpred.sigma_min", "edm_vpred.sigma_max")
ALPHAS = {"BASE": 0.25, "M00": 1.0, "VAE": 0.0}
DEFAULT = 0.5


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sdxl-full")
    arch = layout.architecture()
    # what a released SDXL file holds: every key but the scheduler buffers and prediction flags
    keys = [k for k, s in arch.keys.items() if s.component != "scheduler" and k not in FLAGS]
    a = synthetic.write_layout(folder / "a.safetensors", synthetic.key_table(arch, keys, "float16"), seed=5)
    with using(mecha_methods.plugin, mecha_sdxl.plugin):
        model = mecha_core.model(a)
        alpha = mecha_core.blocks("sdxl-sgm", default=DEFAULT, **ALPHAS)
        recipe = mecha_core.weighted_sum(model, mecha_core.scale(model, alpha=0.5), alpha=alpha)
        out = mecha_core.merge(recipe, folder / "merged.safetensors")
    yield {"a": a, "out": out, "keys": keys}
    for p in folder.iterdir():
        p.unlink()


def test_merged_sdxl_loads_in_diffusers_in_fp16(merged, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        merged["out"], config=str(CONFIGS), local_files_only=True, tokenizer=None, tokenizer_2=None,
        torch_dtype=torch.float16)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    te2 = dict(pipe.text_encoder_2.named_parameters())
    layer = next(n for n in te2 if n.endswith("encoder.layers.4.self_attn.k_proj.weight"))
    g = "conditioner.embedders.1.model."
    checks = [  # (sgm key, how diffusers holds it, the key's alpha)
        ("model.diffusion_model.input_blocks.4.1.proj_in.weight",
         pipe.unet.down_blocks[1].attentions[0].proj_in.weight, DEFAULT, lambda t: t),
        ("model.diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_v.weight",
         pipe.unet.mid_block.attentions[0].transformer_blocks[3].attn2.to_v.weight, 1.0, lambda t: t),
        ("first_stage_model.decoder.mid.attn_1.q.weight",
         pipe.vae.decoder.mid_block.attentions[0].to_q.weight, 0.0, lambda t: t.reshape(512, 512)),
        (g + "transformer.resblocks.4.attn.in_proj_weight", te2[layer], 0.25, lambda t: t[1280:2560]),
        (g + "text_projection", pipe.text_encoder_2.text_projection.weight, 0.25, lambda t: t.t()),
    ]
    with safe_open(merged["a"], "pt") as fa, safe_open(merged["out"], "pt") as fo:
        for key, loaded, alpha, to_diffusers in checks:
            a = fa.get_tensor(key)
            expected = (a.float() * (1 - alpha / 2)).half()
            assert torch.equal(fo.get_tensor(key), expected), key
            assert loaded.dtype == torch.float16, key
            assert torch.equal(loaded.detach(), to_diffusers(expected)), key
