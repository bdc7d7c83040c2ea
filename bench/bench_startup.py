"""How long the ``mecha`` command takes to start, against a bare ``python -c pass``; and the fixed
cost of a merge: everything a ``mecha merge`` run does besides merging.

Each command runs ``--runs`` times in a fresh process (the first run of each is discarded: it
warms the file cache); the first table shows the median and the fastest wall time, and whether the
command imported torch (from ``-X importtime``).

The second table (``--merges``, on by default) times merges of tiny models in real layouts, whose
merging costs nothing, so what remains is the fixed cost: interpreter and torch start-up, plugin
loading, planning, and the exit. A full-size SD1 layout (1130 keys of 4 elements, written by
``mecha_core.kit.synthetic``) through ``mecha merge`` and through the Python API, and three
Llama-shaped folders (``bench_llm.py --shape tiny``) through ``mecha merge``. It reports the median
wall time and the median CPU time of the child (user + system: on a shared machine, compare
this), next to ``python -c 'import torch'``; the load average is printed with the table.
``--python OTHER`` times the same merges with another interpreter (another checkout's venv: the
before of a change) in the same run, alternating the two, so both see the same load.

    python bench/bench_startup.py                          # --runs 7
    python bench/bench_startup.py --only-merges --python /tmp/base/.venv/bin/python
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "mecha --help": [sys.executable, "-m", "mecha_core", "--help"],
    "mecha --version": [sys.executable, "-m", "mecha_core", "--version"],
    "mecha plugins list": [sys.executable, "-m", "mecha_core", "plugins", "list"],
    "mecha methods": [sys.executable, "-m", "mecha_core", "methods"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}

#: the Python API, as bench_merge.py and bench_llm.py drive it
API_MERGE = """
import sys, mecha_core as m
out, paths = sys.argv[1], sys.argv[2:]
m.merge(m.weighted_sum(m.model(paths[0]), m.model(paths[1]), alpha=0.5), out)
"""

#: every process runs with Python's bytecode cache, as installed packages do (see bench_merge.py)
CHILD_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def imports_torch(command: list[str]) -> bool:
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    return any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())


def timed(command: list[str], cwd: str | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, env=CHILD_ENV, cwd=cwd)
    return time.perf_counter() - start


def timed_with_cpu(command: list[str], cwd: str) -> tuple[float, float]:
    """Wall time and the child's CPU time (user + system), run in ``cwd``: ``python -m`` and
    ``python -c`` put the working folder first on the module path, so run from a checkout they
    would import its mecha_core whatever the interpreter."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = timed(command, cwd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def build_inputs(work: str) -> dict[str, str]:
    """Tiny models in real layouts (built once into ``work``); returns the recipe files."""
    sys.path.insert(0, HERE)
    import bench_llm
    from mecha_sd1 import layout

    from mecha_core.kit.synthetic import key_table, write_layout

    sd1 = [os.path.join(work, f"sd1_{i}.safetensors") for i in range(2)]
    if not all(os.path.exists(p) for p in sd1):
        table = {k: ((4,) if shape else shape, dtype)
                 for k, (shape, dtype) in key_table(layout.architecture(), dtype="float16").items()}
        for i, path in enumerate(sd1):
            write_layout(path, table, seed=i)
    llm = [bench_llm.build_model(os.path.join(work, f"llm_{i}"), "tiny", 1000 + i) for i in range(3)]
    recipes = {"sd1": os.path.join(work, "sd1.mecha"), "llm": os.path.join(work, "llm.mecha")}
    with open(recipes["sd1"], "w") as f:
        f.write(f'mecha 1\na = model("{sd1[0]}")\nb = model("{sd1[1]}")\nweighted_sum(a, b, alpha=0.5)\n')
    with open(recipes["llm"], "w") as f:
        f.write("mecha 1\n" + "".join(f'm{i} = model("{p}")\n' for i, p in enumerate(llm))
                + "n_average(m0, m1, m2)\n")
    return {**recipes, "sd1_0": sd1[0], "sd1_1": sd1[1]}


def merge_commands(python: str, work: str, inputs: dict[str, str], tag: str) -> dict[str, list[str]]:
    out = os.path.join(work, f"out_{tag}")
    return {
        "`mecha merge`, SD1 layout (1130 keys)": [python, "-m", "mecha_core", "merge", inputs["sd1"],
                                                   "-o", out + ".safetensors", "-q"],
        "Python API merge, SD1 layout": [python, "-c", API_MERGE, out + "_api.safetensors",
                                         inputs["sd1_0"], inputs["sd1_1"]],
        "`mecha merge`, 3 Llama folders to a folder": [python, "-m", "mecha_core", "merge", inputs["llm"],
                                                        "-o", out + "_llm/", "-q"],
        "`python -c 'import torch'`": [python, "-c", "import torch"],
    }


def clear_outputs(work: str) -> None:
    import shutil

    for name in os.listdir(work):
        if name.startswith("out_"):
            path = os.path.join(work, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def bench_merges(runs: int, work: str, other: str | None) -> None:
    inputs = build_inputs(work)
    pythons = {"this": sys.executable, **({"other": other} if other else {})}
    commands = {tag: merge_commands(p, work, inputs, tag) for tag, p in pythons.items()}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    loads = []
    for attempt in range(runs + 1):
        for name in commands["this"]:
            for tag in pythons:  # alternating, so that both see the same load
                clear_outputs(work)
                measured = timed_with_cpu(commands[tag][name], work)
                if attempt:  # the first round warms the file cache
                    results.setdefault((name, tag), []).append(measured)
        loads.append(os.getloadavg()[0])
    clear_outputs(work)
    print(f"\nload average during the runs: {min(loads):.1f}-{max(loads):.1f}\n")
    print("| fixed cost of | interpreter | median wall (s) | median CPU (s) | fastest CPU (s) |")
    print("|---|---|---:|---:|---:|")
    for (name, tag), values in results.items():
        label = "this" if tag == "this" else f"`{pythons[tag]}`"
        cpu = [c for _, c in values]
        print(f"| {name} | {label} | {statistics.median(w for w, _ in values):.2f} | "
              f"{statistics.median(cpu):.2f} | {min(cpu):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-merges", dest="merges", action="store_false", help="only the start-up table")
    parser.add_argument("--only-merges", action="store_true", help="only the fixed cost of merges")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "mecha-bench-startup"),
                        help="where the tiny models are built (once) and the merges written")
    parser.add_argument("--python", help="also time the merges with this interpreter (another checkout)")
    args = parser.parse_args()
    if not args.only_merges:
        print("| command | median (s) | fastest (s) | imports torch |")
        print("|---|---:|---:|---|")
        for name, command in COMMANDS.items():
            timed(command)  # warm-up
            times = [timed(command) for _ in range(args.runs)]
            print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} | "
                  f"{'yes' if imports_torch(command) else 'no'} |", flush=True)
    if args.merges or args.only_merges:
        os.makedirs(args.work, exist_ok=True)
        bench_merges(args.runs, args.work, args.python)


if __name__ == "__main__":
    main()
