"""How long the ``mecha`` command takes to start, against a bare ``python -c pass``.

Each command runs ``--runs`` times in a fresh process (the first run of each is discarded: it
warms the file cache); the table shows the median and the fastest wall time, and whether the
command imported torch (from ``-X importtime``).

    python bench/bench_startup.py            # --runs 7
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "mecha --help": [sys.executable, "-m", "mecha_core", "--help"],
    "mecha --version": [sys.executable, "-m", "mecha_core", "--version"],
    "mecha plugins list": [sys.executable, "-m", "mecha_core", "plugins", "list"],
    "mecha methods": [sys.executable, "-m", "mecha_core", "methods"],
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
}


def imports_torch(command: list[str]) -> bool:
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    return any(line.rstrip().endswith("| torch") for line in done.stderr.splitlines())


def timed(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    print("| command | median (s) | fastest (s) | imports torch |")
    print("|---|---:|---:|---|")
    for name, command in COMMANDS.items():
        timed(command)  # warm-up
        times = [timed(command) for _ in range(runs)]
        print(f"| `{name}` | {statistics.median(times):.3f} | {min(times):.3f} | "
              f"{'yes' if imports_torch(command) else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
