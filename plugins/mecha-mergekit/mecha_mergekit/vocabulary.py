"""The reader's side of the tokenizer settings: the config's models as folders, and each
model's vocabulary map (built by :mod:`.tokenizer`) for its ``model(..., vocab=...)``."""

from __future__ import annotations

import os
from typing import Any

from .tokenizer import ModelInput, TokenizerConfigError, plan_from_config, write_vocab_folder

#: the top-level keys this module reads
TOKENIZER_KEYS = ("tokenizer_source", "tokenizer", "chat_template")


def _folder(reader: Any, ref: Any, line: int) -> ModelInput:
    if not isinstance(ref, str) or not ref.strip():
        raise reader.fail(f"a model must be a path or a Hugging Face id, got {ref!r}", line)
    if "+" in ref:
        raise reader.fail(f"model '{ref}': base+lora models have no tokenizer mecha can merge", line)
    path = reader.resolve(ref)
    folder = path if os.path.isabs(path) else os.path.join(reader.base_dir or ".", path)
    if not os.path.isdir(folder):
        raise reader.fail(f"model '{ref}': no folder {folder} (a tokenizer setting reads each model's "
                          f"tokenizer files when the config is read, so --models-dir does not apply)", line)
    return ModelInput(ref, os.path.abspath(folder), line)


def referenced_models(body: Any) -> list[tuple[Any, Any, int]]:
    """``(ref, None, line)`` of every model a config's body names (its ``models:`` entries, or the
    sources of every slice), first appearance first: the models mergekit builds the tokenizer
    over. Malformed entries are skipped here; the reader refuses them when it reads them."""
    found: dict[Any, int] = {}

    def add(item: Any, default: int) -> None:
        if isinstance(item, dict) and isinstance(item.get("model"), str) and item["model"] not in found:
            found[item["model"]] = item.line_of("model") if hasattr(item, "line_of") else default

    line = getattr(body, "line", 1)
    models = body.get("models") if isinstance(body, dict) else None
    for item in models if isinstance(models, list) else ():
        add(item, line)
    slices = body.get("slices") if isinstance(body, dict) else None
    for piece in slices if isinstance(slices, list) else ():
        sources = piece.get("sources") if isinstance(piece, dict) else None
        for item in sources if isinstance(sources, list) else ():
            add(item, getattr(piece, "line", line))
    return [(ref, None, at) for ref, at in found.items()]


def vocab_maps(reader: Any, config: Any, entries: list[tuple[Any, Any, int]], base_ref: Any, base_line: int,
               dtype: str | None) -> dict[str, str]:
    """Model ref -> the vocabulary map its model node takes; empty when the config has no
    tokenizer setting. Errors are the reader's (one line, naming the YAML line)."""
    try:
        plan = plan_from_config(config)
    except TokenizerConfigError as exc:
        raise reader.fail(str(exc), exc.line) from None
    if plan is None:
        return {}
    # mergekit's models for a tensor: the config's, then the base when it is not one of them
    models = [_folder(reader, ref, line) for ref, _, line in entries]
    base = None
    if base_ref is not None:
        base = next((m for m in models if m.ref == base_ref), None) or _folder(reader, base_ref, base_line)
        if base not in models:
            models.append(base)
    source_model = None
    if plan.source is not None and plan.source not in ("base", "union"):
        source_model = next((m for m in models if m.ref == plan.source), None) or \
            _folder(reader, plan.source, plan.source_line)
    return write_vocab_folder(plan, models, base, dtype, reader.fail, source_model)
