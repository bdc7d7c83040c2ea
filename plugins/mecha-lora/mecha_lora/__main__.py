"""``python -m mecha_lora``: extract a LoRA from two checkpoints, or merge LoRA files.

    python -m mecha_lora extract TUNED BASE OUT [--rank 16 | --ratio 0.1] [--conv-rank N]
    python -m mecha_lora merge OUT LORA [LORA ...] [--weights 1 0.5] [--rank N]

(The ``mecha`` command belongs to mecha-core; these writers live here until it grows a hook for
plugin subcommands.) Errors print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys

from mecha_core.errors import MechaError

from .write import FALLBACK_RANK, extract_lora, merge_loras


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mecha_lora", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("extract", help="a kohya LoRA approximating TUNED - BASE")
    e.add_argument("tuned")
    e.add_argument("base")
    e.add_argument("output")
    e.add_argument("--rank", type=int, default=16, help="rank of every layer (default 16)")
    e.add_argument("--ratio", type=float, default=None, help="fraction of each layer's full rank (overrides --rank)")
    e.add_argument("--conv-rank", type=int, default=None, help="rank of 3x3 convs (default: --rank or --ratio; 0: none)")
    e.add_argument("--dtype", default=None, help="output dtype (default: the tuned model's)")
    m = sub.add_parser("merge", help="one kohya LoRA whose delta is the weighted sum of the inputs'")
    m.add_argument("output")
    m.add_argument("loras", nargs="+")
    m.add_argument("--weights", type=float, nargs="+", default=None, help="one per LoRA (default: all 1)")
    m.add_argument("--rank", type=int, default=None,
                   help="re-factorise every module to this rank (default: exact concatenation where possible)")
    m.add_argument("--fallback-rank", type=int, default=FALLBACK_RANK,
                   help=f"rank for modules that cannot be concatenated (default {FALLBACK_RANK})")
    m.add_argument("--dtype", default=None, help="output dtype (default: the first LoRA's)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "extract":
            path = extract_lora(args.tuned, args.base, args.output, rank=args.rank, ratio=args.ratio,
                                conv_rank=args.conv_rank, dtype=args.dtype)
        else:
            path = merge_loras(args.loras, args.output, weights=args.weights, rank=args.rank,
                               fallback_rank=args.fallback_rank, dtype=args.dtype)
    except MechaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
