"""Block-wise and class-wise hyperparameters over sd1-ldm, written inline in a .mecha recipe:
each key takes its block's value, else its class's, else the default (expected values worked out
here from the key names, not from the plugin's tables)."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
import mecha_sd1.plugin
from mecha_core.errors import MechaError
from mecha_core.kit import synthetic
from mecha_core.testing import using
from mecha_sd1 import layout


def small_sd1_keys() -> list[str]:
    """Every 1-D key of the text encoder and U-Net (biases and norms: all blocks, many classes)."""
    arch = layout.architecture()
    return [k for k, s in arch.keys.items()
            if not s.optional and len(s.shape) == 1 and s.component in ("clip_l", "diffuser")]


def expected_alpha(key: str) -> float:
    m = re.search(r"\.input_blocks\.(\d+)\.", key)
    if m and int(m.group(1)) == 4:
        return 0.75  # the block map wins over classes: blocks(...) is on the left of |
    if re.search(r"\.proj_in\.(weight|bias)$", key):
        return 1.0
    if re.search(r"\.layers\.\d+\.mlp\.fc1\.(weight|bias)$", key):
        return 0.4
    return 0.2


@pytest.fixture
def inputs(tmp_path):
    table = synthetic.key_table(layout.architecture(), small_sd1_keys(), "float32")
    synthetic.write_layout(tmp_path / "a.safetensors", table, seed=11)
    synthetic.write_layout(tmp_path / "b.safetensors", table, seed=12)
    return tmp_path


def test_blocks_then_classes_then_default_in_a_mecha_file(inputs):
    recipe = inputs / "mix.mecha"
    recipe.write_text(
        "mecha 1\n"
        'a = model("a.safetensors")\n'
        'b = model("b.safetensors")\n'
        'weighted_sum(a, b, alpha=blocks("sd1", IN04=0.75)'
        ' | classes("sd1-ldm", default=0.2, proj_in=1.0, mlp_fc1=0.4))\n')
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        mecha_core.merge(str(recipe), inputs / "out.safetensors")
    a, b, merged = (load_file(inputs / n) for n in ("a.safetensors", "b.safetensors", "out.safetensors"))
    assert set(merged) == set(small_sd1_keys())
    seen = set()
    for key in merged:
        alpha = expected_alpha(key)
        seen.add(alpha)
        torch.testing.assert_close(merged[key], a[key] * (1 - alpha) + b[key] * alpha, rtol=1e-6, atol=1e-7,
                                   msg=lambda m, key=key: f"{key}: {m}")
    assert seen == {0.75, 1.0, 0.4, 0.2}


def test_an_unknown_block_is_an_error_naming_it(inputs):
    with using(mecha_methods.plugin, mecha_sd1.plugin):
        recipe = mecha_core.weighted_sum(mecha_core.model(str(inputs / "a.safetensors")),
                                         mecha_core.model(str(inputs / "b.safetensors")),
                                         alpha=mecha_core.blocks("sd1-ldm", IN12=0.5))
        with pytest.raises(MechaError, match="IN12"):
            mecha_core.merge(recipe, inputs / "never.safetensors")
    assert not (inputs / "never.safetensors").exists()
