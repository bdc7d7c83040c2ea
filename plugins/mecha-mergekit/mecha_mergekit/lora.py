"""mergekit's ``model: BASE+LORA``: a PEFT adapter merged into its base before the merge.

mergekit 0.1.5 (``ModelReference.merged``) loads BASE with transformers, loads LORA with
``PeftModel.from_pretrained``, runs ``merge_and_unload`` and saves the result to its LoRA cache;
the merge then reads that model like any other. Here the same model is the recipe node
``apply_lora(model(BASE), model(LORA), strength=1)`` of the mecha-lora plugin, which applies
PEFT adapter folders as PEFT merges them (scale lora_alpha / r, rsLoRA, alpha/rank patterns,
embeddings, DoRA, modules_to_save): nothing is written to a cache, and the LoRA is applied key
by key as the merge streams.

A reference splits as mergekit splits it: on ``+``, exactly two parts (each a path or a
Hugging Face id with an optional ``@revision``, found in the local hub cache like any model).
"""

from __future__ import annotations

from typing import Any, Callable

from mecha_core.kit.recipes import Location, ModelNode, Node

#: The merge method that applies an adapter (mecha-lora's).
APPLY_METHOD = "apply_lora"


def split(ref: str) -> tuple[str, str] | None:
    """(base, lora) of a ``BASE+LORA`` reference; ``None`` for a plain model. Raises ValueError
    for anything else mergekit cannot parse (more than one ``+``, an empty part)."""
    if "+" not in ref:
        return None
    parts = ref.split("+")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise ValueError(f"model '{ref}': a base+lora reference is BASE+LORA (one '+', two non-empty parts), "
                         f"as mergekit parses it")
    return parts[0].strip(), parts[1].strip()


def base_plus_lora(base: str, lora: str, *, resolve: Callable[[str], str], base_dir: str | None,
                   where: Location, call: Callable[[str, list[Node], dict[str, Any]], Node]) -> Node:
    """The recipe node of mergekit's merged ``base+lora`` model: ``apply_lora(base, lora)``.
    ``resolve`` finds a path or hub id (the reader's rule); ``call`` builds a method call."""
    base_node = ModelNode(resolve(base), base_dir=base_dir, where=where)
    lora_node = ModelNode(resolve(lora), base_dir=base_dir, where=where)
    return call(APPLY_METHOD, [base_node, lora_node], {"strength": 1.0})
