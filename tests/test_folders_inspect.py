"""``mecha inspect`` on a model folder and on an index: shards, dtypes, parameters."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mecha_core.cli import app


def _folder(folder) -> dict[str, dict[str, torch.Tensor]]:
    os.makedirs(folder)
    shards = {"model-00001-of-00002.safetensors": {"embed": torch.zeros(7, 3), "norm": torch.ones(3).half()},
              "model-00002-of-00002.safetensors": {"head": torch.zeros(7, 3).bfloat16(), "ids": torch.arange(5)}}
    for name, tensors in shards.items():
        save_file(tensors, os.path.join(folder, name))
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: name for name, t in shards.items() for k in t}}, f)
    return shards


def test_inspect_folder_and_index_json(tmp_path):
    shards = _folder(tmp_path / "m")
    for target in (tmp_path / "m", tmp_path / "m" / "model.safetensors.index.json"):
        result = CliRunner().invoke(app, ["inspect", str(target), "--json"])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        assert data["folder"] == str(tmp_path / "m")
        loaded = {name: load_file(tmp_path / "m" / name) for name in shards}
        assert data["parameters"] == sum(t.numel() for s in loaded.values() for t in s.values())
        assert data["keys"] == 4
        assert data["dtypes"] == {"bfloat16": 1, "float16": 1, "float32": 1, "int64": 1}
        assert [s["file"] for s in data["shards"]] == list(shards)
        for shard in data["shards"]:
            tensors = loaded[shard["file"]]
            assert shard["keys"] == len(tensors)
            assert shard["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert data["architecture"] is None


def test_inspect_folder_text(tmp_path):
    _folder(tmp_path / "m")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 0, result.output
    assert "parameters: 50" in result.stdout  # 21 + 3 + 21 + 5
    assert "model-00002-of-00002.safetensors: 2 keys" in result.stdout


def test_inspect_a_broken_index_is_one_line(tmp_path):
    _folder(tmp_path / "m")
    os.remove(tmp_path / "m" / "model-00002-of-00002.safetensors")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "m")])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "model.safetensors.index.json" in lines[0] and "does not exist" in lines[0]


def test_recipe_show_on_a_merged_folder(tmp_path, methods, monkeypatch):
    import mecha_core as mecha

    monkeypatch.chdir(tmp_path)
    _folder(tmp_path / "m")
    out = mecha.merge(mecha.weighted_sum(mecha.model("m"), mecha.model("m"), alpha=0.5), "out/", shard_size=100)
    assert len([n for n in os.listdir(out) if n.startswith("model-")]) == 2
    result = CliRunner().invoke(app, ["recipe", "show", out])
    assert result.exit_code == 0, result.output
    with open(os.path.join(out, "recipe.mecha")) as f:
        assert result.stdout == f.read()
