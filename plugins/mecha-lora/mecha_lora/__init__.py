"""mecha-lora: LoRA-family networks (LoRA, LoCon, LoHa, LoKr, OFT, BOFT, DoRA, (IA)^3, GLoRA,
full) in kohya/LyCORIS or PEFT/diffusers naming, for SD1 (sd1-ldm), SDXL (sdxl-sgm) and Flux;
PEFT adapter folders on any model (language models: :mod:`mecha_lora.peft_adapter`).

- ``mecha_core.model("x.safetensors")`` on a LoRA file is a delta on its base architecture;
  ``mecha_core.apply_lora(base, lora, strength=0.8)`` applies any type,
  ``add_difference(base, lora, alpha=0.8)`` the additive ones.
- :func:`extract_lora` writes a kohya LoRA from the difference of two checkpoints;
  :func:`merge_loras` merges several LoRA files into one (also ``mecha lora extract|merge``);
  on two language models :func:`extract_lora` writes a PEFT adapter folder.
"""

from __future__ import annotations

from typing import Any

__all__ = ["extract_lora", "merge_loras"]


def __getattr__(name: str) -> Any:
    # the writers import torch; ``mecha --help`` imports this package for its command module only
    if name in __all__:
        from . import write

        return getattr(write, name)
    raise AttributeError(f"module 'mecha_lora' has no attribute '{name}'")
