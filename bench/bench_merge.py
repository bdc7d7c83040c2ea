"""Benchmark: mecha vs a naive load-everything script (and sd-mecha when installed).

Builds full-size SD1 checkpoints (the real key layout of ../shared/data/architectures/sd1-ldm.json,
required keys only, random fp16, ~2.1 GB each) once into a work folder, then times each merge in
a fresh process and samples its private memory (RssAnon + RssShmem from /proc/PID/status; file
pages mapped from the page cache are not counted, the kernel can drop them). Each run is preceded
by a read of its inputs, so the page cache is warm for every contender alike. Prints a table.

    python bench/bench_merge.py [--work DIR] [--only ws2,ties4] [--sdmecha-python PY] [--repeat N]

Beside every row the machine's floor for that merge, measured in the same run just before it:
starting Python and importing torch, reading every input from the page cache, and writing the
output's bytes to the page cache with ``dd``. sd-mecha runs with ``--sdmecha-python`` (a venv
where sd-mecha 1.1.8 is installed) or, without it, when the bench's own Python can import it.
``mecha`` is the ``mecha merge`` command on a .mecha recipe, as users run it; ``mecha-api`` the
same merge through the Python API (``mecha_core.merge``) in a program of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LAYOUT_CANDIDATES = [
    os.path.join(ROOT, "..", "shared", "data", "architectures", "sd1-ldm.json"),
    os.path.join(ROOT, "shared", "data", "architectures", "sd1-ldm.json"),
    os.path.join(ROOT, "..", "..", "shared", "data", "architectures", "sd1-ldm.json"),  # a worktree in wt/NAME
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


#: mecha as its users run it: the ``mecha merge`` command on a .mecha recipe (in this process,
#: as the console script does)
MECHA = """
import sys, json
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
names = [f"m{i}" for i in range(len(paths))]
lines = ["mecha 1"] + [f"{n} = model({json.dumps(p)})" for n, p in zip(names, paths)]
lines.append({"ws": "weighted_sum(m0, m1, alpha=0.5)", "avg": f"n_average({', '.join(names)})",
              "addiff": "add_difference(m0, m1, m2, alpha=1.0)",
              "ties": f"ties({', '.join(names)}, density=0.2)"}[kind])
recipe = out + ".mecha"
with open(recipe, "w") as f:
    f.write("\\n".join(lines) + "\\n")
from mecha_core.__main__ import main
sys.argv = ["mecha", "merge", recipe, "-o", out]
sys.exit(main())
"""

#: the same merges through the Python API, in a program that imports mecha
MECHA_API = """
import sys, mecha_core as m
kind, out, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
models = [m.model(p) for p in paths]
if kind == "ws":
    r = m.weighted_sum(models[0], models[1], alpha=0.5)
elif kind == "avg":
    r = m.n_average(*models)
elif kind == "addiff":
    r = m.add_difference(models[0], models[1], models[2], alpha=1.0)
elif kind == "ties":
    r = m.ties(*models, density=0.2)
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
    elif kind == "ties":
        deltas = []
        for x in xs[1:]:
            d = (x - xs[0]).reshape(-1)
            kept = torch.zeros_like(d)
            idx = torch.topk(d.abs(), int(0.2 * d.numel()), sorted=False).indices
            kept[idx] = d[idx]
            deltas.append(kept)
        sign = torch.sign(sum(deltas))
        agree = [(torch.sign(d) == sign) & (d != 0) for d in deltas]
        total = sum(torch.where(a, d, 0) for a, d in zip(agree, deltas))
        v = xs[0] + (total / sum(a.float() for a in agree).clamp(min=1)).reshape(xs[0].shape)
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
elif kind == "ties":  # 1.1.8's add_difference_ties wrapper fails ('NoneType' has no 'identifier'): its parts
    L, T = s.extensions.builtin.merge_methods.linear, s.extensions.builtin.merge_methods.ties
    r = L.add_difference(models[0], T.ties_sum(*[L.subtract(m, models[0]) for m in models[1:]], k=0.2))
else:
    r = s.add_difference(models[0], models[1], models[2], alpha=1.0)
