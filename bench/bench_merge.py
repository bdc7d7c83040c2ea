"""Benchmark: mecha vs a naive load-everything script (and sd-mecha when installed).

Builds full-size SD1 checkpoints (the real key layout of ../shared/data/architectures/sd1-ldm.json,
required keys only, random fp16, ~2.1 GB each) once into a work folder, then times each merge in
a fresh process and samples its private memory (RssAnon + RssShmem from /proc/PID/status; file
pages mapped from the page cache are not counted, the kernel can drop them). Each run is preceded
by a read of its inputs, so the page cache is warm for every contender alike. Prints a table.

    python bench/bench_merge.py [--work DIR] [--models 8] [--repeat 1] [--only ws2,avg4]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYOUT_CANDIDATES = [
    os.path.join(ROOT, "..", "shared", "data", "architectures", "sd1-ldm.json"),
]


def layout() -> dict:
    for path in LAYOUT_CANDIDATES:
        if os.path.exists(path):
            with open(path) as f:
                data = json.load(f)
            return {k: v for k, v in data["keys"].items() if not v.get("optional")}
    sys.exit("sd1-ldm.json not found (expected ../shared/data/architectures beside the checkout)")


def build_models(work: str, count: int) -> list[str]:
    import torch
    from mecha_core.engine.safetensors_io import save

    keys = layout()
    paths = []
    for i in range(count):
        path = os.path.join(work, f"sd1_{i}.safetensors")
        paths.append(path)
        if os.path.exists(path):
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for key, spec in keys.items():
            shape = spec["shape"]
            if spec["dtype"].startswith("int") or spec["dtype"] == "int64":
                tensors[key] = torch.arange(shape[-1] if shape else 1).reshape(shape)
            else:
                tensors[key] = (torch.randn(shape, generator=gen) * 0.05).to(torch.float16)
        save(tensors, path + ".part")
        os.replace(path + ".part", path)
        del tensors
        print(f"built {path}", file=sys.stderr)
    return paths


MECHA = """
import sys, mecha_core as m
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
models = [m.model(p) for p in paths]
if kind == "ws":
    r = m.weighted_sum(models[0], models[1], alpha=0.5)
elif kind == "avg":
    r = m.n_average(*models)
elif kind == "addiff":
    r = m.add_difference(models[0], models[1], models[2], alpha=1.0)
m.merge(r, out)
"""

NAIVE = """
import sys, torch
from safetensors.torch import load_file, save_file
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
sds = [load_file(p) for p in paths]
result = {}
for k, first in sds[0].items():
    if not first.is_floating_point():
        result[k] = first
        continue
    xs = [sd[k].float() for sd in sds]
    if kind == "ws":
        v = xs[0] * 0.5 + xs[1] * 0.5
    elif kind == "avg":
        v = sum(xs[1:], xs[0].clone()) / len(xs)
    else:
        v = xs[0] + (xs[1] - xs[2]) * 1.0
    result[k] = v.to(first.dtype)
save_file(result, out)
"""

SDMECHA = """
import sys, sd_mecha as s
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
models = [s.model(p) for p in paths]
if kind == "ws":
    r = s.weighted_sum(models[0], models[1], alpha=0.5)
elif kind == "avg":
    r = s.n_average(*models)
else:
    r = s.add_difference(models[0], models[1], models[2], alpha=1.0)
s.merge(r, output=out)
"""


def private_kb(pid: int) -> int:
    total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:")):
                    total += int(line.split()[1])
    except OSError:
        return 0
    return total


def run(script: str, kind: str, out: str, paths: list[str]) -> tuple[float, float]:
    for p in paths:  # warm the page cache for every contender alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    if os.path.exists(out):
        os.unlink(out)
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", script, kind, out, *paths],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, private_kb(proc.pid))
            time.sleep(0.01)

    t = threading.Thread(target=sample)
    t.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    t.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return wall, peak / 1024 / 1024


CASES = {
    "ws2": ("weighted sum of 2", "ws", 2),
    "avg2": ("n-average of 2", "avg", 2),
    "avg4": ("n-average of 4", "avg", 4),
    "avg8": ("n-average of 8", "avg", 8),
    "addiff3": ("add-difference of 3", "addiff", 3),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(HERE, "out"))
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--contenders", default="mecha,naive,sd-mecha")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cases = [c for c in args.only.split(",") if c]
    n_models = max(CASES[c][2] for c in cases)
    paths = build_models(args.work, n_models)
    contenders = {"mecha": MECHA, "naive": NAIVE, "sd-mecha": SDMECHA}
    wanted = [c for c in args.contenders.split(",") if c in contenders]
    if "sd-mecha" in wanted:
        try:
            import sd_mecha  # noqa: F401
        except ImportError:
            wanted.remove("sd-mecha")
    rows = []
    for case in cases:
        title, kind, n = CASES[case]
        for who in wanted:
            out = os.path.join(args.work, f"out_{who}_{case}.safetensors")
            try:
                wall, peak = run(contenders[who], kind, out, paths[:n])
                rows.append((title, who, f"{wall:.1f}", f"{peak * 1024:.0f}"))
            except RuntimeError as exc:
                rows.append((title, who, "failed", textwrap.shorten(str(exc), 60)))
            if os.path.exists(out):
                os.unlink(out)
            print(f"{title:<22} {who:<9} {rows[-1][2]:>8} s {rows[-1][3]:>8} MB", file=sys.stderr)
    print("| merge | tool | wall time (s) | peak private memory (MB) |")
    print("|---|---|---:|---:|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |")


if __name__ == "__main__":
    main()
