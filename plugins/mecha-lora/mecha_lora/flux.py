"""Module tables of Flux.1 (``flux-dev``, ``flux-schnell``), built from the transformer's sizes.

The checkpoint keys are the canonical Flux layout (ComfyUI's all-in-one names:
``model.diffusion_model.`` + Black Forest Labs' module path). This plugin imports no other plugin,
so the names are described here (the mecha-flux plugin describes the same layout).

Accepted spellings of one layer:

- kohya (sd-scripts ``lora_flux``): ``lora_unet_`` + BFL path with ``_``
  (``lora_unet_double_blocks_0_img_attn_qkv``, ``lora_unet_single_blocks_3_linear1``); CLIP-L
  text encoder ``lora_te1_text_model_encoder_layers_N_self_attn_q_proj``;
- BFL/ai-toolkit/ComfyUI PEFT style: ``diffusion_model.`` + BFL path + ``.lora_A/.lora_B``;
- diffusers/PEFT: ``transformer.`` + ``FluxTransformer2DModel`` path
  (``transformer.transformer_blocks.0.attn.to_q``), also without the ``transformer.`` prefix
  (a model's own adapter), and kohya-style ``lora_transformer_`` + the same path with ``_``.

diffusers splits what BFL fuses: a double block's ``attn.to_q/to_k/to_v`` are row slices of
``img_attn.qkv`` (``add_q/k/v_proj`` of ``txt_attn.qkv``), a single block's ``to_q/to_k/to_v``
and ``proj_mlp`` row slices of ``linear1``; those modules change their rows only. diffusers'
``norm_out.linear`` is ``final_layer.adaLN_modulation.1`` with its halves swapped, which a row
slice cannot say: it is not in the table (reported as unknown, skipped with ``--allow-missing``).
Extraction writes the BFL modules only (kohya names), as sd-scripts does.
"""

from __future__ import annotations

from typing import Iterator

import attrs

PREFIX = "model.diffusion_model."
CLIP_PREFIX = "text_encoders.clip_l.transformer.text_model.encoder.layers."


@attrs.frozen
class FluxSizes:
    """The sizes the Flux module table follows from (defaults: Flux.1 dev)."""

    double_blocks: int = 19
    """Number of ``double_blocks.N``."""
    single_blocks: int = 38
    """Number of ``single_blocks.N``."""
    hidden: int = 3072
    """Width of the streams."""
    mlp_hidden: int = 12288
    """Width of the MLPs."""
    in_channels: int = 64
    """Packed latent channels."""
    context_dim: int = 4096
    """Width of the T5 tokens."""
    pooled_dim: int = 768
    """Width of the pooled CLIP vector."""
    guidance: bool = True
    """Whether ``guidance_in`` exists (dev)."""


SIZES = {"flux-dev": FluxSizes(), "flux-schnell": FluxSizes(guidance=False)}
CLIP_LAYERS, CLIP_WIDTH, CLIP_MLP = 12, 768, 3072


@attrs.frozen
class Layer:
    """One LoRA-targetable layer: its BFL path, shape, and its diffusers spellings."""

    bfl: str
    """The BFL module path (no prefix)."""
    shape: tuple[int, int]
    """The weight shape [out, in]."""
    diffusers: tuple[tuple[str, tuple[int, int] | None], ...] = ()
    """diffusers module paths and the rows of this weight each changes (``None``: all of them)."""


