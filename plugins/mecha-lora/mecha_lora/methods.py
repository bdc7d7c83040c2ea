"""The ``apply_lora`` merge method: applies any LoRA-family module to base weights."""

from __future__ import annotations

from mecha_core import DELTA, WEIGHT, merge_method

from .operators import WeightOperator


@merge_method(spaces={"base": WEIGHT, "lora": DELTA}, returns=WEIGHT,
              formula="base + strength * delta; OFT/BOFT/DoRA/(IA)^3/GLoRA by their own rule")
def apply_lora(base, lora, *, strength: float = 1.0):
    """Apply a LoRA (any LyCORIS type, kohya or PEFT naming) to the base weights.

    Additive modules (LoRA, LoCon, LoHa, LoKr, full) give base + strength * ΔW, like
    add_difference. Modules that depend on the weight they change (OFT, BOFT, DoRA, (IA)^3,
    GLoRA) are applied to the base; strength 0 leaves the base unchanged, 1 is the trained result.
    """
    if isinstance(lora, WeightOperator):
        return lora.apply(base, strength)
    return base + strength * lora.reshape(base.shape).to(base.dtype)


METHODS = [apply_lora]
