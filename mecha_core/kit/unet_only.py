"""A diffusers U-Net saved on its own (``unet/diffusion_pytorch_model.safetensors``).

Such a file holds the keys of a diffusers pipeline layout's ``unet.`` part without that prefix.
:func:`architecture` derives its layout from the full diffusers layout and :func:`plan` its
conversion from the full layout's converter plan, so the names and the conversion to the
canonical layout are the same ones (the SD1 and SDXL plugins both use them).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import attrs

from ..specs import Architecture, ConvertedKey, TensorInfo

PREFIX = "unet."
"""The prefix of the U-Net's keys in a full diffusers layout."""

#: A converter's plan function: header -> converted keys.
Plan = Callable[[Mapping[str, TensorInfo]], dict[str, ConvertedKey]]


def architecture(full: Architecture, name: str, description: str) -> Architecture:
    """``full``'s ``unet.`` keys without the prefix (the U-Net's blocks and classes are kept)."""
    keys = {key[len(PREFIX):]: attrs.evolve(spec, aliases=tuple(a[len(PREFIX):] for a in spec.aliases
                                                                 if a.startswith(PREFIX)))
            for key, spec in full.keys.items() if key.startswith(PREFIX)}
    return Architecture(name=name, keys=keys, description=description, component_aliases=full.component_aliases)


def _reading_prefixed(compute: Callable[[Mapping[str, Any]], Any]) -> Callable[[Mapping[str, Any]], Any]:
    return lambda tensors: compute({PREFIX + key: value for key, value in tensors.items()})


def plan(full_plan: Plan) -> Plan:
    """``full_plan`` applied as if every key had the ``unet.`` prefix; sources are read, and
    keys that pass through are written, under the file's own names."""
    def unet_plan(header: Mapping[str, TensorInfo]) -> dict[str, ConvertedKey]:
        out = {}
        for key, converted in full_plan({PREFIX + k: v for k, v in header.items()}).items():
            sources = tuple(s[len(PREFIX):] for s in converted.sources)
            out[key.removeprefix(PREFIX)] = ConvertedKey(converted.info, sources, _reading_prefixed(converted.compute))
        return out

    return unet_plan
