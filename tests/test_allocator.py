"""Freed slice memory is kept for the next unit while a merge runs: fewer page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from mecha_core.testing import write_checkpoint

#: a weighted sum in a fresh process (glibc's own settings), warm page cache; prints the minor
#: page faults of the second merge alone; argv[1] == "released" turns the reuse off
SCRIPT = """
import json, resource, sys
import mecha_core, mecha_methods.plugin
from mecha_core.engine import allocator
from mecha_core.testing import using
if sys.argv[1] == "released":
    allocator._glibc = lambda: None
    # glibc's initial thresholds, fixed: left adaptive, they rise with the run's history (the warm
    # merge below) and the released mode then keeps some memory too, by chance (a 2x swing)
    import ctypes
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
with using(mecha_methods.plugin):
    a, b = (mecha_core.model(p) for p in sys.argv[3:5])
    for path in sys.argv[3:5]:
        open(path, "rb").read()
    # a first merge imports and caches what any merge needs: those faults are not the allocator's
    warm = sys.argv[2].replace(".safetensors", "-warm.safetensors")
    mecha_core.merge(mecha_core.weighted_sum(a, b, alpha=0.3), warm, threads=2)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mecha_core.merge(mecha_core.weighted_sum(a, b, alpha=0.3), sys.argv[2], threads=2)
    print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def test_reusing_freed_memory_saves_most_page_faults(tmp_path):
    gen = torch.Generator().manual_seed(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"m{i}.safetensors"
        write_checkpoint(path, {f"k{j}": torch.randn(1024, 1024, generator=gen).half() for j in range(24)})
        paths.append(str(path))
    # a process's fault count still varies from run to run (thread timing, the page cache): the
    # median of three runs of each mode, interleaved, is compared
    faults: dict[str, list[int]] = {"kept": [], "released": []}
    for _ in range(3):
        for mode in faults:
            out = subprocess.run([sys.executable, "-c", SCRIPT, mode, str(tmp_path / f"{mode}.safetensors"), *paths],
                                 capture_output=True, text=True, check=True)
            faults[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert (tmp_path / "kept.safetensors").read_bytes() == (tmp_path / "released.safetensors").read_bytes()
    kept, released = (sorted(counts)[1] for counts in faults.values())
    assert kept < 0.6 * released, faults
