"""Peak private memory of every merge method on one large key, or on real models, against the
memory budget.

    python bench/bench_methods_memory.py [--rows 32768] [--cols 1024] [--budget 268435456]
                                         [--only ties,rotate] [--work DIR] [--timeout 900]
    python bench/bench_methods_memory.py --models sd1 [--only docs] [--timeout 600]
    python bench/bench_methods_memory.py --models llm [--only docs] [--timeout 600]

``--models sd1``: the four full-size SD1 fp16 checkpoints /tmp/benchsd/sd1_0..3.safetensors;
``--models llm``: the three Llama-shaped bf16 folders /tmp/llmbench/small_0..2 (d is small_1
again); or ``--models A,B,C[,D]`` any files. With models the budget defaults to mecha's default
(1 GiB) and every option is the default; ``--only docs`` runs the methods of docs/methods.md.
Besides the growth over the process's start, the parent samples the child's whole private
memory (interpreter and torch included) every 10 ms, so a method cut off by ``--timeout``
still reports the peak it reached (a lower bound then).

Writes four float16 models of one key (``--rows`` × ``--cols``, 32M elements by default: 64 MiB
each, 128 MiB in float32) and a small one, then merges each method's recipe in a fresh process
while a thread of that process samples RssAnon + RssShmem (/proc/self/status) every 5 ms, and
prints, per method: how the engine runs it (element-wise slices; statistics passes over slices
then element-wise slices; row-wise slices; one whole-tensor call with a declared working set;
one whole-tensor call), the growth of private memory over the process's start, and whether it
stays within the budget + 300 MB (issue 15's target). A 32M-element key under a 256 MiB budget
is a 128M-element key (an LLM's embedding) under the default 1 GiB, scaled down four times.
``apply_lora`` (needs a LoRA file) and ``pick_component``/``omit_component`` (need an
architecture) are element-wise and not run here: weighted_sum stands for them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MARGIN = 300_000_000
DEFAULT_BUDGET = 1 << 30  # MergeOptions.memory_budget's default

#: --models shorthands: the inputs a, b, c, d and the component pick/omit_component name
MODEL_SETS = {
    "sd1": ([f"/tmp/benchsd/sd1_{i}.safetensors" for i in range(4)], "unet"),
    "llm": ([f"/tmp/llmbench/small_{i}" for i in (0, 1, 2, 1)], "text"),
}

#: the methods of docs/methods.md (mecha-methods), in its order
DOCS = ["weighted_sum", "n_average", "add_difference", "subtract", "add", "scale", "fallback", "slerp",
        "multislerp", "karcher", "task_arithmetic", "model_stock", "geometric_median", "ties", "dare_linear",
        "dare_ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "add_cosine_a", "add_cosine_b",
        "train_difference", "add_perpendicular", "crossover", "rotate", "clamp", "pick_component",
        "omit_component", "cast"]

MK = json.dumps({"global": {"weight": 1.0, "density": 0.5, "t": 0.5, "gamma": 0.01, "epsilon": 0.1,
                            "select_topk": 0.5}})

#: method -> recipe expression over the models a (the base), b, c, d; D(x) is x's delta from a
CASES = {
    "weighted_sum": "m.weighted_sum(a, b)",
    "n_average": "m.n_average(a, b, c, d)",
    "add_difference": "m.add_difference(a, b, c)",
    "subtract": "m.add(a, m.subtract(b, c))",
    "add": "m.add(a, D(b))",
    "scale": "m.add(a, m.scale(D(b)))",
    "fallback": "m.fallback(a, b)",
    "cast": "m.cast(a)",
    "pick_component": "m.pick_component(a, b, component=COMPONENT)",
    "omit_component": "m.omit_component(a, b, component=COMPONENT)",
    "clamp": "m.clamp(a, b, c)",
    "task_arithmetic": "m.task_arithmetic(a, b, c, d)",
    "train_difference": "m.train_difference(a, b, c)",
    "slerp": "m.slerp(a, b)",
    "multislerp": "m.multislerp(b, c, d)",
    "karcher": "m.karcher(b, c, d)",
    "geometric_median": "m.geometric_median(a, b, c, d)",
    "model_stock": "m.model_stock(a, b, c, d)",
    "ties": "m.ties(a, b, c, d, density=0.2)",
    "dare_linear": "m.dare_linear(a, b, c, d)",
    "dare_ties": "m.dare_ties(a, b, c, d)",
    "della": "m.della(a, b, c, d)",
    "della_linear": "m.della_linear(a, b, c, d)",
    "breadcrumbs": "m.breadcrumbs(a, b, c, d)",
    "breadcrumbs_ties": "m.breadcrumbs_ties(a, b, c, d)",
    "add_cosine_a": "m.add_cosine_a(a, b)",
    "add_cosine_b": "m.add_cosine_b(a, b)",
    "add_perpendicular": "m.add_perpendicular(a, b, c)",
    "crossover": "m.crossover(a, b)",
    "rotate": "m.rotate(a, b)",
    **{f"mergekit_{n}": f"m.mergekit_{n}(a, b, c, d, settings=MK)"
       for n in ("task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
                 "della", "della_linear", "model_stock", "sce")},
    "mergekit_linear": "m.mergekit_linear(a, b, c, settings=MK)",
    "mergekit_slerp": "m.mergekit_slerp(a, b, settings=MK)",
    "mergekit_nuslerp": "m.mergekit_nuslerp(b, c, a, settings=MK)",
    "mergekit_nearswap": "m.mergekit_nearswap(a, b, settings=MK)",
    "mergekit_passthrough": "m.mergekit_passthrough(a, settings=MK)",
    "mergekit_multislerp": "m.mergekit_multislerp(b, c, d, settings=MK)",
    "mergekit_karcher": "m.mergekit_karcher(b, c, d, settings=MK)",
    "mergekit_arcee_fusion": "m.mergekit_arcee_fusion(a, b, settings=MK)",
    "sdmecha_train_difference_mask":
        "m.sdmecha_add_difference_masked(a, D(b), m.sdmecha_train_difference_mask(a, b, c))",
    "sdmecha_add_opposite_mask": "m.sdmecha_add_difference_masked(a, D(b), m.sdmecha_add_opposite_mask(a, b, c))",
    "sdmecha_add_strict_opposite_mask":
        "m.sdmecha_add_difference_masked(a, D(b), m.sdmecha_add_strict_opposite_mask(a, b, c))",
    "sdmecha_perpendicular_component": "m.add(a, m.sdmecha_perpendicular_component(D(b), D(c)))",
    "sdmecha_geometric_sum": "m.sdmecha_geometric_sum(a, b)",
    "sdmecha_multiply_quotient": "m.sdmecha_multiply_quotient(a, b, c)",
    "sdmecha_scale": "m.add(a, m.sdmecha_scale(D(b)))",
    "sdmecha_model_stock": "m.add(a, m.sdmecha_model_stock(D(b), D(c), D(d)))",
    "sdmecha_ties_sum_extended": "m.add(a, m.sdmecha_ties_sum_extended(D(b), D(c), D(d)))",
    "sdmecha_ties_sum_with_dropout": "m.add(a, m.sdmecha_ties_sum_with_dropout(D(b), D(c), D(d), seed=1))",
    "sdmecha_dropout": "m.add(a, m.sdmecha_dropout(D(b), D(c), D(d)))",
    "sdmecha_crossover": "m.sdmecha_crossover(a, b)",
    "sdmecha_tensor_sum": "m.sdmecha_tensor_sum(a, b)",
    "sdmecha_top_k_tensor_sum": "m.sdmecha_top_k_tensor_sum(a, b)",
    "sdmecha_rotate": "m.sdmecha_rotate(a, b)",
}



def how(method) -> str:
    """How the engine runs a method's large keys."""
    if method.statistics is not None and method.elementwise:
        return "statistics passes + element-wise"
    if method.statistics is not None and method.rowwise:
        return "statistics passes + row-wise slices"
    if method.elementwise:
        return "element-wise"
    if method.rowwise:
        return "statistics passes + row-wise slices" if method.statistics is not None else "row-wise slices"
    if method.working_set is not None:
        return "whole key, declared working set"
    return "whole key"


