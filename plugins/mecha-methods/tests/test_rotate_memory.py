"""rotate's peak memory on a wide key (fewer rows than columns): it works from the rows, never a
d×d matrix, so its peak stays below what one d×d float64 matrix (the cross product aᵀb the
d×d way sums in its passes) would take alone, and within its declared working set."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from mecha_core.specs import TensorInfo
from mecha_core.testing import write_checkpoint

ROWS, COLUMNS = 128, 4096

# A fresh process with glibc's mmap threshold fixed at 128 KiB: every large temporary is its own
# mapping, made and unmapped as torch allocates and frees it, so the sampled peak sees each one.
# A small merge first, so that imports and first-call set-up are not counted; a weighted sum of
# the same key measures what the engine itself holds for it (reading, slices, writing).
MEASURE = """
import ctypes, json, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
import torch
import mecha_core, mecha_methods.plugin
from mecha_core.testing import PeakPrivateMemory, using

folder = sys.argv[1]


def merge(name, method):
    a, b = (mecha_core.model(f"{folder}/{name}_{x}.safetensors") for x in "ab")
    mecha_core.merge(getattr(mecha_core, method)(a, b), f"{folder}/{name}_out.safetensors", threads=1)


with using(mecha_methods.plugin):
    grown = {}
    for method in ("weighted_sum", "rotate"):
        merge("warm", method)
        with PeakPrivateMemory(0.001) as memory:
            merge("wide", method)
        grown[method] = memory.peak - memory.start
print(json.dumps(grown))
"""


def test_rotate_on_a_wide_key_holds_no_d_by_d_matrix(tmp_path):
    import mecha_methods.diffusion as diffusion

    gen = torch.Generator().manual_seed(0)
    for name, shape in (("warm", (8, 32)), ("wide", (ROWS, COLUMNS))):
        a = torch.randn(shape, generator=gen)
        write_checkpoint(tmp_path / f"{name}_a.safetensors", {"w": a})
        write_checkpoint(tmp_path / f"{name}_b.safetensors", {"w": a + 0.5 * torch.randn(shape, generator=gen)})
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grown = json.loads(proc.stdout.strip().splitlines()[-1])
    d_by_d = 8 * COLUMNS * COLUMNS  # one float64 d×d matrix: 134 MB
    declared = diffusion._rotate_working_set(TensorInfo((ROWS, COLUMNS), "float32"), 2, 4)
    print(f"grew {grown}; declared {declared / 1e6:.1f} MB; one d×d float64 {d_by_d / 1e6:.1f} MB")
    assert grown["rotate"] < d_by_d / 2, (grown, d_by_d)
    # the declared working set (the scheduler's view) covers what rotate holds beyond the
    # engine's own for the key, up to a few copies of the 2 MB key (the statistics' slices)
    key = ROWS * COLUMNS * 4
    assert grown["rotate"] - grown["weighted_sum"] <= declared + 4 * key, (grown, declared, key)
