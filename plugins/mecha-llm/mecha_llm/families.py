"""Decoder-only language model families: each file's layout computed from its header.

A member's keys are what ``save_pretrained`` writes for ``AutoModelForCausalLM``: a text stack
under a prefix (``model.``; ``model.language_model.`` or ``language_model.model.`` for Gemma 3's
multimodal checkpoints) holding ``embed_tokens``, ``layers.N.*`` and ``norm``, plus ``lm_head``
(absent when the embeddings are tied).

Blocks, in order: ``embed``, one per layer (``layer_00`` ... zero-padded to the layer count's
width), ``final_norm``, ``lm_head``, ``other`` (every key outside the text stack: a vision
tower). Classes name the sub-module with dots as underscores and expert numbers dropped:
``embed_tokens``, ``self_attn_q_proj``, ``self_attn_k_norm``, ``mlp_gate_proj``,
``input_layernorm``, ``post_attention_layernorm``, ``block_sparse_moe_gate``,
``block_sparse_moe_experts_w1`` ..., ``norm``, ``lm_head`` (a bias is in its weight's class). A
layer gradient's filter names ``_``-separated parts of classes: ``self_attn``, ``mlp``,
``q_proj``, ``block_sparse_moe``, ``experts``.

A member's name is the family, its layer count and its expert count (``llama-32l``,
``mixtral-32l-8e``): files of one name merge as one layout. ``lm_head.weight`` is always listed
(optional), so tied and untied members share a layout.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from mecha_core.specs import Architecture, ArchitectureFamily, KeySpec, TensorInfo

#: family name -> the config.json ``model_type`` values it claims
FAMILIES: dict[str, tuple[str, ...]] = {
    "llama": ("llama",),
    "mistral": ("mistral",),
    "qwen2": ("qwen2",),
    "qwen3": ("qwen3",),
    "gemma2": ("gemma2",),
    "gemma3": ("gemma3", "gemma3_text"),
    "phi3": ("phi3",),
    "mixtral": ("mixtral",),
}
#: the family of any layers.N. layout whose config names none of the model types above
GENERIC = "decoder"
_CLAIMED = frozenset(t for types in FAMILIES.values() for t in types)
_PREFIXES = ("model.language_model.", "language_model.model.", "model.", "transformer.", "")
_LAYER = re.compile(r"layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"\.experts\.(\d+)\.")
_SUFFIX = re.compile(r"\.(weight|bias)$")


def _text_prefix(header: Mapping[str, TensorInfo]) -> str | None:
    """The prefix of the text stack (``model.``): the first under which ``layers.0.`` and the
    token embeddings are found."""
    for prefix in _PREFIXES:
        if f"{prefix}embed_tokens.weight" in header and any(
                k.startswith(f"{prefix}layers.0.") for k in header):
            return prefix
    return None


def _class_of(sub: str) -> str:
    """``self_attn.q_proj.weight`` -> ``self_attn_q_proj``; expert numbers dropped."""
    return _EXPERT.sub(".experts.", _SUFFIX.sub("", sub)).replace(".", "_")


def _text_config(config: Mapping[str, Any] | None) -> Mapping[str, Any]:
    if not config:
        return {}
    text = config.get("text_config")
    return text if isinstance(text, Mapping) else config


def layout(family: str, header: Mapping[str, TensorInfo], config: Mapping[str, Any] | None) -> Architecture | None:
    """The concrete architecture of a member of ``family`` (``None``: the header holds no text stack)."""
    prefix = _text_prefix(header)
    if prefix is None:
        return None
    embed_key = f"{prefix}embed_tokens.weight"
    layer_of: dict[str, tuple[int, str]] = {}
    for key in header:
        if key.startswith(prefix):
            m = _LAYER.fullmatch(key[len(prefix):])
            if m:
                layer_of[key] = (int(m.group(1)), m.group(2))
    count = max(i for i, _ in layer_of.values()) + 1
    width = len(str(count - 1))
    layer_blocks = tuple(f"layer_{i:0{width}d}" for i in range(count))
    experts = {int(m.group(1)) for _, sub in layer_of.values() if (m := _EXPERT.search("." + sub))}
    embed = header[embed_key]
    keys: dict[str, KeySpec] = {}

    def add(key: str, info: TensorInfo, block: str, klass: str | None, optional: bool = False) -> None:
        keys[key] = KeySpec(tuple(info.shape), info.dtype, "text" if block != "other" else "other",
                            optional=optional, blocks=(block,), klass=klass)

    add(embed_key, embed, "embed", "embed_tokens")
    for key in sorted(layer_of, key=lambda k: (layer_of[k][0], k)):
        index, sub = layer_of[key]
        add(key, header[key], layer_blocks[index], _class_of(sub))
    norm_key = f"{prefix}norm.weight"
    if norm_key in header:
        add(norm_key, header[norm_key], "final_norm", "norm")
    head = header.get("lm_head.weight", TensorInfo(tuple(embed.shape), embed.dtype))
    add("lm_head.weight", head, "lm_head", "lm_head", optional=True)  # absent when tied to the embeddings
    for key, info in header.items():
        if key not in keys:
            add(key, info, "other", None, optional=True)
    text = _text_config(config)
    hidden = embed.shape[1] if len(embed.shape) > 1 else text.get("hidden_size")
    tied = "lm_head.weight" not in header
    details = [f"{count} layers", f"hidden size {hidden}", f"vocabulary {embed.shape[0]}"]
    if experts:
        details.append(f"{len(experts)} experts")
    details.append("tied embeddings" if tied else "separate LM head")
    name = f"{family}-{count}l" + (f"-{len(experts)}e" if experts else "")
    blocks = ("embed", *layer_blocks, "final_norm", "lm_head", "other")
    classes = tuple(sorted({s.klass for s in keys.values() if s.klass is not None}))
    return Architecture(name, keys, blocks=blocks, classes=classes, layers=layer_blocks,
                        vocab_keys=(embed_key, "lm_head.weight"),
                        description=f"{family} family: {', '.join(details)}")


def _detector(family: str, model_types: tuple[str, ...]) -> Callable[..., Architecture | None]:
    def detect(header: Mapping[str, TensorInfo], config: dict | None) -> Architecture | None:
        if not config or config.get("model_type") not in model_types:
            return None
        return layout(family, header, config)

    return detect


def _generic(header: Mapping[str, TensorInfo], config: dict | None) -> Architecture | None:
    if config and config.get("model_type") in _CLAIMED:
        return None  # its own family decides (and says no when the header does not fit)
    return layout(GENERIC, header, config)


def families() -> list[ArchitectureFamily]:
    out = [ArchitectureFamily(name, detect=_detector(name, types),
                              description=f"decoder-only language models with config.json model_type "
                                          f"{' or '.join(types)}")
           for name, types in FAMILIES.items()]
    out.append(ArchitectureFamily(GENERIC, detect=_generic,
                                  description="any decoder with embed_tokens and layers.N. keys that no "
                                              "other family claims (no config.json needed)"))
    return out