s.merge(r, output=out)
"""


#: every process runs with Python's bytecode cache, as installed packages do: with
#: PYTHONDONTWRITEBYTECODE set (some sandboxes set it), an editable install compiles its modules
#: from source on every start, which a pip-installed tool never does
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}

def private_kb(pid: int) -> int:
    """The process's RssAnon + RssShmem in kB (0 once it has exited)."""
    from mecha_core.testing import private_bytes

    try:
        return private_bytes(pid) // 1024
    except OSError:
        return 0


def settle() -> None:
    """Before each timed run: wait until the machine has handed the memory freed by the last
    run back to its host (a virtual machine's free page reporting runs on the guest's CPUs)."""
    from mecha_core.testing import settle_memory

    settle_memory()


def floor(paths: list[str], out_bytes: int, work: str) -> float:
    """Seconds the machine needs at least: start Python and import torch, read every input from
    the page cache, write the output's bytes to the page cache."""
    settle()
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch"], check=True, env=CHILD_ENV)
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    target = os.path.join(work, "floor.bin")
    block = 1 << 24
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", f"bs={block}", f"count={-(-out_bytes // block)}",
                    "status=none"], check=True)
    wall = time.perf_counter() - start
    os.unlink(target)
    return wall


def run(script: str, kind: str, out: str, paths: list[str], python: str = sys.executable) -> tuple[float, float]:
    for p in paths:  # warm the page cache for every contender alike
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    if os.path.exists(out):
        os.unlink(out)
    settle()
    start = time.perf_counter()
    proc = subprocess.Popen([python, "-W", "ignore", "-c", script, kind, out, *paths],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=CHILD_ENV)
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
    "ties4": ("TIES k=0.2, base + 3", "ties", 4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(HERE, "out"))
    parser.add_argument("--only", default=",".join(CASES))
    parser.add_argument("--contenders", default="mecha,naive,sd-mecha")
    parser.add_argument("--sdmecha-python", default=None, help="a Python where sd-mecha 1.1.8 is installed")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each row (floor and merge); the table gives the medians and the largest peak")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    cases = [c for c in args.only.split(",") if c]
    n_models = max(CASES[c][2] for c in cases)
    paths = build_models(args.work, n_models)
    contenders = {"mecha": MECHA, "mecha-api": MECHA_API, "naive": NAIVE, "sd-mecha": SDMECHA}
    wanted = [c for c in args.contenders.split(",") if c in contenders]
    if "sd-mecha" in wanted and args.sdmecha_python is None:
        try:
            import sd_mecha  # noqa: F401
        except ImportError:
            wanted.remove("sd-mecha")
    rows = []
    for case in cases:
        title, kind, n = CASES[case]
        for who in wanted:
            out = os.path.join(args.work, f"out_{who}_{case}.safetensors")
            python = args.sdmecha_python if who == "sd-mecha" and args.sdmecha_python else sys.executable
            walls, bases, peaks = [], [], []
            try:
                for _ in range(args.repeat):
                    bases.append(floor(paths[:n], os.path.getsize(paths[0]), args.work))
                    wall, peak = run(contenders[who], kind, out, paths[:n], python)
                    walls.append(wall)
                    peaks.append(peak)
                wall, base = statistics.median(walls), statistics.median(bases)
                peak = max(peaks) * 1024
                rows.append((title, who, f"{wall:.1f}", f"{wall / base:.2f}", f"{base:.1f}", f"{peak:.0f}"))
                if args.repeat > 1:
                    print(f"{title} | {who}: runs {', '.join(f'{w:.1f}' for w in walls)} s, floors "
                          f"{', '.join(f'{b:.1f}' for b in bases)} s", file=sys.stderr)
            except RuntimeError as exc:
                base = statistics.median(bases) if bases else float("nan")
                rows.append((title, who, "failed", "", f"{base:.1f}", textwrap.shorten(str(exc), 60)))
            for leftover in (out, out + ".mecha"):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            print(" | ".join(rows[-1]), file=sys.stderr)
    print("| merge | tool | wall time (s) | × floor | floor (s) | peak private memory (MB) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
