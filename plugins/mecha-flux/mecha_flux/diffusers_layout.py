"""Flux transformers in diffusers naming (``FluxTransformer2DModel``), converted to the canonical
layout.

diffusers saves the transformer alone (``transformer/diffusion_pytorch_model.safetensors``) under
its own module names, and splits what Black Forest Labs fuses:

- a double block's ``img_attn.qkv`` is ``attn.to_q``, ``attn.to_k``, ``attn.to_v`` stacked on
  dim 0 (``txt_attn.qkv``: ``attn.add_q_proj``, ``add_k_proj``, ``add_v_proj``);
- a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` stacked;
- ``final_layer.adaLN_modulation.1`` holds (shift, scale) where diffusers' ``norm_out.linear``
  holds (scale, shift): the two halves swap.

Everything else is a rename (:func:`bfl_parts`). The converter fuses and swaps as it reads, so a
recipe may mix diffusers, BFL and ComfyUI files and block-/class-wise values apply to all.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from mecha_core.errors import PlanError
from mecha_core.kit import torch_dtype
from mecha_core.lazy import torch
from mecha_core.specs import Architecture, ConvertedKey, Converter, KeySpec, TensorInfo

from .layout import PREFIX

_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
_DOUBLE = {
    "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
    "attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
    "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
}
_DOUBLE_NORMS = {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
                 "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
_DOUBLE_FUSED = {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
                 "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1),
                 "attn.add_v_proj": ("txt_attn.qkv", 2)}
_SINGLE = {"norm.linear": "modulation.lin", "proj_out": "linear2"}
_SINGLE_NORMS = {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2),
                 "proj_mlp": ("linear1", 3)}
SWAPPED = "final_layer.adaLN_modulation.1"

_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


def bfl_parts(module: str) -> tuple[str, int | None] | None:
    """The BFL module (no prefix) a diffusers module path maps to, and the part index when the BFL
    module fuses several diffusers modules along dim 0 (``None``: a plain rename); ``None`` when the
    path is not a Flux transformer module. ``norm_out.linear`` maps to ``final_layer.adaLN_modulation.1``
    with its halves swapped (:data:`SWAPPED`)."""
    if module in _TOP:
        return _TOP[module], None
    if module == "norm_out.linear":
        return SWAPPED, None
    m = _BLOCK.match(module)
    if m is None:
        return None
    kind, index, rest = m.groups()
    if kind == "transformer_blocks":
        prefix, plain, norms, fused = f"double_blocks.{index}.", _DOUBLE, _DOUBLE_NORMS, _DOUBLE_FUSED
    else:
        prefix, plain, norms, fused = f"single_blocks.{index}.", _SINGLE, _SINGLE_NORMS, _SINGLE_FUSED
    if rest in plain:
        return prefix + plain[rest], None
    if rest in norms:
        return prefix + norms[rest], None
    if rest in fused:
        target, part = fused[rest]
        return prefix + target, part
    return None


def _param_of(key: str) -> tuple[str, str] | None:
    module, _, param = key.rpartition(".")
    return (module, param) if param in ("weight", "bias") else None


def bfl_key(key: str) -> tuple[str, int | None] | None:
    """The BFL key (no prefix) of a diffusers transformer key, with its part index (see
    :func:`bfl_parts`); the RMSNorm ``weight`` of diffusers is BFL's ``scale``."""
    split = _param_of(key)
    if split is None:
        return None
    module, param = split
    found = bfl_parts(module)
    if found is None:
        return None
    target, part = found
    if target.endswith(("query_norm", "key_norm")):
        return (f"{target}.scale", None) if param == "weight" else None
    return f"{target}.{param}", part


def _take(source: str) -> Callable[[Mapping[str, Any]], Any]:
    return lambda tensors: tensors[source]


def _swap(source: str) -> Callable[[Mapping[str, Any]], Any]:
    def compute(tensors: Mapping[str, Any]) -> Any:
        scale, shift = tensors[source].chunk(2, dim=0)
        return torch.cat([shift, scale], dim=0)

    return compute


def _fuse(sources: tuple[str, ...], dtype: str) -> Callable[[Mapping[str, Any]], Any]:
    def compute(tensors: Mapping[str, Any]) -> Any:
        return torch.cat([tensors[s].to(torch_dtype(dtype)) for s in sources], dim=0)

    return compute


