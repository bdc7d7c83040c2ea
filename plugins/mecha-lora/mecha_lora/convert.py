"""Model types for LoRA files and converters from them to deltas on sd1-ldm / sdxl-sgm."""

from __future__ import annotations

from typing import Mapping

from mecha_core.specs import DELTA, ConvertedKey, Converter, ModelType, TensorInfo

from . import keys as keynames
from . import peft_adapter
from .adapter_config import adapter_scales, describe
from .resolve import checked_resolution, converted_keys
from .tables import ARCHITECTURES

KOHYA = "kohya-lora"
PEFT = "peft-lora"

MODEL_TYPES = [
    ModelType(KOHYA, DELTA, lambda keys: keynames.is_kohya(keys),
              "kohya/LyCORIS LoRA-family file (lora_unet_, lora_te*_, lycoris_, oft_ names; any algorithm per module)"),
    ModelType(PEFT, DELTA, lambda keys: keynames.is_peft(keys) and not keynames.is_kohya(keys),
              "PEFT/diffusers LoRA file or PEFT adapter folder (lora_A/lora_B, lora_embedding_A/B, optional "
              "DoRA lora_magnitude_vector)"),
]


def _planner(style: str, arch: str):
    def plan(header: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None,
             allow_missing: bool = False) -> dict[str, ConvertedKey]:
        if style != "peft":  # kohya/LyCORIS files carry alpha tensors; their metadata is not read
            return converted_keys(header, checked_resolution(header, style, arch, allow_unknown=allow_missing))
        what = describe(metadata)
        scales = adapter_scales(metadata, what)  # PEFT: lora_alpha lives in the LoraConfig
        return converted_keys(header, checked_resolution(header, style, arch, what=what, scales=scales,
                                                         allow_unknown=allow_missing))

    return plan


CONVERTERS = [
    Converter(f"{fmt}->{arch}", None, fmt, arch, DELTA, _planner(style, arch),
              f"{fmt} file on {arch} -> delta (operators for base-dependent modules)")
    for fmt, style in ((KOHYA, "kohya"), (PEFT, "peft"))
    for arch in ARCHITECTURES
] + [
    # last: a PEFT file no image architecture's table reads is an adapter of a model's own modules
    # (a language model of any family): its keys are the model's keys (mecha_lora.peft_adapter)
    Converter(f"{PEFT}->model", None, PEFT, None, DELTA, peft_adapter.plan,
              f"{PEFT} adapter on any model (keys are the model's module paths) -> delta "
              f"(operators for DoRA and modules_to_save)"),
]
