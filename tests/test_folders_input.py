"""Models as folders: a Hugging Face index with its shards (or one model.safetensors), an index file
named directly, and the index checks, each a one-line error naming the file."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import mecha_core as mecha
from mecha_core.engine.folders import open_weights
from mecha_core.errors import PlanError, SafetensorsError
from mecha_core.testing import open_model

SHARDS = {
    "model-00001-of-00002.safetensors": ["embed.weight", "layers.0.w", "layers.0.b"],
    "model-00002-of-00002.safetensors": ["layers.1.w", "layers.1.b", "head.weight", "steps"],
}


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {"embed.weight": torch.randn(11, 6, generator=g), "head.weight": torch.randn(11, 6, generator=g).half(),
           "steps": torch.arange(4) * (seed + 1)}
    for i in range(2):
        out[f"layers.{i}.w"] = torch.randn(6, 6, generator=g).to(torch.bfloat16)
        out[f"layers.{i}.b"] = torch.randn(6, generator=g)
    return out


def write_sharded(folder, tensors, shards=SHARDS, index_extra=None, weight_map=None) -> str:
    """An HF folder written with safetensors' own writer and a hand-made index."""
    os.makedirs(folder, exist_ok=True)
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(folder, name), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": weight_map or {k: name for name, keys in shards.items() for k in keys}}
    index.update(index_extra or {})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


def _sharded_expected(folder) -> dict[str, torch.Tensor]:
    out = {}
    for name in SHARDS:
        out.update(load_file(os.path.join(folder, name)))
    return out


def test_sharded_folder_reads_every_key_exactly(tmp_path, methods):
    folder = write_sharded(tmp_path / "m", _tensors(0))
    expected = _sharded_expected(folder)
    for named in (folder, os.path.join(folder, "model.safetensors.index.json")):
        source = open_model(named, methods)
        try:
            assert source.path == os.path.abspath(folder)
            # shard order, and within a shard the index's order
            assert list(source.keys) == SHARDS["model-00001-of-00002.safetensors"] + SHARDS[
                "model-00002-of-00002.safetensors"]
            for key, tensor in expected.items():
                assert source.keys[key].shape == tuple(tensor.shape)
                assert torch.equal(source.read(key), tensor), key
        finally:
            source.close()


def test_single_file_folder_and_the_file_itself(tmp_path, methods):
    tensors = _tensors(1)
    os.makedirs(tmp_path / "one")
    save_file(tensors, tmp_path / "one" / "model.safetensors")
    source = open_model(tmp_path / "one", methods)
    try:
        assert source.path == str(tmp_path / "one")
        for key, tensor in tensors.items():
            assert torch.equal(source.read(key), tensor)
    finally:
        source.close()


def test_prefetch_and_close_reach_every_shard(tmp_path):
    folder = write_sharded(tmp_path / "m", _tensors(2))
    f = open_weights(folder)
    assert [os.path.basename(p) for p in f.paths] == list(SHARDS)
    assert f.file_of("head.weight").endswith("model-00002-of-00002.safetensors")
    assert f.file_of("layers.0.w").endswith("model-00001-of-00002.safetensors")
    f.prefetch("head.weight", 0, 3)  # a hint: must not fail on the right shard's offsets
    f.prefetch("layers.0.b")
    f.close()
    assert all(s._map is None for s in f.files)


def test_folder_merge_matches_plain_torch(tmp_path, methods):
    a = write_sharded(tmp_path / "a", _tensors(3))
    b = write_sharded(tmp_path / "b", _tensors(4))
    out = mecha.merge(mecha.weighted_sum(mecha.model(a), mecha.model(b + "/model.safetensors.index.json"),
                                         alpha=0.25), tmp_path / "out.safetensors", threads=3)
    got = load_file(out)
    ta, tb = _sharded_expected(a), _sharded_expected(b)
    for key in ta:
        if key == "steps":  # integer buffers pass through from the first input
            assert torch.equal(got[key], ta[key])
            continue
        ref = (ta[key].double() * 0.75 + tb[key].double() * 0.25).to(ta[key].dtype)
        assert got[key].dtype == ta[key].dtype
        assert torch.allclose(got[key].double(), ref.double(), rtol=1e-2 if ta[key].dtype != torch.float32 else 1e-6,
                              atol=1e-6), key


