"""Models stored as folders: Hugging Face shards with an index, and diffusers pipelines.

A folder model is read as one key table over several safetensors files:

- a Hugging Face folder: ``model.safetensors.index.json`` naming the shard of every key (or a
  single ``model.safetensors``); ``diffusion_pytorch_model.safetensors`` (and its index) is read
  the same way, so a diffusers component folder (``unet/``) is a model too;
- an index file named directly (``.../model.safetensors.index.json``): the same as its folder;
- a PEFT adapter folder (``adapter_model.safetensors`` beside ``adapter_config.json``): that
  file (the LoRA plugin reads the config beside it);
- a diffusers pipeline (``model_index.json``): the weights of its ``unet``, ``text_encoder``,
  ``text_encoder_2`` and ``vae`` subfolders under those prefixes (``unet.conv_in.weight``), the
  naming the SD1/SDXL diffusers layouts already read and convert. Other components (a safety
  checker, an image encoder) are not part of the model and are left out.

The index is checked against the shards before anything is read: every key named once, every
shard present and holding the keys the index gives it, and no shard holding a key the index
does not name. Each problem is one line naming the file.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable

from ..errors import PlanError
from ..lazy import torch
from ..specs import TensorInfo
from .safetensors_io import SafetensorsFile

#: The file names of a Hugging Face folder's weights: (index, single file), in the order tried.
WEIGHT_NAMES = (("model.safetensors.index.json", "model.safetensors"),
                ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
                ("adapter_model.safetensors.index.json", "adapter_model.safetensors"))  # a PEFT adapter
INDEX_SUFFIX = ".safetensors.index.json"
#: A diffusers pipeline's description; its presence makes a folder a pipeline.
PIPELINE_INDEX = "model_index.json"
#: The pipeline components that are the model, as prefixes of their keys (SD1: the first three,
#: SDXL: all four), in the order the keys are listed.
PIPELINE_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "vae")
#: Largest index file read (real ones are a few hundred KB even for 400B-parameter models).
INDEX_SIZE_LIMIT = 64 * 1024 * 1024


def is_index_path(path: str) -> bool:
    """Whether ``path`` names a safetensors index file (``*.safetensors.index.json``)."""
    return os.path.basename(path).endswith(INDEX_SUFFIX)


def is_pipeline_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, PIPELINE_INDEX))


def is_model_folder(folder: str) -> bool:
    """Whether ``folder`` holds a model mecha reads: HF weights (sharded or not) or a pipeline."""
    if not os.path.isdir(folder):
        return False
    return is_pipeline_folder(folder) or any(
        os.path.isfile(os.path.join(folder, name)) for pair in WEIGHT_NAMES for name in pair)


def model_folder(path: str) -> str:
    """The folder of a model's config.json: the model itself when it is a folder, else the folder
    of its file (``model("dir/model.safetensors")`` and ``model("dir")`` both see ``dir``)."""
    return path if os.path.isdir(path) else os.path.dirname(path)


def _bad(path: str, why: str) -> PlanError:
    return PlanError(f"{path}: {why}")


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _Twice(key)
        out[key] = value
    return out


class _Twice(Exception):
    pass


def _read_json(path: str) -> Any:
    try:
        size = os.path.getsize(path)
        if size > INDEX_SIZE_LIMIT:
            raise _bad(path, f"{size} bytes; too large for an index (at most {INDEX_SIZE_LIMIT})")
        with open(path, "rb") as f:
            return json.loads(f.read(), object_pairs_hook=_once)
    except _Twice as exc:
        raise _bad(path, f"key {_name(exc.args[0])} is listed twice") from None
    except OSError as exc:
        raise _bad(path, f"cannot read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad(path, f"not valid JSON ({' '.join(str(exc).splitlines())[:120]})") from None


def _name(key: str) -> str:
    return f"'{key}'" if key.isprintable() and len(key) <= 200 else ascii(key)[:200]


def read_index(index_path: str) -> dict[str, str]:
    """The ``weight_map`` of an index (key -> shard file name), checked for shape: an object
    holding a ``weight_map`` object of names to plain file names in the index's folder."""
    data = _read_json(index_path)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise _bad(index_path, "not a safetensors index (no \"weight_map\" object)")
    weight_map = data["weight_map"]
    if not weight_map:
        raise _bad(index_path, "the weight_map is empty")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise _bad(index_path, f"key {_name(key)}: the shard must be a file name, got {shard!r:.60}")
        if os.path.basename(shard) != shard or shard in (".", ".."):
            # the shards live beside the index: a path elsewhere would read files the user never named
            raise _bad(index_path, f"key {_name(key)}: shard {_name(shard)} is not a file name in the "
                                   f"index's folder")
    return dict(weight_map)