def plan_to_canonical(header: Mapping[str, TensorInfo], allow_missing: bool = False) -> dict[str, ConvertedKey]:
    """Rename (fuse, swap) a diffusers Flux transformer header to canonical keys. Keys this layout
    does not know pass through unchanged; a fused key with a part missing (or of another width) is
    a :class:`PlanError`, or left out with ``allow_missing``; a header with no diffusers Flux key is
    not this layout (``ValueError``)."""
    out: dict[str, ConvertedKey] = {}
    groups: dict[str, dict[int, str]] = {}
    converted = 0
    for key, info in header.items():
        found = bfl_key(key)
        if found is None:
            out[key] = ConvertedKey(info, (key,), _take(key))
            continue
        target, part = found
        converted += 1
        if part is not None:
            groups.setdefault(target, {})[part] = key
        elif target.startswith(SWAPPED + ".") and info.shape and info.shape[0] % 2 == 0:
            out[PREFIX + target] = ConvertedKey(info, (key,), _swap(key))
        else:
            out[PREFIX + target] = ConvertedKey(info, (key,), _take(key))
    if not converted:
        raise ValueError("no diffusers-layout Flux transformer key")
    for target, parts in groups.items():
        wanted = 4 if ".linear1." in target else 3
        infos = [header[parts[i]] for i in sorted(parts)]
        if sorted(parts) != list(range(wanted)) or len({i.shape[1:] for i in infos}) != 1:
            if not allow_missing:
                have = ", ".join(sorted(parts.values()))
                raise PlanError(f"Flux diffusers file: {PREFIX}{target} fuses {wanted} tensors of the same width; "
                                f"the file has {have}; use --allow-missing to leave the key out")
            continue
        sources = tuple(parts[i] for i in range(wanted))
        shape = (sum(i.shape[0] for i in infos), *infos[0].shape[1:])
        dtype = infos[0].dtype
        out[PREFIX + target] = ConvertedKey(TensorInfo(shape, dtype), sources, _fuse(sources, dtype))
    return out


def diffusers_keys(canonical: Architecture) -> dict[str, KeySpec]:
    """The diffusers key table of a canonical Flux architecture's transformer: every BFL key split
    into the diffusers keys it is made of, with their shapes."""
    hidden = canonical.keys[PREFIX + "img_in.weight"].shape[0]
    targets: dict[str, list[tuple[int | None, str]]] = {}
    for name in _all_diffusers_names(canonical):
        found = bfl_key(name)
        if found is not None:
            targets.setdefault(found[0], []).append((found[1], name))
    keys: dict[str, KeySpec] = {}
    for bfl, parts in targets.items():
        spec = canonical.keys.get(PREFIX + bfl)
        if spec is None:
            continue
        for part, name in sorted(parts, key=lambda p: p[0] or 0):
            shape = spec.shape
            if part is not None:
                rows = spec.shape[0] - 3 * hidden if part == 3 else hidden
                shape = (rows, *spec.shape[1:])
            keys[name] = KeySpec(shape, spec.dtype, "diffuser")
    return keys


def _all_diffusers_names(canonical: Architecture) -> list[str]:
    names = []
    counts = {"double": 0, "single": 0}
    for key in canonical.keys:
        m = re.match(re.escape(PREFIX) + r"(double|single)_blocks\.(\d+)\.", key)
        if m:
            counts[m.group(1)] = max(counts[m.group(1)], int(m.group(2)) + 1)
    for module in (*_TOP, "norm_out.linear"):
        names += [f"{module}.weight", f"{module}.bias"]
    for i in range(counts["double"]):
        for rest in (*_DOUBLE, *_DOUBLE_FUSED):
            names += [f"transformer_blocks.{i}.{rest}.weight", f"transformer_blocks.{i}.{rest}.bias"]
        names += [f"transformer_blocks.{i}.{rest}.weight" for rest in _DOUBLE_NORMS]
    for i in range(counts["single"]):
        for rest in (*_SINGLE, *_SINGLE_FUSED):
            names += [f"single_transformer_blocks.{i}.{rest}.weight", f"single_transformer_blocks.{i}.{rest}.bias"]
        names += [f"single_transformer_blocks.{i}.{rest}.weight" for rest in _SINGLE_NORMS]
    return names


def diffusers_architecture(canonical: Architecture, name: str, description: str = "") -> Architecture:
    """The diffusers-naming architecture of a canonical Flux architecture (the transformer alone,
    as diffusers saves it); pair it with :func:`converters`."""
    return Architecture(name=name, keys=diffusers_keys(canonical),
                        description=description or f"{canonical.name} transformer in diffusers naming "
                                                   f"(FluxTransformer2DModel); converted to {canonical.name}",
                        component_aliases=dict(canonical.component_aliases))


def converters(source: str, target: str) -> list[Converter]:
    """diffusers-naming ``source`` -> canonical ``target``, for weights and for deltas."""
    return [Converter(f"{source}-to-{target}-{t}", source, t, target, t, plan_to_canonical,
                      description=f"Flux diffusers naming -> {target} ({t}): fuse q/k/v, swap final shift/scale")
            for t in ("base", "delta")]
