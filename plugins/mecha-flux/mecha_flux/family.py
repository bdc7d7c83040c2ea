"""The ``flux_family`` architecture family: Flux-shaped transformers of any size.

A file in Black Forest Labs' naming (``double_blocks.N....``) or ComfyUI's
(``model.diffusion_model.double_blocks.N....``) that no fixed architecture claims (a pruned
"Flux Lite", a small test model) gets the layout :func:`mecha_flux.layout.flux_architecture`
computes for the sizes read from its header, named after them (``flux-d8s38``,
``flux-d2s3-h32-m128-hd16-c8-t40-p24-schnell``: sizes that differ from Flux.1 dev are spelled out).
"""

from __future__ import annotations

import re
from typing import Mapping

from mecha_core.specs import Architecture, ArchitectureFamily, TensorInfo

from .layout import DEV, PREFIX, FluxShape, flux_architecture, transformer_keys

NAME = "flux_family"
_INDEX = re.compile(r"(double|single)_blocks\.(\d+)\.")
# FluxShape field -> short tag in the member's name (only sizes that differ from dev are written)
_TAGS = (("hidden", "h"), ("mlp_hidden", "m"), ("head_dim", "hd"), ("in_channels", "c"), ("context_dim", "t"),
         ("pooled_dim", "p"))


def shape_of(header: Mapping[str, TensorInfo]) -> FluxShape | None:
    """The Flux sizes of a header in BFL or ComfyUI naming; ``None`` when it is not Flux-shaped
    (every transformer key of the sizes read must be there with its shape)."""
    prefix = PREFIX if PREFIX + "img_in.weight" in header else ""
    try:
        shapes = {key[len(prefix):]: tuple(info.shape) for key, info in header.items() if key.startswith(prefix)}
        hidden, in_channels = shapes["img_in.weight"]
        counts = {"double": 0, "single": 0}
        for key in shapes:
            m = _INDEX.match(key)
            if m:
                counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
        if not counts["double"] and not counts["single"]:
            return None
        if counts["double"]:
            mlp_hidden = shapes["double_blocks.0.img_mlp.0.weight"][0]
            head_dim = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
        else:
            mlp_hidden = shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden
            head_dim = shapes["single_blocks.0.norm.query_norm.scale"][0]
        shape = FluxShape(double_blocks=counts["double"], single_blocks=counts["single"], hidden=hidden,
                          mlp_hidden=mlp_hidden, head_dim=head_dim, in_channels=in_channels,
                          context_dim=shapes["txt_in.weight"][1], pooled_dim=shapes["vector_in.in_layer.weight"][1],
                          guidance="guidance_in.in_layer.weight" in shapes)
    except (KeyError, ValueError, IndexError, TypeError):
        return None
    expected = transformer_keys(shape)
    if any(shapes.get(key) != tuple(key_shape) for key, key_shape in expected.items()):
        return None
    return shape


def member_name(shape: FluxShape) -> str:
    """The name of a family member: block counts, then the sizes that differ from Flux.1 dev."""
    parts = [f"flux-d{shape.double_blocks}s{shape.single_blocks}"]
    parts += [f"{tag}{getattr(shape, field)}" for field, tag in _TAGS if getattr(shape, field) != getattr(DEV, field)]
    if not shape.guidance:
        parts.append("schnell")
    return "-".join(parts)


def detect(header: Mapping[str, TensorInfo], config: dict | None) -> Architecture | None:
    shape = shape_of(header)
    if shape is None:
        return None
    kind = "dev-like (guidance_in)" if shape.guidance else "schnell-like (no guidance_in)"
    return flux_architecture(member_name(shape), shape,
                             description=f"{NAME}: {shape.double_blocks} double, {shape.single_blocks} single "
                                         f"blocks, hidden size {shape.hidden}, {kind}")


def family() -> ArchitectureFamily:
    return ArchitectureFamily(NAME, detect, "Flux-shaped transformers of any block count or width (BFL or "
                                            "ComfyUI naming), e.g. pruned Flux Lite models")