class FolderFile:
    """Several safetensors files read as one: the shards of an index, or a pipeline's components.

    It has what the engine uses of a :class:`SafetensorsFile` (``path``, ``keys``, ``metadata``,
    ``read``, ``prefetch``, ``nbytes``, ``close``); ``path`` is the folder, ``files`` the
    safetensors files in order."""

    def __init__(self, path: str, files: list[SafetensorsFile], entries: dict[str, tuple[SafetensorsFile, str]]):
        self.path = path
        self.files = files
        self._entries = entries
        self.keys: dict[str, TensorInfo] = {k: f.keys[stored] for k, (f, stored) in entries.items()}
        self.metadata = dict(files[0].metadata) if files else {}

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def __repr__(self) -> str:
        return f"FolderFile({self.path!r}, {len(self.files)} files, {len(self.keys)} keys)"

    def file_of(self, key: str) -> str:
        """The safetensors file that holds ``key``."""
        return self._entries[key][0].path

    def nbytes(self, key: str) -> int:
        f, stored = self._entries[key]
        return f.nbytes(stored)

    def read(self, key: str) -> torch.Tensor:
        f, stored = self._entries[key]
        return f.read(stored)

    def prefetch(self, key: str, start: int = 0, stop: int | None = None) -> None:
        f, stored = self._entries[key]
        f.prefetch(stored, start, stop)

    def copy_to(self, key: str, fd: int, position: int, start: int = 0, stop: int | None = None) -> bool:
        """Copy the stored bytes of ``key`` (elements ``start:stop``) file to file from its shard
        (:meth:`SafetensorsFile.copy_to`)."""
        f, stored = self._entries[key]
        return f.copy_to(stored, fd, position, start, stop)

    def close(self) -> None:
        for f in self.files:
            f.close()


def _open_all(paths: Iterable[str]) -> list[SafetensorsFile]:
    opened: list[SafetensorsFile] = []
    try:
        for p in paths:
            opened.append(SafetensorsFile(p))
    except BaseException:
        for f in opened:
            f.close()
        raise
    return opened


Entries = dict[str, tuple[SafetensorsFile, str]]
"""Key -> the file that holds it and its name there."""


def _open_index(index_path: str, prefix: str = "") -> tuple[list[SafetensorsFile], Entries]:
    """The shards of an index, checked against it; keys (with ``prefix``) in shard order, and
    within a shard in the index's order."""
    weight_map = read_index(index_path)
    folder = os.path.dirname(index_path)
    shard_names = sorted(dict.fromkeys(weight_map.values()))
    for name in shard_names:
        if not os.path.isfile(os.path.join(folder, name)):
            key = next(k for k, s in weight_map.items() if s == name)
            raise _bad(index_path, f"shard {_name(name)} (of key {_name(key)}) does not exist in {folder}")
    files = _open_all(os.path.join(folder, name) for name in shard_names)
    try:
        by_name = dict(zip(shard_names, files))
        for key, name in weight_map.items():
            if key not in by_name[name].keys:
                raise _bad(index_path, f"key {_name(key)} is in {name} by the index, but that shard does not "
                                       f"hold it")
        for name, f in by_name.items():
            for key in f.keys:
                owner = weight_map.get(key)
                if owner is None:
                    raise _bad(index_path, f"shard {name} holds key {_name(key)}, which the index does not list")
                if owner != name:
                    raise _bad(index_path, f"key {_name(key)} is in both {name} and {owner} (a key must be in "
                                           f"exactly one shard)")
        _check_total_size(index_path, files)
        rank = {name: i for i, name in enumerate(shard_names)}
        order = sorted(weight_map, key=lambda k: rank[weight_map[k]])  # stable: the index's order within a shard
        entries = {prefix + k: (by_name[weight_map[k]], k) for k in order}
        return files, entries
    except BaseException:
        for f in files:
            f.close()
        raise


