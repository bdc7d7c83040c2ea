"""Layer views: some of a model's layers, renumbered, as a model input (layer stacking).

``model("b", layers="8:16", at=24, of=40)`` reads the file's layers 8 to 15 as layers 24 to 31
of a 40-layer stack. The view is a :class:`Source` like any other, so the engine still evaluates
every step of a recipe at one key: the renumbering happens where a key is read. A layer's keys
are found through the file's architecture family (the keys of each block of ``arch.layers``), and
the view's own architecture is the family's layout of the stack it belongs to, so views of one
stack joined with ``|`` share one architecture (and ``layers(...)`` maps see the stack's layers).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from ..errors import PlanError
from ..lazy import torch
from ..plugins import PluginHost
from ..recipe.nodes import LayerView
from ..specs import Architecture, TensorInfo
from .families import CONFIG_NAME, family_architecture
from .sources import Source

#: config.json's key for the layer count (mergekit's ``num_layers_config_key`` of every
#: Llama-family architecture)
LAYER_COUNT_KEY = "num_hidden_layers"


def _renamed(key: str, layer: int, to: int) -> str:
    """``key`` of layer ``layer`` as the same key of layer ``to``: the first dotted part that is
    the layer's number is the number (``model.layers.7.mlp...``)."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part == str(layer):
            parts[i] = str(to)
            return ".".join(parts)
    raise PlanError(f"key '{key}' of layer {layer} does not hold the layer's number; its layers cannot "
                    f"be renumbered")


class LayerViewSource(Source):
    """A source's layers ``start:stop`` as layers ``at ...`` (see the module's docstring)."""

    def __init__(self, inner: Source, view: LayerView, names: Mapping[str, str], arch: str | None,
                 layer_of: Mapping[int, int]):
        self.inner, self.view, self.names = inner, view, dict(names)
        self.path, self.arch, self.type, self.space = inner.path, arch, inner.type, inner.space
        self.direct, self.metadata, self.refusals = inner.direct, inner.metadata, inner.refusals
        self.keys = {key: inner.keys[name] for key, name in self.names.items()}
        self.layer_of = dict(layer_of)
        """Output layer -> the file's layer it reads."""

    def read(self, key: str) -> torch.Tensor:
        return self.inner.read(self.names[key])

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        self.inner.prefetch(self.names[key], start, stop)

    def __getattr__(self, name: str) -> Any:
        if name == "stored" and hasattr(self.inner, "stored"):  # a stored tensor is copied file to file
            return lambda key: self.inner.stored(self.names[key])  # type: ignore[attr-defined]
        raise AttributeError(name)

    def close(self) -> None:
        self.inner.close()


def _layers(arch: Architecture) -> dict[str, int]:
    """Key -> its layer's index, for the keys of ``arch``'s layer blocks."""
    index = {block: i for i, block in enumerate(arch.layers)}
    return {key: index[b] for key, spec in arch.keys.items() for b in spec.blocks[:1] if b in index}


def view_source(source: Source, view: LayerView, host: PluginHost, label: str) -> Source:
    """``source`` seen through ``view``; a one-line :class:`PlanError` (before any tensor is read)
    when the file has no layers of a family or the range is not inside them."""
    arch = host.architecture(source.arch) if source.arch is not None else None
    family = host.family_of(arch.name) if arch is not None else None
    if arch is None or family is None or not arch.layers:
        what = f"is {arch.name}, not a member of a layered architecture family" if arch is not None \
            else "has no detected architecture"
        raise PlanError(f"model '{label}': layers={view.text()!r} needs a model of a layered architecture "
                        f"family (mecha-llm's llama, qwen2 ...); {os.path.basename(source.path)} {what}")
    count = len(arch.layers)
    if view.stop > count:
        raise PlanError(f"model '{label}': layers {view.text()} are not inside its {count} layers "
                        f"(0:{count})")
    layer_of_key = _layers(arch)
    by_layer: dict[int, list[str]] = {}
    for key in source.keys:
        if key in layer_of_key:
            by_layer.setdefault(layer_of_key[key], []).append(key)
    first_layer = min(arch.blocks.index(b) for b in arch.layers)
    before, after = [], []
    for key in source.keys:
        if key not in layer_of_key:
            spec = arch.keys.get(key)
            early = spec is not None and bool(spec.blocks) and all(
                b in arch.blocks and arch.blocks.index(b) < first_layer for b in spec.blocks)
            (before if early else after).append(key)
    width = view.stop - view.start
    layer_of = {view.at + i: view.start + i for i in range(width)}
    names: dict[str, str] = {}
    if view.outside in ("all", "before"):
        names.update({k: k for k in before})
    for out, layer in layer_of.items():
        names.update({_renamed(k, layer, out): k for k in by_layer.get(layer, [])})
    if view.outside in ("all", "after"):
        names.update({k: k for k in after})
    # the stack's layout: every layer of it shaped like the nearest layer the view reads
    header: dict[str, TensorInfo] = {k: source.keys[k] for k in (*before, *after)}
    for out in range(view.count):
        layer = view.start + min(max(out - view.at, 0), width - 1)
        header.update({_renamed(k, layer, out): source.keys[k] for k in by_layer.get(layer, [])})
    stack = family_architecture(family, source.path, header, host)
    return LayerViewSource(source, view, names, stack.name if stack is not None else None, layer_of)


def _text_config(config: dict) -> dict:
    """Where a config keeps the language model's settings (a multimodal one: ``text_config``)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) and LAYER_COUNT_KEY in text else config


def stacked_config(config: dict, views: list[LayerViewSource]) -> dict | None:
    """``config`` (a copied config.json) with the stack's layer count, and its per-layer
    ``layer_types`` taken from the layers each output layer reads; ``None`` when ``views`` is
    empty or nothing changes."""
    if not views:
        return None
    text = _text_config(config)
    count = max(v.view.count for v in views)
    old = text.get(LAYER_COUNT_KEY)
    kinds = text.get("layer_types")
    changed = dict(text)
    changed[LAYER_COUNT_KEY] = count
    if isinstance(kinds, list) and kinds:
        source_of: dict[int, int] = {}
        for v in views:  # the first view of an output layer: the one `|` takes it from
            for out, layer in v.layer_of.items():
                source_of.setdefault(out, layer)
        changed["layer_types"] = [kinds[min(source_of.get(i, i), len(kinds) - 1)] for i in range(count)]
    if old == count and changed.get("layer_types") == kinds:
        return None
    if text is config:
        return changed
    return {**config, "text_config": changed}


def rewrite_config(folder_file: str, sources: list[Source]) -> None:
    """Rewrite a copied ``config.json`` (at ``folder_file``) for the layer views among
    ``sources`` (see :func:`stacked_config`); nothing when there are none."""
    views = [s for s in sources if isinstance(s, LayerViewSource)]
    if not views or os.path.basename(folder_file) != CONFIG_NAME or not os.path.isfile(folder_file):
        return
    with open(folder_file, encoding="utf-8") as f:
        config = json.load(f)
    changed = stacked_config(config, views) if isinstance(config, dict) else None
    if changed is not None:
        with open(folder_file, "w", encoding="utf-8") as f:
            f.write(json.dumps(changed, indent=2, sort_keys=True) + "\n")
