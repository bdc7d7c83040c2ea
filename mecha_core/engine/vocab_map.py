"""Inputs seen through a vocabulary map: their vocabulary rows gathered into another vocabulary.

``model("b", vocab="maps/b.json")`` gives a model a *vocabulary map*, a JSON file that says,
for each row of the output vocabulary, where that row of this model's vocabulary keys (token
embeddings, LM head: the architecture's ``vocab_keys``) comes from. A tokenizer merge (a union
of vocabularies, added tokens) is one map per model. The file, version 1::

    {"mecha_vocab_map": 1,
     "rows": 40,                 # rows of the output vocabulary (padding included)
     "tokens": 37,               # rows past this one (padding) are the mean of rows [0, tokens)
     "own": [[0, 0, 32], [33, 32, 4]],         # [to, from, count]: runs of this model's own rows
     "fill": [[32, [["../a", 7], ["../c", 9]]], [36, []]],
                                 # [to, [[model, row] ...]]: the mean of those models' rows
                                 # (read from the files as stored); [] is a row of zeros
     "dtype": "float32",         # the fills' and padding's compute dtype (null: the inputs' promoted)
     "files": ".."}              # the folder whose non-weight files (tokenizer, config) the output takes

Paths are relative to the map file (or absolute); a fill's model must be a model of the recipe.
A map with no ``rows`` only names ``files`` (a chat template written into another model's
tokenizer files): the model's rows are left as they are.
Rows no run or fill names are zeros. Maps are kept in a file, not in the recipe text: a real
vocabulary is 30k-250k rows, and a file beside the tokenizer files it was made from keeps the
recipe readable and the two together.

Reading a key copies row runs from the stored tensor (a memory map) into the output rows: one
output-sized tensor, no whole-tensor copy of any input.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import attrs

from ..errors import RecipeError
from ..lazy import torch
from ..plugins import PluginHost
from ..recipe.nodes import ModelNode
from ..specs import TensorInfo
from .safetensors_io import is_float, torch_dtype
from .sources import Source
from .vocab import vocabulary_keys

FORMAT_VERSION = 1
_DTYPES = ("float16", "bfloat16", "float32", "float64")


@attrs.frozen
class VocabMap:
    """One model's vocabulary map, read from its JSON file (paths made absolute)."""

    path: str
    """The map file."""
    rows: int | None
    """Rows of the output vocabulary, padding included; ``None``: the map names tokenizer files
    only, the rows stay as they are."""
    tokens: int | None
    """Rows that are tokens; the rows after them are padding (the mean of the token rows)."""
    own: tuple[tuple[int, int, int], ...]
    """``(to, from, count)`` runs of the model's own rows."""
    fill: tuple[tuple[int, tuple[tuple[str, int], ...]], ...]
    """``(to, ((model path, row) ...))``: rows that are the mean of other rows (none: zeros)."""
    dtype: str | None
    """The dtype fills and padding are computed in; ``None``: the inputs' promoted dtype."""
    files: str | None
    """The folder whose non-weight files an output folder takes (tokenizer, config)."""


