"""`mecha diff` of two full-size SD1 checkpoints (the 1130 required keys, fp16, ~2.1 GB each)
streams: private memory (RssAnon + RssShmem) grows by far less than one input, and the numbers of
a block match plain torch on the same tensors (recomputed from the synthetic layout)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import mecha_sd1.plugin
import pytest
import torch

from mecha_core.kit import synthetic
from mecha_core.testing import host_with

pytestmark = pytest.mark.slow

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch  # noqa: F401  (imported before the baseline, as a merge would)
    import mecha_core as m
    from mecha_core.testing import PeakPrivateMemory
    with PeakPrivateMemory() as memory:
        result = m.diff(sys.argv[1], sys.argv[2], threads=2)
    print(json.dumps({"baseline": memory.start, "peak": memory.peak, "result": result.as_json()}))
""")


def test_full_size_sd1_diff_streams_in_bounded_memory(tmp_path):
    arch = host_with(mecha_sd1.plugin).architecture("sd1-ldm")
    table = synthetic.key_table(arch, dtype="float16")
    a = synthetic.write_layout(tmp_path / "a.safetensors", table, seed=1)
    b = synthetic.write_layout(tmp_path / "b.safetensors", table, seed=2)
    input_bytes = sum(torch.empty(s, dtype=getattr(torch, d)).element_size() * torch.Size(s).numel()
                      for s, d in table.values())
    proc = subprocess.run([sys.executable, "-c", SCRIPT, a, b], capture_output=True, text=True, check=True)
    stats = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = stats["peak"] - stats["baseline"]
    print(f"private memory grew by {grown / 1e6:.0f} MB for two inputs of {input_bytes / 1e9:.1f} GB each")
    assert grown < input_bytes / 4, f"private memory grew by {grown / 1e6:.0f} MB"

    result = stats["result"]
    assert result["architecture"] == "sd1-ldm" and result["groups"] == list(arch.blocks)
    (pair,) = result["pairs"]
    float_keys = [k for k, (_, d) in table.items() if getattr(torch, d).is_floating_point]
    assert pair["total"]["keys"] == len(float_keys)
    assert pair["total"]["elements"] == sum(torch.Size(table[k][0]).numel() for k in float_keys)
    # one block recomputed from the layout's values: IN00 (the U-Net's first conv)
    keys = [k for k in float_keys if arch.keys[k].blocks == ("IN00",)]
    index = {k: i for i, k in enumerate(table)}
    x, y = (torch.cat([synthetic.layout_values(index[k], table[k][0], "float16", seed).double().reshape(-1)
                       for k in keys]) for seed in (1, 2))
    block = pair["groups"][result["groups"].index("IN00")]
    assert block["cosine"] == pytest.approx(torch.nn.functional.cosine_similarity(x, y, dim=0).item(), rel=1e-9)
    assert block["relative_l2"] == pytest.approx((torch.linalg.vector_norm(y - x) / torch.linalg.vector_norm(x)).item(),
                                                 rel=1e-9)
