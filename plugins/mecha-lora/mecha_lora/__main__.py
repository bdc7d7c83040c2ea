"""``python -m mecha_lora``: an alias of ``mecha lora`` (see :mod:`mecha_lora.cli`).

    python -m mecha_lora extract TUNED BASE OUT [--rank 16 | --ratio 0.1] [--conv-rank N]
    python -m mecha_lora merge OUT LORA [LORA ...] [--weights 1,0.5] [--rank N]

Errors print one line and exit with status 2.
"""

from __future__ import annotations

import sys

from .cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
