"""Module tables: which checkpoint weight each LoRA module name changes, per architecture.

The tables are built forward from the architecture's weights (see scripts/build_tables.py), so a
name is resolved by exact lookup; names are never guessed by turning ``_`` back into ``.``.
"""

from __future__ import annotations

import functools
import gzip
import json
import math
import os
from typing import Iterable

import attrs

from . import flux

DATA = os.path.join(os.path.dirname(__file__), "data")

#: The architectures LoRA files can target, in the order ties are broken when a file fits both.
ARCHITECTURES = ("sd1-ldm", "sdxl-sgm", "flux-dev", "flux-schnell")

#: SAI modelspec architecture ids written into LoRA files made here.
MODELSPEC_IDS = {"sd1-ldm": "stable-diffusion-v1/lora", "sdxl-sgm": "stable-diffusion-xl-v1-base/lora",
                 "flux-dev": "flux-1-dev/lora", "flux-schnell": "flux-1-schnell/lora"}


@attrs.frozen
class Module:
    """One LoRA-targetable layer of an architecture."""

    name: str
    """Canonical kohya module name without the ``lora_`` prefix (``unet_down_blocks_0_...``)."""
    key: str
    """The checkpoint key of the weight the module changes."""
    shape: tuple[int, ...]
    """The layer's own weight shape (for a fused key: the slice's shape)."""
    key_shape: tuple[int, ...]
    """The checkpoint key's full shape."""
    rows: tuple[int, int] | None = None
    """For a slice of a fused weight (SDXL CLIP-G q/k/v in ``in_proj_weight``): its rows [start, end)."""

    @property
    def kohya_name(self) -> str:
        return "lora_" + self.name

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_flat(self) -> int:
        """Input features times kernel elements: the column count of the flattened weight."""
        return math.prod(self.shape[1:])

    @property
    def bias_key(self) -> str:
        return self.key.removesuffix("weight") + "bias"


@attrs.frozen(eq=False)
class ModuleTable:
    arch: str
    modules: tuple[Module, ...]
    by_kohya: dict[str, Module] = attrs.field(repr=False)
    by_peft: dict[str, Module] = attrs.field(repr=False)
    spellings: tuple[Module, ...] = ()
    """Modules that resolve but are not written by extraction: other namings of the same weights
    (Flux's diffusers modules, some of them row slices of a fused BFL weight)."""

    @property
    def all_modules(self) -> tuple[Module, ...]:
        return self.modules + self.spellings

    def kohya(self, name: str) -> Module | None:
        """Resolve a kohya/LyCORIS module name (any accepted prefix)."""
        for prefix in ("lora_", "lycoris_", "oft_"):
            if name.startswith(prefix):
                rest = name[len(prefix):]
                found = self.by_kohya.get(rest)
                if found is None and prefix == "lycoris_":
                    # standalone LyCORIS names U-Net modules without the "unet_" part
                    found = self.by_kohya.get("unet_" + rest)
                return found
        return None

    def peft(self, path: str) -> Module | None:
        """Resolve a PEFT/diffusers module path (``unet.down_blocks...``, ``base_model.model...``)."""
        path = path.removeprefix("base_model.model.")
        found = self.by_peft.get(path)
        if found is None:  # a bare component model (PEFT adapter of the U-Net, transformer or a text encoder)
            for component in ("unet.", "text_encoder.", "transformer."):
                found = found or self.by_peft.get(component + path)
        return found


def _peft_names(peft: str) -> Iterable[str]:
    yield peft
    # transformers 5 names CLIP modules without the "text_model." level
    component, _, rest = peft.partition(".")
    if rest.startswith("text_model."):
        yield component + "." + rest.removeprefix("text_model.")


@functools.lru_cache(maxsize=None)
def table(arch: str) -> ModuleTable:
    """The module table of ``arch`` (one of :data:`ARCHITECTURES`): packed for SD1/SDXL, computed
    from the sizes for Flux (:mod:`mecha_lora.flux`)."""
    if arch in flux.SIZES:
        canonical, other = flux.rows(arch)
    else:
        with gzip.open(os.path.join(DATA, f"{arch}-modules.json.gz"), "rt") as f:
            canonical, other = json.load(f)["modules"], []
    by_kohya: dict[str, Module] = {}
    by_peft: dict[str, Module] = {}
    built: tuple[list[Module], list[Module]] = ([], [])
    for rows_of, modules in zip((canonical, other), built):
        for name, alt, peft, key, shape, rows, key_shape in rows_of:
            m = Module(name, key, tuple(shape), tuple(key_shape or shape), tuple(rows) if rows else None)
            modules.append(m)
            by_kohya.setdefault(name, m)
            if alt:
                by_kohya.setdefault(alt, m)
            for p in _peft_names(peft):
                by_peft.setdefault(p, m)
    return ModuleTable(arch, tuple(built[0]), by_kohya, by_peft, tuple(built[1]))