def _check_total_size(index_path: str, files: list[SafetensorsFile]) -> None:
    """Warn when the index's ``metadata.total_size`` is not the shards' data size: loaders ignore
    it and some writers count it differently, so it is no reason to refuse the model."""
    data = _read_json(index_path)
    total = data.get("metadata", {}).get("total_size") if isinstance(data.get("metadata"), dict) else None
    if not isinstance(total, int) or isinstance(total, bool):
        return
    actual = sum(f.nbytes(k) for f in files for k in f.keys)
    if total != actual:
        sys.stderr.write(f"warning: {index_path}: metadata.total_size is {total} but the shards hold "
                         f"{actual} bytes of tensors; reading the shards as they are\n")


def _weights_of(folder: str, prefix: str = "") -> tuple[list[SafetensorsFile], Entries] | None:
    """A Hugging Face folder's weights (index first, then the single file); ``None`` if none."""
    for index, single in WEIGHT_NAMES:
        if os.path.isfile(os.path.join(folder, index)):
            return _open_index(os.path.join(folder, index), prefix)
        if os.path.isfile(os.path.join(folder, single)):
            files = _open_all([os.path.join(folder, single)])
            return files, {prefix + k: (files[0], k) for k in files[0].keys}
    return None


def _open_pipeline(folder: str) -> FolderFile:
    index = os.path.join(folder, PIPELINE_INDEX)
    described = _read_json(index)
    if not isinstance(described, dict):
        raise _bad(index, "not a diffusers pipeline description (a JSON object)")
    files: list[SafetensorsFile] = []
    entries: dict[str, tuple[SafetensorsFile, str]] = {}
    try:
        for component in PIPELINE_COMPONENTS:
            sub = os.path.join(folder, component)
            entry = described.get(component)
            listed = isinstance(entry, list) and bool(entry) and entry[0] is not None  # [null, null]: none
            if not listed and not os.path.isdir(sub):
                continue
            if not os.path.isdir(sub):
                raise _bad(index, f"names the component '{component}', but {sub} is not a folder")
            found = _weights_of(sub, component + ".")
            if found is None:
                raise _bad(sub, "holds no diffusion_pytorch_model.safetensors or model.safetensors "
                                "(sharded or not); .bin weights are not read (unpickling can run code)")
            files += found[0]
            entries.update(found[1])
        if not entries:
            raise _bad(index, f"a diffusers pipeline without {', '.join(PIPELINE_COMPONENTS)} weights")
    except BaseException:
        for f in files:
            f.close()
        raise
    return FolderFile(folder, files, entries)


def open_folder(path: str) -> FolderFile:
    """Open a folder model, or the index file ``path`` names, as one :class:`FolderFile` whose
    ``path`` is the (absolute) folder."""
    path = os.path.abspath(path)
    if is_index_path(path) and not os.path.isdir(path):
        files, entries = _open_index(path)
        return FolderFile(os.path.dirname(path), files, entries)
    if is_pipeline_folder(path):
        return _open_pipeline(path)
    found = _weights_of(path)
    if found is None:
        raise _bad(path, "is a directory, not a model folder (no model.safetensors, "
                         "model.safetensors.index.json, model_index.json or adapter_model.safetensors)")
    return FolderFile(path, *found)


def open_weights(path: str) -> SafetensorsFile | FolderFile:
    """A model's weights: a folder or an index as a :class:`FolderFile`, anything else as one
    :class:`SafetensorsFile`."""
    if os.path.isdir(path) or is_index_path(path):
        return open_folder(path)
    return SafetensorsFile(path)


def source_files(source: Any) -> list[str]:
    """Every file an opened model input reads (each shard of a folder), through its converters."""
    while hasattr(source, "inner"):
        source = source.inner
    file = getattr(source, "file", None)
    if isinstance(file, FolderFile):
        return file.paths
    return [file.path] if file is not None else [source.path]

