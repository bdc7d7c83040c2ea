"""A whole-tensor method (TIES) on a large key stays within the memory budget: its statistics are
computed over slices, so peak private memory does not grow with the key."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

import mecha_core
from mecha_core.testing import private_bytes, using, write_checkpoint

N = 16 << 20  # elements of the one key: 64 MiB per model in float32, 32 MiB in float16
BUDGET = 64 << 20
MARGIN = 150 << 20


@pytest.mark.slow
def test_ties_on_a_large_key_stays_within_the_budget(tmp_path):
    import mecha_methods.plugin

    gen = torch.Generator().manual_seed(0)
    base = torch.randn(N, generator=gen).to(torch.float16)
    for i in range(4):
        t = base if i == 0 else base + (0.1 * torch.randn(N, generator=gen)).to(torch.float16)
        write_checkpoint(tmp_path / f"m{i}.safetensors", {"w": t.reshape(-1, 1024)})
        del t
    del base
    gc.collect()
    start = private_bytes()
    peak = [start]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], private_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with using(mecha_methods.plugin):
            nodes = [mecha_core.model(str(tmp_path / f"m{i}.safetensors")) for i in range(4)]
            mecha_core.merge(mecha_core.ties(*nodes, density=0.2), tmp_path / "out.safetensors",
                             memory_budget=BUDGET, threads=2)
    finally:
        done.set()
        sampler.join()
    # a whole-tensor TIES holds the base, three deltas and their trimmed copies in float32:
    # more than 500 MiB for this key
    assert peak[0] - start <= BUDGET + MARGIN, (peak[0] - start) / 2**20