def _fail(path: str, why: str) -> RecipeError:
    return RecipeError(f"vocabulary map {path}: {why}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_vocab_map(path: str) -> VocabMap:
    """The map at ``path``; a one-line :class:`RecipeError` naming the file when it is not one."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as exc:
        raise _fail(path, f"cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise _fail(path, f"is not valid JSON ({exc})") from None
    if not isinstance(data, dict) or data.get("mecha_vocab_map") != FORMAT_VERSION:
        raise _fail(path, f'is not a version {FORMAT_VERSION} vocabulary map ("mecha_vocab_map": 1)')
    here = os.path.dirname(os.path.abspath(path))

    def where(p: Any) -> str:
        if not isinstance(p, str) or not p:
            raise _fail(path, f"a model path must be text, got {p!r}")
        return os.path.normpath(os.path.join(here, os.path.expanduser(p)))

    files = data.get("files")
    if "rows" not in data and not data.get("own") and not data.get("fill"):  # names tokenizer files only
        return VocabMap(os.path.abspath(path), None, None, (), (), None, None if files is None else where(files))
    rows, tokens = data.get("rows"), data.get("tokens", data.get("rows"))
    if not _int(rows) or not _int(tokens) or tokens > rows or rows == 0:
        raise _fail(path, f"rows and tokens must be counts with 0 < tokens <= rows, got {rows!r}, {tokens!r}")
    own = []
    for run in data.get("own", []):
        if not (isinstance(run, list) and len(run) == 3 and all(_int(v) for v in run)) or run[0] + run[2] > rows:
            raise _fail(path, f"an own run must be [to, from, count] inside the {rows} rows, got {run!r}")
        own.append((run[0], run[1], run[2]))
    fill = []
    for entry in data.get("fill", []):
        if not (isinstance(entry, list) and len(entry) == 2 and _int(entry[0]) and entry[0] < rows
                and isinstance(entry[1], list)):
            raise _fail(path, f"a fill must be [to, [[model, row] ...]] inside the {rows} rows, got {entry!r}")
        refs = []
        for ref in entry[1]:
            if not (isinstance(ref, list) and len(ref) == 2 and _int(ref[1])):
                raise _fail(path, f"a fill's source must be [model, row], got {ref!r}")
            refs.append((where(ref[0]), ref[1]))
        fill.append((entry[0], tuple(refs)))
    dtype = data.get("dtype")
    if dtype is not None and dtype not in _DTYPES:
        raise _fail(path, f"dtype must be one of {', '.join(_DTYPES)} or null, got {dtype!r}")
    return VocabMap(os.path.abspath(path), rows, tokens, tuple(own), tuple(fill), dtype,
                    None if files is None else where(files))


def map_path(node: ModelNode) -> str:
    """The file a model's ``vocab=`` names: as written when absolute, else beside the recipe."""
    assert node.vocab is not None
    raw = os.path.expanduser(node.vocab)
    return raw if os.path.isabs(raw) else os.path.join(node.base_dir or ".", raw)


class VocabMapSource(Source):
    """An input whose vocabulary keys are gathered through a :class:`VocabMap`."""

    direct = False

    def __init__(self, inner: Source, vmap: VocabMap, donors: Mapping[str, Source], vocab_keys: tuple[str, ...]):
        self.inner, self.vmap, self.donors = inner, vmap, dict(donors)
        self.path, self.arch, self.type, self.space = inner.path, inner.arch, inner.type, inner.space
        self.metadata, self.refusals = inner.metadata, inner.refusals
        self.mapped = {k: inner.keys[k] for k in vocab_keys if k in inner.keys and inner.keys[k].shape}
        self.keys = {k: TensorInfo((vmap.rows, *info.shape[1:]), info.dtype) if k in self.mapped else info
                     for k, info in inner.keys.items()}

    def check(self) -> None:
        """Every row the map names exists and every fill's model has the key with the same row
        shape: a one-line error before any tensor is read."""
        for key, info in self.mapped.items():
            if not is_float(info.dtype):
                raise _fail(self.vmap.path, f"key '{key}' is {info.dtype}, not a float tensor")
            for _, start, count in self.vmap.own:
                if start + count > info.shape[0]:
                    raise _fail(self.vmap.path, f"rows {start}..{start + count - 1} of key '{key}' are "
                                                f"past its {info.shape[0]} rows in {self.inner.path}")
            for _, refs in self.vmap.fill:
                for model, row in refs:
                    other = self.donors[model].keys.get(key)
                    if other is None or other.shape[1:] != info.shape[1:] or row >= other.shape[0]:
                        have = "no such key" if other is None else f"shape {list(other.shape)}"
                        raise _fail(self.vmap.path, f"row {row} of key '{key}' in {model} ({have}) cannot "
                                                    f"fill a row of shape {list(info.shape[1:])}")

    def _work_dtype(self, key: str) -> torch.dtype:
        if self.vmap.dtype is not None:
            return torch_dtype(self.vmap.dtype)
        dtype = torch_dtype(self.mapped[key].dtype)
        for source in self.donors.values():
            if key in source.keys and is_float(source.keys[key].dtype):
                dtype = torch.promote_types(dtype, torch_dtype(source.keys[key].dtype))
        return dtype

    def read(self, key: str) -> torch.Tensor:
        if key not in self.mapped:
            return self.inner.read(key)
        stored = self.inner.read(key)
        vmap = self.vmap
        out = torch.zeros((vmap.rows, *stored.shape[1:]), dtype=stored.dtype)
        for to, start, count in vmap.own:  # row runs: a copy of those rows only
            out[to:to + count] = stored[start:start + count]
        del stored
        work = self._work_dtype(key)
        read: dict[str, torch.Tensor] = {}
        for to, refs in vmap.fill:
            for model, _ in refs:
                if model not in read:
                    read[model] = self.donors[model].read(key)
            if len(refs) == 1:  # one row: as it is (a sum from zeros would turn -0.0 into 0.0)
                row = read[refs[0][0]][refs[0][1]].to(work)
            else:
                row = torch.zeros(out.shape[1:], dtype=work)
                for model, index in refs:  # summed in the listed order, then divided: mergekit's mean
                    row = row + read[model][index].to(work)
                if refs:
                    row /= len(refs)
            out[to] = row.to(out.dtype)
        read.clear()
        if vmap.rows > vmap.tokens:
            out[vmap.tokens:] = torch.mean(out[:vmap.tokens].to(work), dim=0).to(out.dtype)
        return out

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        if key not in self.mapped:
            self.inner.prefetch(key, start, stop)

    def close(self) -> None:
        self.inner.close()


def apply_vocab_maps(opened: Mapping[ModelNode, Source],
                     host: PluginHost) -> tuple[dict[ModelNode, Source], str | None]:
    """Every input with ``vocab=`` seen through its map; and the folder whose files the output
    takes (the maps' ``files``, which must agree). Raises before any tensor is read."""
    by_path = {os.path.realpath(s.path): s for s in opened.values()}
    out: dict[ModelNode, Source] = {}
    files: set[str] = set()
    for node, source in opened.items():
        if node.vocab is None:
            out[node] = source
            continue
        vmap = read_vocab_map(map_path(node))
        donors = {}
        for _, refs in vmap.fill:
            for model, _ in refs:
                found = by_path.get(os.path.realpath(model))
                if found is None:
                    raise _fail(vmap.path, f"fills rows from {model}, which is not a model of the recipe")
                donors[model] = found
        if vmap.files is not None:
            files.add(vmap.files)
        if vmap.rows is None:
            out[node] = source
            continue
        vocab_keys = vocabulary_keys(source, host, "vocab=...")
        wrapped = VocabMapSource(source, vmap, donors, vocab_keys)
        wrapped.check()
        out[node] = wrapped
    if len(files) > 1:
        raise RecipeError(f"the recipe's vocabulary maps name {len(files)} different folders of tokenizer "
                          f"files ({', '.join(sorted(files))}); the output takes one")
    return out, next(iter(files), None)


__all__ = ["FORMAT_VERSION", "VocabMap", "VocabMapSource", "apply_vocab_maps", "map_path", "read_vocab_map"]
