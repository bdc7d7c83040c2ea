"""Parse and dump times of large recipes: ``python bench/bench_recipe.py [SIZES...]``.

Three shapes per size n: ``chain`` (n lines, each using the previous result), ``wide`` (n - 1
models averaged by one ``n_average`` call, from the mecha-methods plugin) and ``fallbacks``
(one line ``x = model(..) | model(..) | ...``, which the parser turns into n - 1 nested
fallback calls).
"""

from __future__ import annotations

import sys
import time

from mecha_core import dump_recipe, load_recipe


def chain(n: int) -> str:
    lines = ["mecha 1", 'x0 = model("m0.safetensors", type="delta")']
    lines += [f"x{i} = scale(x{i - 1}, alpha=0.5)" for i in range(1, n)]
    return "\n".join(lines) + "\n"


def wide(n: int) -> str:
    lines = ["mecha 1"] + [f'm{i} = model("m{i}.safetensors")' for i in range(n - 1)]
    lines.append("x = n_average(" + ", ".join(f"m{i}" for i in range(n - 1)) + ")")
    return "\n".join(lines) + "\n"


def fallbacks(n: int) -> str:
    return "mecha 1\nx = " + " | ".join(f'model("m{i}")' for i in range(n)) + "\n"


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(sizes: list[int]) -> None:
    print(f"{'shape':<10} {'nodes':>8} {'parse s':>9} {'dump s':>9} {'reparse s':>10} {'equal s':>9}")
    for n in sizes:
        for name, build in (("chain", chain), ("wide", wide), ("fallbacks", fallbacks)):
            text = build(n)
            graph, parse_s = timed(load_recipe, text)
            dumped, dump_s = timed(dump_recipe, graph)
            again, reparse_s = timed(load_recipe, dumped)
            same, eq_s = timed(lambda a=again, g=graph: a == g)
            assert same
            print(f"{name:<10} {n:>8} {parse_s:>9.3f} {dump_s:>9.3f} {reparse_s:>10.3f} {eq_s:>9.3f}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [1_000, 10_000, 100_000])