def layers(s: FluxSizes) -> Iterator[Layer]:
    """The transformer's Linear layers, in checkpoint order."""
    h, m = s.hidden, s.mlp_hidden
    yield Layer("img_in", (h, s.in_channels), (("x_embedder", None),))
    embedders = [("time_in", 256, "timestep_embedder"), ("vector_in", s.pooled_dim, "text_embedder")]
    if s.guidance:
        embedders.append(("guidance_in", 256, "guidance_embedder"))
    for name, width, diffusers in embedders:
        yield Layer(f"{name}.in_layer", (h, width), ((f"time_text_embed.{diffusers}.linear_1", None),))
        yield Layer(f"{name}.out_layer", (h, h), ((f"time_text_embed.{diffusers}.linear_2", None),))
    yield Layer("txt_in", (h, s.context_dim), (("context_embedder", None),))
    thirds = ((0, h), (h, 2 * h), (2 * h, 3 * h))
    for i in range(s.double_blocks):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for stream, norm, qkv, out, ff in (("img", "norm1", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0",
                                            "ff"),
                                           ("txt", "norm1_context",
                                            ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                                            "attn.to_add_out", "ff_context")):
            yield Layer(f"{b}{stream}_mod.lin", (6 * h, h), ((f"{d}{norm}.linear", None),))
            yield Layer(f"{b}{stream}_attn.qkv", (3 * h, h), tuple((d + q, rows) for q, rows in zip(qkv, thirds)))
            yield Layer(f"{b}{stream}_attn.proj", (h, h), ((d + out, None),))
            yield Layer(f"{b}{stream}_mlp.0", (m, h), ((f"{d}{ff}.net.0.proj", None),))
            yield Layer(f"{b}{stream}_mlp.2", (h, m), ((f"{d}{ff}.net.2", None),))
    for i in range(s.single_blocks):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        parts = (*zip((f"{d}attn.to_q", f"{d}attn.to_k", f"{d}attn.to_v"), thirds),
                 (f"{d}proj_mlp", (3 * h, 3 * h + m)))
        yield Layer(f"{b}linear1", (3 * h + m, h), tuple(parts))
        yield Layer(f"{b}linear2", (h, h + m), ((f"{d}proj_out", None),))
        yield Layer(f"{b}modulation.lin", (3 * h, h), ((f"{d}norm.linear", None),))
    yield Layer("final_layer.linear", (s.in_channels, h), (("proj_out", None),))
    yield Layer("final_layer.adaLN_modulation.1", (2 * h, h))  # diffusers' norm_out.linear: halves swapped


def rows(arch: str) -> tuple[list[list], list[list]]:
    """The module rows of ``arch`` in the form of the packed tables (see
    ``scripts/build_tables.py``: kohya name without ``lora_``, its other kohya spelling, PEFT path,
    checkpoint key, shape, rows of a fused key, key shape): the BFL and CLIP-L modules (what
    extraction writes), and the diffusers spellings (renames and row slices of the same keys)."""
    canonical: list[list] = []
    spellings: list[list] = []
    for layer in layers(SIZES[arch]):
        key = f"{PREFIX}{layer.bfl}.weight"
        canonical.append([f"unet_{layer.bfl.replace('.', '_')}", None, f"diffusion_model.{layer.bfl}", key,
                          list(layer.shape), None, None])
        for path, part in layer.diffusers:
            shape = [part[1] - part[0], layer.shape[1]] if part else list(layer.shape)
            spellings.append([f"transformer_{path.replace('.', '_')}", None, f"transformer.{path}", key, shape,
                              list(part) if part else None, list(layer.shape)])
    clip = (("self_attn.q_proj", (CLIP_WIDTH, CLIP_WIDTH)), ("self_attn.k_proj", (CLIP_WIDTH, CLIP_WIDTH)),
            ("self_attn.v_proj", (CLIP_WIDTH, CLIP_WIDTH)), ("self_attn.out_proj", (CLIP_WIDTH, CLIP_WIDTH)),
            ("mlp.fc1", (CLIP_MLP, CLIP_WIDTH)), ("mlp.fc2", (CLIP_WIDTH, CLIP_MLP)))
    for i in range(CLIP_LAYERS):
        for module, shape in clip:
            path = f"text_model.encoder.layers.{i}.{module}"
            canonical.append([f"te1_{path.replace('.', '_')}", None, f"text_encoder.{path}",
                              f"{CLIP_PREFIX}{i}.{module}.weight", list(shape), None, None])
    return canonical, spellings
