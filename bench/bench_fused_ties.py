"""How much a fused (compiled) TIES slice would buy over the eager torch the engine runs today.

    python bench/bench_fused_ties.py [--elements N] [--repeat R] [--threads T]

Not part of the merge: a measurement for issue 15's TIES target. For one slice of SD1-like
float16 weights (a base and three fine-tunes), it times the two passes the engine makes over
every slice of a TIES key:

- statistics: the inputs to float32, each delta's magnitude, its bit pattern's bin in the
  selection's window (``engine/statistics.py``); the ``index_add_`` count itself stays eager;
- merge: the inputs to float32, ``mecha_methods.sparse.ties`` with a threshold, the cast back.

each in eager torch (the library's own functions) and as one ``torch.compile`` function
(inductor's C++ backend, ``dynamic=True``), and checks that both give the same bits. It prints
the first call's time (the compile: minutes on a cold cache, seconds on a warm one), the median
time per slice, and the same with ``--threads`` threads calling at once. Needs a C++ compiler.
"""

from __future__ import annotations

import argparse
import statistics as stats_
import threading
import time

import torch

from mecha_core.engine import statistics
from mecha_core.method import MergeContext, Selection
from mecha_core.specs import TensorInfo


def _slice(n: int, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    base = (torch.randn(n, generator=gen) * 0.05).half()
    base[:64] = -0.0  # signed zeros: the bits the mean's "+ 0.0" is there for
    models = [(base.float() + torch.randn(n, generator=gen) * 0.01).half() for _ in range(3)]
    models[1][64:2048] = base[64:2048]  # zero deltas
    return base, models


def _selection(n: int, base: torch.Tensor, model: torch.Tensor) -> Selection:
    """The first delta's top 20% by magnitude (threshold from a sort), its ties split in the
    middle; the bench trims all three deltas with it (the fused function takes one threshold)."""
    mags = (model.float() - base.float()).abs()
    k = n // 5
    threshold = float(mags.sort(descending=True).values[k - 1])
    ties = torch.nonzero(mags == threshold).reshape(-1)
    return Selection(k, n, threshold, int(ties[len(ties) // 2]))


def _below(threshold: float) -> float:
    """The float32 just below a positive float32 (the trim's lambda up to the last tie kept)."""
    return float(torch.tensor([threshold]).view(torch.int32).sub(1).view(torch.float32))


def eager_merge(base, models, sel, ctx):
    """The engine's merge pass for the slice: inputs to float32 (as the evaluator converts
    them), the library's in-place TIES, the cast to the output dtype."""
    from mecha_methods.sparse import _ties_in_place

    b = base.float()
    return _ties_in_place(b, [m.float() for m in models], sel, ctx, "sum").add_(b).half()


def fused_merge(base, m0, m1, m2, lam_before, lam_after, cut):
    """TIES (vote "sum") of one slice as one expression: trim by hardshrink with the float32
    below the threshold up to the last tie kept (``cut`` elements) and the threshold after."""
    b = base.float()
    index = torch.arange(b.numel(), device=b.device)
    lam = torch.where(index < cut, lam_before, lam_after)
    trimmed = []
    for m in (m0, m1, m2):
        d = m.float() - b
        trimmed.append(torch.where(d.abs() > lam, d, torch.zeros_like(d)))
    votes = trimmed[0] + trimmed[1] + trimmed[2]
    sign = torch.sign(votes)
    agree = [torch.clamp(t * sign, min=0) for t in trimmed]
    total = agree[0] + agree[1] + agree[2]
    count = torch.sign(agree[0]) + torch.sign(agree[1]) + torch.sign(agree[2])
    return ((total * sign + 0.0) / torch.clamp(count, min=1) + b).half()


def eager_bins(base, models, offset, size):
    b = base.float()
    out = []
    for m in models:
        d = m.float() - b
        bits = d.abs_().view(torch.int32)
        out.append(bits.sub_(offset).clamp_(0, size + 1))
    return out


def fused_bins(base, m0, m1, m2, offset, size):
    b = base.float()
    return [((m.float() - b).abs().view(torch.int32) - offset).clamp(0, size + 1) for m in (m0, m1, m2)]


def _time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return stats_.median(times)


def _threaded(fn, threads: int, repeat: int) -> float:
    """Seconds for ``threads`` threads to run ``fn`` ``repeat`` times each, at once."""
    barrier = threading.Barrier(threads)

    def work():
        barrier.wait()
        for _ in range(repeat):
            fn()

    pool = [threading.Thread(target=work) for _ in range(threads)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=699_050,
                        help="elements per slice (the engine's for TIES on SD1)")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the engine's workers run
    n = args.elements
    base, models = _slice(n, 0)
    first = _selection(n, base, models[0])
    sel = {f"trim{i}": first for i in range(3)}
    ctx = MergeContext("k", TensorInfo((n,), "float16"), start=0, stop=n)
    below, cut = _below(first.threshold), first.last_tie + 1

    rows = []
    start = time.perf_counter()
    merge = torch.compile(fused_merge, dynamic=True)
    got = merge(base, *models, below, first.threshold, cut)
    compile_merge = time.perf_counter() - start
    want = eager_merge(base, models, sel, ctx)
    same_merge = torch.equal(got.view(torch.int16), want.view(torch.int16))
    for seed in (1, 2):  # more slices, the compiled function reused (dynamic shapes: one compile)
        b2, m2 = _slice(n - 1000 * seed, seed)
        ctx2 = MergeContext("k", TensorInfo((b2.numel(),), "float16"), start=0, stop=b2.numel())
        s2 = _selection(b2.numel(), b2, m2[0])
        same_merge &= torch.equal(merge(b2, *m2, _below(s2.threshold), s2.threshold, s2.last_tie + 1).view(torch.int16),
                                  eager_merge(b2, m2, {f"trim{i}": s2 for i in range(3)}, ctx2).view(torch.int16))
    rows.append(("merge pass", compile_merge, same_merge,
                 _time(lambda: eager_merge(base, models, sel, ctx), args.repeat),
                 _time(lambda: merge(base, *models, below, first.threshold, cut), args.repeat),
                 _threaded(lambda: eager_merge(base, models, sel, ctx), args.threads, args.repeat),
                 _threaded(lambda: merge(base, *models, below, first.threshold, cut), args.threads, args.repeat)))

    offset, size = (int(torch.tensor([first.threshold]).view(torch.int32)) >> 16 << 16) - (2 << 16) - 1, \
        statistics.WINDOW << 16
    start = time.perf_counter()
    bins = torch.compile(fused_bins, dynamic=True)
    got_bins = bins(base, *models, offset, size)
    compile_bins = time.perf_counter() - start
    same_bins = all(torch.equal(a, b) for a, b in zip(got_bins, eager_bins(base, models, offset, size)))
    rows.append(("statistics pass (bins)", compile_bins, same_bins,
                 _time(lambda: eager_bins(base, models, offset, size), args.repeat),
                 _time(lambda: bins(base, *models, offset, size), args.repeat),
                 _threaded(lambda: eager_bins(base, models, offset, size), args.threads, args.repeat),
                 _threaded(lambda: bins(base, *models, offset, size), args.threads, args.repeat)))

    print(f"one slice of {n:,} elements, base + 3 float16; {args.repeat} runs; "
          f"{args.threads} threads at once in the last two columns (their total for {args.repeat} runs each)")
    print("| pass | first call (s) | same bits | eager (ms) | fused (ms) | eager, threads (s) | fused, threads (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    for name, first_call, same, eager, fused, eager_t, fused_t in rows:
        print(f"| {name} | {first_call:.1f} | {'yes' if same else 'NO'} | {eager * 1e3:.2f} | {fused * 1e3:.2f} | "
              f"{eager_t:.2f} | {fused_t:.2f} |")


if __name__ == "__main__":
    main()