def build(work: str, rows: int, cols: int) -> list[str]:
    import torch

    from mecha_core.testing import write_checkpoint

    paths = [os.path.join(work, f"mm_{rows}x{cols}_{i}.safetensors") for i in range(4)]
    if all(os.path.exists(p) for p in paths):
        return paths
    gen = torch.Generator().manual_seed(0)
    base = (0.05 * torch.randn(rows, cols, generator=gen)).to(torch.float16)
    for i, path in enumerate(paths):
        w = base if i == 0 else base + (0.01 * torch.randn(rows, cols, generator=gen)).to(torch.float16)
        write_checkpoint(path, {"w": w, "small": (torch.randn(64, 64, generator=gen) * 0.05).to(torch.float16)})
        del w
    return paths


def one(name: str, paths: list[str], budget: int, out: str, component: str = "") -> None:
    """Merge one method's recipe in this process and print its peak private memory as JSON."""
    import gc

    import mecha_core as m
    from mecha_core.testing import PeakPrivateMemory

    gc.collect()
    began = time.perf_counter()
    with PeakPrivateMemory() as memory:
        a, b, c, d = (m.model(p) for p in paths)

        def D(x):  # noqa: N802 (reads like the docstring's D(x))
            return m.subtract(x, a)

        names = {"m": m, "a": a, "b": b, "c": c, "d": d, "D": D, "MK": MK, "COMPONENT": component}
        recipe = eval(CASES[name], names)
        m.merge(recipe, out, memory_budget=budget)
    method = m.plugins.get_host().method(name)
    print(json.dumps({"peak": memory.peak - memory.start, "seconds": time.perf_counter() - began, "how": how(method)}))


