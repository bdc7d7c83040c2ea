"""Benchmark: weighted sum of two full-size Flux.1-dev transformers in diffusers naming, in
bounded private memory.

Writes two random bf16 ``FluxTransformer2DModel``-shaped files (the ``flux-dev-diffusers`` layout
of mecha-flux, ~23.8 GB each) into a work folder, then runs ``mecha merge`` on
``weighted_sum(a, b, alpha=0.5)`` in a fresh process, sampling its private memory (RssAnon +
RssShmem from /proc/PID/status) and time. The diffusers files are converted to the canonical
(ComfyUI) layout as they are read: q/k/v fused into ``qkv`` and ``linear1``, the final
modulation's halves swapped; each fused key is computed whole, so the peak is about one fused
tensor (a single block's ``linear1`` in float32: 264 MB) per worker thread, plus the budget.

Needs ~72 GB of free disk (two inputs and the output). ``--check`` only builds the key tables and
prints the sizes (no disk, seconds).

    python bench/bench_flux.py [--work DIR] [--threads 2] [--memory-budget 1G] [--check]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

from mecha_core.testing import private_bytes


def _tables():
    from mecha_flux import diffusers_layout, layout

    return diffusers_layout.diffusers_architecture(layout.dev(), "flux-dev-diffusers")


def build(work: str) -> list[str]:
    import torch

    from mecha_core.kit import save

    arch = _tables()
    paths = []
    for seed in (1, 2):
        path = os.path.join(work, f"flux-dev-diffusers-{seed}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        gen = torch.Generator().manual_seed(seed)
        # every key is a view of one random bf16 pool (the largest key, a single block's linear1,
        # has 66M elements): the writer streams the views, so building a file holds 128 MB, not 24 GB
        pool = (torch.randn(1 << 26, generator=gen) * 0.02).to(torch.bfloat16)
        tensors = {}
        for key, spec in arch.keys.items():
            n = 1
            for d in spec.shape:
                n *= d
            tensors[key] = pool[:n].reshape(spec.shape)
        save(tensors, path)
        del tensors
    return paths


def private_peak(pid: int, stop: threading.Event, out: list[int]) -> None:
    peak = 0
    while not stop.is_set():
        try:
            peak = max(peak, private_bytes(pid))
        except OSError:
            break
        time.sleep(0.05)
    out.append(peak)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=os.path.join(os.getcwd(), "bench-flux-work"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-budget", default="1G")
    parser.add_argument("--check", action="store_true", help="print the layout sizes only")
    args = parser.parse_args()
    arch = _tables()
    total = 0
    for spec in arch.keys.values():
        n = 1
        for d in spec.shape:
            n *= d
        total += n
    print(f"flux-dev-diffusers: {len(arch.keys)} keys, {total:,} parameters, {2 * total / 1e9:.1f} GB in bf16")
    if args.check:
        return 0
    os.makedirs(args.work, exist_ok=True)
    a, b = build(args.work)
    out = os.path.join(args.work, "merged.safetensors")
    recipe = f'weighted_sum(model("{a}"), model("{b}"), alpha=0.5)'
    recipe_path = os.path.join(args.work, "ws.mecha")
    with open(recipe_path, "w") as f:
        f.write(recipe + "\n")
    command = [sys.executable, "-m", "mecha_core", "merge", recipe_path, "-o", out, "--threads", str(args.threads),
               "--memory-budget", args.memory_budget, "--quiet"]
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=private_peak, args=(proc.pid, stop, peak))
    sampler.start()
    code = proc.wait()
    stop.set()
    sampler.join()
    print(f"exit {code}, {time.perf_counter() - start:.0f} s, private peak {peak[0] / 2**20:.0f} MiB")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