def _error(tmp_path, methods, folder) -> str:
    with pytest.raises((PlanError, SafetensorsError)) as info:
        source = open_model(folder, methods)
        source.close()
    text = str(info.value)
    assert "\n" not in text
    assert info.value.exit_code == 2
    return text


def test_index_naming_a_missing_shard(tmp_path, methods):
    folder = write_sharded(tmp_path / "m", _tensors(0))
    os.remove(os.path.join(folder, "model-00002-of-00002.safetensors"))
    text = _error(tmp_path, methods, folder)
    assert "model.safetensors.index.json" in text and "'model-00002-of-00002.safetensors'" in text
    assert "does not exist" in text


def test_index_giving_a_key_to_a_shard_without_it(tmp_path, methods):
    t = _tensors(0)
    wm = {k: name for name, keys in SHARDS.items() for k in keys}
    wm["head.weight"] = "model-00001-of-00002.safetensors"
    folder = write_sharded(tmp_path / "m", t, weight_map=wm)
    text = _error(tmp_path, methods, folder)
    assert "model.safetensors.index.json" in text and "'head.weight'" in text and "does not hold it" in text


def test_shard_holding_a_key_the_index_does_not_list(tmp_path, methods):
    wm = {k: name for name, keys in SHARDS.items() for k in keys if k != "steps"}
    folder = write_sharded(tmp_path / "m", _tensors(0), weight_map=wm)
    text = _error(tmp_path, methods, folder)
    assert "model-00002-of-00002.safetensors holds key 'steps'" in text and "index.json" in text


def test_key_in_two_shards(tmp_path, methods):
    shards = {"model-00001-of-00002.safetensors": ["embed.weight", "layers.0.w"],
              "model-00002-of-00002.safetensors": ["layers.0.w", "head.weight"]}
    wm = {"embed.weight": "model-00001-of-00002.safetensors", "layers.0.w": "model-00002-of-00002.safetensors",
          "head.weight": "model-00002-of-00002.safetensors"}
    folder = write_sharded(tmp_path / "m", _tensors(0), shards=shards, weight_map=wm)
    text = _error(tmp_path, methods, folder)
    assert "'layers.0.w' is in both" in text and "exactly one shard" in text


def test_key_listed_twice_in_the_index(tmp_path, methods):
    folder = write_sharded(tmp_path / "m", _tensors(0))
    path = os.path.join(folder, "model.safetensors.index.json")
    text = open(path).read().replace('"weight_map": {', '"weight_map": {"steps": "model-00002-of-00002.safetensors", ')
    open(path, "w").write(text)
    assert "'steps' is listed twice" in _error(tmp_path, methods, folder)


@pytest.mark.parametrize("content, words", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', 'no "weight_map" object'),
    ('{"weight_map": {}}', "the weight_map is empty"),
    ('{"weight_map": {"w": 3}}', "the shard must be a file name"),
    ('{"weight_map": {"w": "../other/model.safetensors"}}', "is not a file name in the index's folder"),
])
def test_malformed_index(tmp_path, methods, content, words):
    os.makedirs(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(content)
    text = _error(tmp_path, methods, tmp_path / "m")
    assert words in text and "model.safetensors.index.json" in text


def test_damaged_shard_is_named(tmp_path, methods):
    folder = write_sharded(tmp_path / "m", _tensors(0))
    shard = os.path.join(folder, "model-00001-of-00002.safetensors")
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 10)
    text = _error(tmp_path, methods, folder)
    assert "model-00001-of-00002.safetensors" in text


def test_total_size_mismatch_is_a_warning_only(tmp_path, methods, capsys):
    folder = write_sharded(tmp_path / "m", _tensors(0), index_extra={"metadata": {"total_size": 7}})
    source = open_model(folder, methods)
    source.close()
    err = capsys.readouterr().err
    assert "total_size is 7" in err and "model.safetensors.index.json" in err


def test_a_folder_without_weights_is_refused_in_a_recipe(tmp_path, methods):
    os.makedirs(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(PlanError, match="empty is a directory, not a safetensors file .*no model.safetensors"):
        mecha.merge(mecha.weighted_sum(mecha.model(str(tmp_path / "empty")), mecha.model(str(tmp_path / "empty")),
                                       alpha=0.5), tmp_path / "o.safetensors")
