"""Benchmark: a TIES merge of full-size SD1 checkpoints on a local 2-node Ray cluster vs the local executor.

Builds three full-size SD1 checkpoints (bench_merge.py's: the real key layout, random fp16) into a
work folder, starts a Ray cluster of two nodes (one CPU each, loopback only, no dashboard), and
runs ``mecha merge`` with ``ties(base, a, b)`` once with ``--executor local`` and once with
``--executor ray --ray-address`` the cluster. Reports each run's wall time and the peak private
memory (RssAnon + RssShmem, sampled from /proc/PID/status) of the mecha process and of every Ray
worker process, checks that both outputs have the same bytes, and the issue's bound: Ray's wall
time at most 1.3x the local one (on two cores Ray can only add overhead).

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python bench/bench_ray.py [--work DIR] [--threads 2] [--layout sd1-ldm.json]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is imported: loopback only

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import bench_merge  # noqa: E402
from bench_merge import build_models, private_kb  # noqa: E402

RECIPE = """mecha 1
base = model("{0}")
a = model("{1}")
b = model("{2}")
ties(base, a, b, density=0.2)
"""


def ray_worker_pids() -> list[int]:
    """Processes running Ray tasks or actors (their command line starts with ``ray::``) or idle workers."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            continue
        if cmd.startswith(b"ray::") or b"default_worker.py" in cmd:
            pids.append(int(entry))
    return pids


def timed(command: list[str], watch_workers: bool) -> tuple[float, float, dict[int, float]]:
    """Wall seconds, the command's peak private GiB, and each Ray worker's peak private GiB."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    workers: dict[int, int] = {}
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, private_kb(proc.pid))
            if watch_workers:
                for pid in ray_worker_pids():
                    workers[pid] = max(workers.get(pid, 0), private_kb(pid))
            time.sleep(0.05)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(err.decode()[-2000:])
    return wall, peak / 2**20, {pid: kb / 2**20 for pid, kb in workers.items()}


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="/tmp/mecha-bench", help="where the checkpoints are built (3 x 2.1 GB)")
    parser.add_argument("--threads", type=int, default=2, help="the local executor's threads")
    parser.add_argument("--layout", help="sd1-ldm.json (default: bench_merge.py's search path)")
    args = parser.parse_args()
    if args.layout:
        bench_merge.LAYOUT_CANDIDATES.insert(0, args.layout)
    os.makedirs(args.work, exist_ok=True)
    paths = build_models(args.work, 3)
    recipe = os.path.join(args.work, "ties.mecha")
    with open(recipe, "w") as f:
        f.write(RECIPE.format(*paths))
    mecha = [sys.executable, "-m", "mecha_core", "merge", recipe, "-q"]

    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        local_out = os.path.join(args.work, "ties-local.safetensors")
        ray_out = os.path.join(args.work, "ties-ray.safetensors")
        local = timed([*mecha, "-o", local_out, "--threads", str(args.threads)], watch_workers=False)
        remote = timed([*mecha, "-o", ray_out, "--executor", "ray", "--ray-address", cluster.address],
                       watch_workers=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    same = digest(local_out) == digest(ray_out)
    print(f"{'executor':<8} {'wall s':>8} {'peak private GiB (mecha)':>26} {'per Ray worker GiB (max)':>26}")
    print(f"{'local':<8} {local[0]:>8.1f} {local[1]:>26.2f} {'-':>26}")
    print(f"{'ray':<8} {remote[0]:>8.1f} {remote[1]:>26.2f} {max(remote[2].values(), default=0):>26.2f}")
    bound = "met" if remote[0] <= 1.3 * local[0] else "NOT met"
    print(f"workers seen: {len(remote[2])}; identical bytes: {same}; "
          f"ray/local wall = {remote[0] / local[0]:.2f} (bound 1.3: {bound})")
    if not same:
        sys.exit("the outputs differ")


if __name__ == "__main__":
    main()
