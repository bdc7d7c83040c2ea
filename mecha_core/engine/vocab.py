"""Inputs whose vocabularies differ: refused, or fitted to the one model the recipe keeps.

An architecture lists the keys whose first dimension is the vocabulary (``vocab_keys``: token
embeddings, the LM head). Without ``model(..., keep_vocab=true)`` in the recipe, inputs whose
sizes differ on such a key are refused, naming the key and both sizes. With it, every other input
is seen through :class:`VocabSource`: rows past the kept vocabulary are dropped, and rows the input
lacks are the kept model's own, so those rows come from the models that have them (exactly so
for two models; with more, a model without the rows weighs in with the kept model's rows).
"""

from __future__ import annotations

import os
from typing import Mapping

from ..lazy import torch

from ..errors import RecipeError
from ..plugins import PluginHost
from ..recipe.nodes import ModelNode, Node, walk
from ..specs import TensorInfo
from .sources import Source


def vocabulary_mismatch(key: str, first: TensorInfo, first_name: str, other: TensorInfo, other_name: str) -> str:
    """The one-line error for a vocabulary key whose shapes differ between two inputs."""
    if first.shape[1:] != other.shape[1:] or not first.shape:
        return (f"key '{key}' has shape {list(first.shape)} in {first_name} but {list(other.shape)} "
                f"in {other_name}")
    return (f"key '{key}' has a vocabulary of {first.shape[0]} rows in {first_name} but {other.shape[0]} in "
            f"{other_name}; name the model whose vocabulary the output keeps with "
            f"model(..., keep_vocab=true)")


def vocab_keeper(root: Node) -> ModelNode | None:
    """The model a recipe marks ``keep_vocab``; more than one file marked is an error."""
    marked = [n for n in walk(root) if isinstance(n, ModelNode) and n.keep_vocab]
    paths = sorted({n.path for n in marked})
    if len(paths) > 1:
        raise RecipeError(f"keep_vocab is given to {len(paths)} models ({', '.join(paths)}); the output "
                          f"keeps one model's vocabulary")
    return marked[0] if marked else None


class VocabSource(Source):
    """An input whose vocabulary keys are cut or filled to the kept model's row count."""

    direct = False

    def __init__(self, inner: Source, keeper: Source, resized: Mapping[str, TensorInfo]):
        self.inner, self.keeper, self.resized = inner, keeper, dict(resized)
        self.path, self.arch, self.type, self.space = inner.path, inner.arch, inner.type, inner.space
        self.metadata, self.refusals = inner.metadata, inner.refusals
        self.keys = {k: self.resized.get(k, info) for k, info in inner.keys.items()}

    def read(self, key: str) -> torch.Tensor:
        tensor = self.inner.read(key)
        if key not in self.resized:
            return tensor
        rows = self.resized[key].shape[0]
        if tensor.shape[0] >= rows:
            return tensor[:rows].contiguous()
        extra = self.keeper.read(key)[tensor.shape[0]:rows].to(tensor.dtype)
        return torch.cat([tensor, extra])

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        if key not in self.resized:
            self.inner.prefetch(key, start, stop)

    def close(self) -> None:
        self.inner.close()


def vocabulary_keys(source: Source, host: PluginHost, option: str) -> tuple[str, ...]:
    """The vocabulary keys (token embeddings, LM head) of ``source``'s architecture; a one-line
    error naming the recipe ``option`` (``keep_vocab=true``, ``vocab=...``) when it names none."""
    vocab_keys: tuple[str, ...] = ()
    if source.arch is not None:
        try:
            vocab_keys = host.architecture(source.arch).vocab_keys
        except RecipeError:
            vocab_keys = ()
    if not vocab_keys:
        raise RecipeError(f"model(..., {option}): {os.path.basename(source.path)} is of "
                          f"{source.arch or 'no known architecture'}, which names no vocabulary keys")
    return vocab_keys


def fit_vocabularies(opened: Mapping[ModelNode, Source], keeper: ModelNode,
                     host: PluginHost) -> dict[ModelNode, Source]:
    """Every input seen with the kept model's vocabulary size on its architecture's vocabulary keys."""
    kept = opened[keeper]
    vocab_keys = vocabulary_keys(kept, host, "keep_vocab=true")
    out: dict[ModelNode, Source] = {}
    for node, source in opened.items():
        resized = {}
        for key in vocab_keys:
            mine, theirs = source.keys.get(key), kept.keys.get(key)
            if mine is None or theirs is None or not mine.shape or mine.shape[0] == theirs.shape[0]:
                continue
            if mine.shape[1:] != theirs.shape[1:]:
                continue  # not a vocabulary difference: the plan reports the shape mismatch
            resized[key] = TensorInfo((theirs.shape[0], *mine.shape[1:]), mine.dtype)
        out[node] = VocabSource(source, kept, resized) if resized and source is not kept else source
    return out
