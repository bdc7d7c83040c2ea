"""Grouping a LoRA file's tensor keys into modules, for kohya/LyCORIS and PEFT/diffusers naming.

Each module becomes a :class:`ModuleKeys`: its name as written in the file and a map from a
canonical parameter name (the kohya/LyCORIS suffix, e.g. ``lora_down.weight``) to the file's key.
PEFT's ``lora_A``/``lora_B``/``lora_magnitude_vector`` are renamed to their kohya equivalents.
"""

from __future__ import annotations

import re
from typing import Iterable

import attrs

#: Name prefixes of kohya (sd-scripts), standalone LyCORIS and kohya OFT module names.
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_transformer_", "lycoris_", "oft_unet_",
                  "oft_te")

_PEFT_PARAM = re.compile(r"^(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_]+)?\.weight"
                         r"|(?P<mag>lora_magnitude_vector)(?:\.[A-Za-z0-9_]+)?(?:\.weight)?"
                         r"|(?P<alpha>alpha))$")


@attrs.frozen
class ModuleKeys:
    name: str
    """The module name as the file writes it."""
    params: dict[str, str]
    """Canonical parameter name -> the file's tensor key."""
    style: str
    """``kohya``, ``kohya-oft`` (sd-scripts OFT: constraint always clamps) or ``peft``."""


def is_kohya(keys: Iterable[str]) -> bool:
    return any(k.startswith(KOHYA_PREFIXES) for k in keys)


_PEFT_EMBEDDING = re.compile(r"^.+\.lora_embedding_[AB](?:\.[A-Za-z0-9_\-]+)?$")


def is_peft(keys: Iterable[str]) -> bool:
    """PEFT naming: lora_A/lora_B pairs (or an embedding's lora_embedding_A/B)."""
    return any((_PEFT_PARAM.match(k) and (".lora_A" in k or ".lora_B" in k)) or _PEFT_EMBEDDING.match(k)
               for k in keys)


def group_kohya(keys: Iterable[str]) -> list[ModuleKeys]:
    """kohya module names hold no dots: the module is the part before the first dot."""
    grouped: dict[str, dict[str, str]] = {}
    for key in keys:
        module, _, param = key.partition(".")
        grouped.setdefault(module, {})[param] = key
    return [ModuleKeys(name, params, "kohya-oft" if name.startswith("oft_") else "kohya")
            for name, params in grouped.items()]


def group_peft(keys: Iterable[str]) -> tuple[list[ModuleKeys], list[str]]:
    """PEFT modules, and the keys that are not PEFT LoRA parameters."""
    grouped: dict[str, dict[str, str]] = {}
    stray = []
    for key in keys:
        m = _PEFT_PARAM.match(key)
        if m is None:
            stray.append(key)
            continue
        if m["ab"]:
            param = "lora_down.weight" if m["ab"] == "A" else "lora_up.weight"
        elif m["mag"]:
            param = "dora_scale"
        else:
            param = "alpha"
        grouped.setdefault(m["module"], {})[param] = key
    return [ModuleKeys(name, params, "peft") for name, params in grouped.items()], stray
