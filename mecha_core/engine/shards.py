"""The shard layout of a folder output, computed from the output's key table alone.

:func:`plan_shards` decides which key goes to which shard, every shard's header and each key's
offset in it, so any process holding the plan can write any shard by itself, and the index is
written last from the same value.

The shards follow ``save_pretrained``: keys in order, a new shard when the next key would pass
``max_shard_size`` (a key larger than that alone in its own shard, while the shard being filled
goes on), ``model-0000i-of-0000N`` names (a single shard: ``model.safetensors`` and no index),
an index with ``metadata.total_size``/``total_parameters`` and a sorted ``weight_map``.
"""

from __future__ import annotations

import json
from typing import Mapping

import attrs

from ..output_folder import SINGLE_NAME
from ..specs import TensorInfo
from .safetensors_io import ITEMSIZE, build_header


@attrs.frozen
class Shard:
    """One file of the output folder, fully described before any tensor is computed."""

    name: str
    """The file name in the folder (``model-00001-of-00003.safetensors``)."""
    keys: tuple[str, ...]
    """The keys it holds, in the output's key order."""
    header: bytes
    """Its header bytes (length prefix included): the file's first ``len(header)`` bytes."""
    offsets: Mapping[str, int] = attrs.field(eq=False)
    """Each key's offset in the data area (after the header)."""
    size: int
    """The file's size in bytes."""


@attrs.frozen
class ShardLayout:
    """The whole output folder's weights: the shards, and what the index says."""

    shards: tuple[Shard, ...]
    """The shards in order (one shard: named ``model.safetensors``)."""
    total_size: int
    """Bytes of tensor data over all shards (the index's ``metadata.total_size``)."""
    total_parameters: int
    """Elements over all keys (the index's ``metadata.total_parameters``)."""

    @property
    def weight_map(self) -> dict[str, str]:
        """Key -> its shard's file name, sorted by key as ``save_pretrained`` writes it."""
        return dict(sorted((k, s.name) for s in self.shards for k in s.keys))

    def index_json(self) -> str | None:
        """The text of ``model.safetensors.index.json``; ``None`` for a single shard (no index)."""
        if len(self.shards) == 1:
            return None
        index = {"metadata": {"total_parameters": self.total_parameters, "total_size": self.total_size},
                 "weight_map": self.weight_map}
        return json.dumps(index, indent=2, sort_keys=True) + "\n"


def plan_shards(output: Mapping[str, TensorInfo], max_shard_size: int, metadata: Mapping[str, str]) -> ShardLayout:
    """Split ``output`` (in its order) into shards of at most ``max_shard_size`` bytes of tensor
    data, as ``save_pretrained`` does; every shard's header carries ``metadata``."""
    groups: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for key, info in output.items():
        size = info.numel * ITEMSIZE[info.dtype]
        if size > max_shard_size:  # alone in its own shard; the one being filled goes on
            groups.append([key])
            continue
        if current and current_size + size > max_shard_size:
            groups.append(current)
            current, current_size = [], 0
        current.append(key)
        current_size += size
    if current or not groups:
        groups.append(current)
    n = len(groups)
    shards = []
    for i, keys in enumerate(groups):
        name = SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        infos = {k: output[k] for k in keys}
        header, offsets = build_header(infos, metadata)
        data = sum(info.numel * ITEMSIZE[info.dtype] for info in infos.values())
        shards.append(Shard(name, tuple(keys), header, offsets, len(header) + data))
    return ShardLayout(tuple(shards), sum(i.numel * ITEMSIZE[i.dtype] for i in output.values()),
                       sum(i.numel for i in output.values()))
