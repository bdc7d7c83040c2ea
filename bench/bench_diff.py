"""Benchmark: `mecha diff` of two full-size SD1 checkpoints next to the weighted sum of the same
two (a diff reads the same bytes, so it should cost about the same).

Builds the checkpoints with mecha_core.kit.synthetic (the 1130 required keys of the sd1-ldm layout
of the mecha-sd1 plugin, fp16, ~2.1 GB each; reused when present), then runs each case in a fresh
process with a warm page cache and samples its private memory (RssAnon + RssShmem). Prints a table.

    python bench/bench_diff.py [--work DIR] [--repeat 1]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_merge import HERE, MECHA, run  # noqa: E402


def build_models(work: str, count: int) -> list[str]:
    import mecha_sd1.plugin
    from mecha_core.kit import synthetic
    from mecha_core.testing import host_with

    table = synthetic.key_table(host_with(mecha_sd1.plugin).architecture("sd1-ldm"), dtype="float16")
    paths = []
    for i in range(count):
        path = os.path.join(work, f"sd1_synthetic_{i}.safetensors")
        if not os.path.exists(path):
            synthetic.write_layout(path + ".part", table, seed=100 + i)
            os.replace(path + ".part", path)
            print(f"built {path}", file=sys.stderr)
        paths.append(path)
    return paths

DIFF = """
import sys, mecha_core as m
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
models = [m.model(p) for p in paths]
if kind == "diff":
    m.diff(*models)
elif kind == "diff-base":  # task vectors against the first model: more arithmetic per element
    m.diff(*models[1:], base=models[0])
elif kind == "diff-keys":
    m.diff(*models, keys=True)
"""

CASES = [
    ("weighted sum of 2 (writes 2.1 GB)", MECHA, "ws", 2),
    ("diff of 2, per block", DIFF, "diff", 2),
    ("diff of 2, per key", DIFF, "diff-keys", 2),
    ("diff of 2 with --base (3 read)", DIFF, "diff-base", 3),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(HERE, "out"))
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    paths = build_models(args.work, 3)
    out = os.path.join(args.work, "out_diff_bench.safetensors")
    rows = []
    for title, script, kind, n in CASES:
        best = None
        for _ in range(args.repeat):
            wall, peak = run(script, kind, out, paths[:n])
            best = (wall, peak) if best is None or wall < best[0] else best
        assert best is not None
        rows.append((title, f"{best[0]:.1f}", f"{best[1] * 1024:.0f}"))
        print(f"{title:<36} {rows[-1][1]:>6} s {rows[-1][2]:>6} MB", file=sys.stderr)
        if os.path.exists(out):
            os.unlink(out)
    print("| run | wall time (s) | peak private memory (MB) |")
    print("|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


if __name__ == "__main__":
    main()
