"""Peak private memory of TIES (density 0.2, base + 3) on one large key, against the memory budget.

    python bench/bench_ties_memory.py [--elements 33554432] [--budget 268435456] [--work DIR]

Writes four float16 models of one key (``--elements``), then merges them in this process while
a thread samples RssAnon + RssShmem (/proc/self/status) every 5 ms; prints the growth over the
start against the budget. Before whole-key statistics were computed over slices, TIES held the
key whole in float32 several times over (base, deltas, trimmed deltas, sign, counts).
"""

from __future__ import annotations

import argparse
import gc
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--elements", type=int, default=32 << 20)
    parser.add_argument("--budget", type=int, default=256 << 20)
    parser.add_argument("--work", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    args = parser.parse_args()
    import torch

    import mecha_core
    from mecha_core.testing import PeakPrivateMemory, write_checkpoint

    os.makedirs(args.work, exist_ok=True)
    paths = [os.path.join(args.work, f"ties_key{i}.safetensors") for i in range(4)]
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(args.elements, generator=gen).to(torch.float16)
    for i, path in enumerate(paths):
        t = base if i == 0 else base + (0.1 * torch.randn(args.elements, generator=gen)).to(torch.float16)
        write_checkpoint(path, {"w": t.reshape(-1, 1024)})
        del t
    del base
    gc.collect()
    began = time.perf_counter()
    with PeakPrivateMemory() as memory:
        nodes = [mecha_core.model(p) for p in paths]
        mecha_core.merge(mecha_core.ties(*nodes, density=0.2), os.path.join(args.work, "ties_out.safetensors"),
                         memory_budget=args.budget)
    print(f"TIES base+3, {args.elements:,} elements: {time.perf_counter() - began:.1f} s, peak private "
          f"{memory.peak / 1e6:.0f} MB ({(memory.peak - memory.start) / 1e6:.0f} MB over the start), "
          f"budget {args.budget / 1e6:.0f} MB")


if __name__ == "__main__":
    main()