def _run_child(argv: list[str], timeout: int) -> tuple[int | None, str, str, int]:
    """Run a child, sampling its private memory every 10 ms: (return code or None when it timed
    out, stdout, stderr, its peak private memory)."""
    import tempfile

    from mecha_core.testing import private_bytes

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        peak, began = 0, time.monotonic()
        while proc.poll() is None:
            try:
                peak = max(peak, private_bytes(proc.pid))
            except (OSError, ValueError):
                pass
            if time.monotonic() - began > timeout:
                proc.kill()
                proc.wait()
                out.seek(0), err.seek(0)
                return None, out.read(), err.read(), peak
            time.sleep(0.01)
        out.seek(0), err.seek(0)
        return proc.returncode, out.read(), err.read(), peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--cols", type=int, default=1024)
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--models", default=None, help="sd1, llm, or A,B,C[,D]: real models instead of one key")
    parser.add_argument("--component", default=None, help="for pick/omit_component (sd1: unet, llm: text)")
    parser.add_argument("--only", default=",".join(CASES), help="methods, comma-separated; 'docs': docs/methods.md's")
    parser.add_argument("--work", default=os.path.join(HERE, "out"))
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    component = args.component or ""
    if args.models:
        paths, default_component = MODEL_SETS.get(args.models, (args.models.split(","), ""))
        paths = paths + paths[1:2] * (4 - len(paths))  # three models: d is b again
        component = component or default_component
        budget = DEFAULT_BUDGET if args.budget is None else args.budget
        what = f"models {', '.join(paths)}; memory budget {budget / 1e6:.0f} MB"
    else:
        paths = build(args.work, args.rows, args.cols)
        budget = (256 << 20) if args.budget is None else args.budget
        what = (f"one key of {args.rows}x{args.cols} float16 ({args.rows * args.cols:,} elements), memory budget "
                f"{budget / 1e6:.0f} MB")
    out = os.path.join(args.work, "mm_out.safetensors")
    if args.one:
        one(args.one, paths, budget, out, component)
        return
    limit = budget + MARGIN
    names = DOCS if args.only == "docs" else [n for n in args.only.split(",") if n]
    print(f"{what}; target: peak private memory over the start <= {limit / 1e6:.0f} MB")
    print(f"load average at the start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print("| method | how it runs | peak over start (MB) | within budget + 300 MB | process peak (MB) | wall (s) "
          "| load |")
    print("|---|---|---:|---|---:|---:|---|")
    for name in names:
        argv = [sys.executable, os.path.abspath(__file__), "--one", name, "--work", args.work, "--rows", str(args.rows),
                "--cols", str(args.cols), "--budget", str(budget), "--component", component]
        if args.models:
            argv += ["--models", ",".join(paths)]
        code, stdout, stderr, process_peak = _run_child(argv, args.timeout)
        load = f"{os.getloadavg()[0]:.1f}"
        if code is None:
            print(f"| {name} | | | timed out after {args.timeout} s | ≥ {process_peak / 1e6:.0f} | | {load} |",
                  flush=True)
        elif code != 0:
            why = (stderr.strip().splitlines() or ["?"])[-1][:150]
            print(f"| {name} | | | failed: {why} | {process_peak / 1e6:.0f} | | {load} |", flush=True)
        else:
            r = json.loads(stdout.strip().splitlines()[-1])
            ok = "yes" if r["peak"] <= limit else "NO"
            print(f"| {name} | {r['how']} | {r['peak'] / 1e6:.0f} | {ok} | {process_peak / 1e6:.0f} | "
                  f"{r['seconds']:.1f} | {load} |", flush=True)
        if os.path.exists(out):
            os.unlink(out)


if __name__ == "__main__":
    main()
