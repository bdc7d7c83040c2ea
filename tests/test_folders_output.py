"""Folder outputs: shards as save_pretrained cuts them, the index, the recipe, copied files, and a
folder that appears whole or not at all (failed merges, signals, thread counts)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import mecha_core as mecha
from mecha_core.errors import MechaError, MergeError, OutputError, PlanError
from mecha_core.engine.shards import plan_shards
from mecha_core.output_folder import DEFAULT_SHARD_SIZE, parse_shard_size
from mecha_core.specs import TensorInfo

# 10 keys in this order (not sorted by name); float32 sizes in bytes: 400 each, "big" 4000
ORDER = ["z.embed", "b.0", "a.0", "m.1", "c.1", "big", "q.2", "d.2", "e.3", "n.3"]


def _model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(1000 if k == "big" else 100, generator=g) for k in ORDER}


def _hf_folder(folder, seed: int, *, extra_files=True) -> str:
    """An HF folder (two shards written by safetensors itself, an index listing the keys in
    ORDER) with config files."""
    os.makedirs(folder)
    tensors = _model(seed)
    shards = {"model-00001-of-00002.safetensors": ORDER[:5], "model-00002-of-00002.safetensors": ORDER[5:]}
    for name, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, os.path.join(folder, name), metadata={"format": "pt"})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": {k: name for name, keys in shards.items() for k in keys}}, f)
    if extra_files:
        for name, text in (("config.json", f'{{"seed": {seed}}}'), ("tokenizer.json", f'{{"tok": {seed}}}'),
                           ("chat_template.jinja", f"{{{{ seed{seed} }}}}"), ("README.md", "card"),
                           ("pytorch_model.bin", "old weights")):
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
    return str(folder)


def _digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _folder_digests(folder) -> dict[str, str]:
    return {n: _digest(os.path.join(folder, n)) for n in sorted(os.listdir(folder))}


@pytest.fixture
def two(tmp_path, methods, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _hf_folder(tmp_path / "a", 0)
    _hf_folder(tmp_path / "b", 1)
    return tmp_path


def _recipe(alpha=0.25, first="a", second="b"):
    return mecha.weighted_sum(mecha.model(first), mecha.model(second), alpha=alpha)


def test_shard_sizes_names_and_index(two):
    out = mecha.merge(_recipe(), "out/", shard_size=1200)
    names = sorted(os.listdir(out))
    # save_pretrained's cut, in the first input's key order: 3 keys of 400 fill 1200; "big" (4000)
    # is alone; the shard being filled goes on after it
    expected = {"model-00001-of-00004.safetensors": ["z.embed", "b.0", "a.0"],
                "model-00002-of-00004.safetensors": ["big"],
                "model-00003-of-00004.safetensors": ["m.1", "c.1", "q.2"],
                "model-00004-of-00004.safetensors": ["d.2", "e.3", "n.3"]}
    assert names == sorted([*expected, "model.safetensors.index.json", "recipe.mecha", "config.json",
                            "tokenizer.json", "chat_template.jinja"])
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        text = f.read()
    index = json.loads(text)
    assert index["weight_map"] == {k: name for name, keys in expected.items() for k in keys}
    assert list(index["weight_map"]) == sorted(index["weight_map"])
    assert index["metadata"] == {"total_size": 9 * 400 + 4000, "total_parameters": 9 * 100 + 1000}
    a, b = _model(0), _model(1)
    for name, keys in expected.items():
        shard = load_file(os.path.join(out, name))
        assert sorted(shard) == sorted(keys)
        for k in keys:
            assert torch.allclose(shard[k], 0.75 * a[k] + 0.25 * b[k], atol=1e-6)
        data = sum(t.numel() * t.element_size() for t in shard.values())
        assert data <= 1200 or keys == ["big"]


def test_one_shard_is_model_safetensors_without_an_index(two):
    out = mecha.merge(_recipe(), "out/")
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    got = load_file(os.path.join(out, "model.safetensors"))
    assert set(got) == set(ORDER)


def test_recipe_in_every_shard_and_beside_them(two):
    out = mecha.merge(_recipe(), "out/", shard_size="2KB")
    with open(os.path.join(out, "recipe.mecha")) as f:
        recipe = f.read()
    assert 'model("a")' in recipe and "weighted_sum" in recipe and "alpha=0.25" in recipe
    shards = [n for n in os.listdir(out) if n.endswith(".safetensors")]
    assert len(shards) > 1
    for name in shards:
        with safe_open(os.path.join(out, name), "pt") as f:
            meta = f.metadata()
        assert meta["mecha_recipe"] == recipe and meta["format"] == "pt"
    # the folder's recipe runs again to the same bytes
    again = mecha.merge(os.path.join(out, "recipe.mecha"), "again/", shard_size="2KB")
    assert len(shards) == 3
    assert _folder_digests(again) == _folder_digests(out)


def test_files_copied_from_the_first_folder_or_the_named_one(two):
    out = mecha.merge(_recipe(), "out/")
    for name in ("config.json", "tokenizer.json", "chat_template.jinja"):
        assert open(os.path.join(out, name)).read() == open(os.path.join("a", name)).read()
    assert not {"README.md", "pytorch_model.bin"} & set(os.listdir(out))  # not the input's card nor weights
    out = mecha.merge(_recipe(), "out2/", copy_files_from="b")
    assert open(os.path.join(out, "config.json")).read() == '{"seed": 1}'


def test_files_copied_from_the_folder_of_a_file_beside_a_config(two):
    os.makedirs("c")
    save_file(_model(2), "c/model.safetensors")
    with open("c/config.json", "w") as f:
        f.write('{"seed": 2}')
    recipe = mecha.weighted_sum(mecha.model("c/model.safetensors"), mecha.model("b"), alpha=0.5)
    out = mecha.merge(recipe, "out/")
    assert open(os.path.join(out, "config.json")).read() == '{"seed": 2}'


def test_copy_files_from_a_name_not_in_the_recipe(two):
    with pytest.raises(PlanError, match=r"--copy-files-from c: no model of the recipe is named so "
                                        r"\(its models: a, b\)"):
        mecha.merge(_recipe(), "out/", copy_files_from="c")
    assert not os.path.exists("out")


def test_no_folder_input_copies_nothing(tmp_path, methods, monkeypatch):
    monkeypatch.chdir(tmp_path)
    save_file(_model(0), "x.safetensors")
    save_file(_model(1), "y.safetensors")
    out = mecha.merge(_recipe(first="x.safetensors", second="y.safetensors"), "out/")
    assert sorted(os.listdir(out)) == ["model.safetensors", "recipe.mecha"]


def test_byte_identical_for_any_thread_count(two):
    digests = []
    for threads in (1, 3):
        out = mecha.merge(_recipe(alpha=0.3), f"out{threads}/", shard_size=1200, threads=threads,
                          chunk_elements=37)
        digests.append(_folder_digests(out))
    assert digests[0] == digests[1]


def test_failed_merge_leaves_no_folder_and_keeps_the_old_one(two):
    out = mecha.merge(_recipe(), "out/", shard_size=1200)
    before = _folder_digests(out)
    bad = _model(1)
    bad["q.2"][5] = float("inf")  # in a later shard: earlier shards are already written
    os.remove("b/model-00002-of-00002.safetensors")
    save_file({k: bad[k] for k in ORDER[5:]}, "b/model-00002-of-00002.safetensors")
    with pytest.raises(MergeError, match="key 'q.2'") as info:
        mecha.merge(_recipe(), "out/", shard_size=1200)
    assert info.value.exit_code == 1
    assert _folder_digests(out) == before
    assert sorted(os.listdir(".")) == ["a", "b", "out"]  # no temporary folder left
    with pytest.raises(MergeError):
        mecha.merge(_recipe(), "new/", shard_size=1200)
    assert sorted(os.listdir(".")) == ["a", "b", "out"]


def test_existing_output_folder_is_replaced_after_success(two):
    out = mecha.merge(_recipe(alpha=0.1), "out/", shard_size=1200)
    with open(os.path.join(out, "stale-extra.txt"), "w") as f:
        f.write("from the old output")
    out = mecha.merge(_recipe(alpha=0.9), "out", shard_size="1GB")  # an existing folder: no slash needed
    assert "stale-extra.txt" not in os.listdir(out)
    assert "model.safetensors" in os.listdir(out)
    a, b = _model(0), _model(1)
    got = load_file(os.path.join(out, "model.safetensors"))
    assert torch.allclose(got["big"], 0.1 * a["big"] + 0.9 * b["big"], atol=1e-6)


def test_output_folder_refusals(two):
    os.makedirs("photos/2024")
    with pytest.raises(OutputError, match="photos/: is a folder that holds other things than a model"):
        mecha.merge(_recipe(), "photos/")
    with pytest.raises(OutputError, match=r"a/: the output folder would replace the input .*a"):
        mecha.merge(_recipe(), "a/")  # a model folder, but an input of this merge
    open("file", "w").close()
    with pytest.raises(OutputError, match="file/: exists and is not a folder"):
        mecha.merge(_recipe(), "file/")
    with pytest.raises(OutputError, match="for folder outputs"):
        mecha.merge(_recipe(), "x.safetensors", shard_size="1GB")
    with pytest.raises(OutputError, match="or with / for a Hugging Face folder"):
        mecha.merge(_recipe(), "x.bin")
    assert sorted(os.listdir(".")) == ["a", "b", "file", "photos"]


def test_a_single_file_output_over_an_input_shard_is_refused(tmp_path, methods, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.makedirs("m")
    t = _model(0)
    save_file({k: t[k] for k in ORDER[:5]}, "m/model-00001-of-00002.safetensors")
    save_file({k: t[k] for k in ORDER[5:]}, "m/model-00002-of-00002.safetensors")
    with open("m/model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {k: f"model-0000{1 + (i >= 5)}-of-00002.safetensors"
                                  for i, k in enumerate(ORDER)}}, f)
    with pytest.raises(OutputError, match="would overwrite the input .*model-00002-of-00002"):
        mecha.merge(_recipe(first="m", second="m"), "m/model-00002-of-00002.safetensors")


@pytest.mark.parametrize("text, size", [("5GB", 5 * 10 ** 9), ("500MB", 500 * 10 ** 6), ("2GiB", 2 << 30),
                                        ("1234", 1234), (99, 99), (" 1.5 kb", 1500)])
def test_shard_size_parsing(text, size):
    assert parse_shard_size(text) == size


@pytest.mark.parametrize("text", ["", "0", "-5GB", "five", "3XB"])
def test_shard_size_refusals(text):
    with pytest.raises(MechaError, match="--shard-size: cannot read"):
        parse_shard_size(text)


def test_default_shard_size_is_transformers_default():
    import inspect

    from transformers import PreTrainedModel

    default = inspect.signature(PreTrainedModel.save_pretrained).parameters["max_shard_size"].default
    assert parse_shard_size(default) == DEFAULT_SHARD_SIZE


def test_layout_comes_from_the_key_table_alone():
    table = {f"k{i}": TensorInfo((100,), "float16") for i in range(5)}  # 200 bytes each
    layout = plan_shards(table, 450, {"mecha_recipe": "x"})
    assert [s.keys for s in layout.shards] == [("k0", "k1"), ("k2", "k3"), ("k4",)]
    assert [s.name for s in layout.shards] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert all(s.size == len(s.header) + 200 * len(s.keys) for s in layout.shards)
    assert layout.total_size == 1000 and layout.total_parameters == 500
    assert plan_shards(table, 450, {"mecha_recipe": "x"}) == layout  # a value: equal from equal inputs


def test_cli_folder_merge_json_and_options(two):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    with open("r.mecha", "w") as f:
        f.write('mecha 1\na = model("a")\nb = model("b")\nweighted_sum(a, b, alpha=0.5)\n')
    result = CliRunner().invoke(app, ["merge", "r.mecha", "-o", "out/", "--shard-size", "2KB",
                                      "--copy-files-from", "b", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["output"] == os.path.abspath("out")
    assert data["bytes"] == sum(os.path.getsize(os.path.join("out", n)) for n in os.listdir("out"))
    assert open("out/config.json").read() == '{"seed": 1}'
    assert len([n for n in os.listdir("out") if n.startswith("model-")]) == 3
    result = CliRunner().invoke(app, ["merge", "r.mecha", "-o", "x.safetensors", "--shard-size", "2KB"])
    assert result.exit_code == 2 and "for folder outputs" in result.output


def test_stale_temporary_folder_is_swept(two):
    from mecha_core.output import STALE_AFTER_S

    stale = ".out.mecha-999999999-0123456789ab.tmp"
    os.makedirs(stale)
    with open(os.path.join(stale, "model-00001-of-00002.safetensors"), "wb") as f:
        f.write(b"x" * 10)
    old = time.time() - STALE_AFTER_S - 10
    os.utime(os.path.join(stale, "model-00001-of-00002.safetensors"), (old, old))
    os.utime(stale, (old, old))
    mecha.merge(_recipe(), "out/")
    assert not os.path.exists(stale)


SLOW_PLUGIN = '''
import time

from mecha_core import hookimpl, merge_method


@merge_method
def slow_copy(a, *, seconds: float = 0.05):
    """a, after sleeping ``seconds``."""
    time.sleep(seconds)
    return a.clone()


@hookimpl
def mecha_merge_methods():
    return [slow_copy]
'''


def test_sigterm_removes_the_temporary_folder_and_keeps_the_old_one(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "mecha_slowfolder_test.py").write_text(SLOW_PLUGIN)
    info = site / "mecha_slowfolder_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mecha-slowfolder-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mecha]\nslowfolder = mecha_slowfolder_test\n")
    os.makedirs(tmp_path / "m")
    save_file({f"k{i:03d}": torch.full((8,), float(i)) for i in range(400)}, tmp_path / "m" / "model.safetensors")
    (tmp_path / "slow.mecha").write_text('mecha 1\na = model("m")\nslow_copy(a)\n')
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"last week's merge")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MECHA_LOAD_PLUGINS"] = "methods,slowfolder"
    proc = subprocess.Popen([sys.executable, "-m", "mecha_core", "merge", str(tmp_path / "slow.mecha"), "-o",
                             str(out), "--threads", "2", "--quiet", "--shard-size", "1KB"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not [n for n in os.listdir(tmp_path) if n.startswith(".out.mecha-")]:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert sorted(os.listdir(tmp_path)) == ["m", "out", "site", "slow.mecha"]
    assert os.listdir(out) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"last week's merge"


def test_write_shard_alone_gives_the_bytes_of_the_whole_folder(two):
    """A worker holding only the plan and one shard of the layout writes that shard's bytes."""
    from mecha_core.api import merge_metadata
    from mecha_core.engine.plan import MergeOptions, make_plan
    from mecha_core.engine.run_folder import shard_layout, write_shard

    out = mecha.merge(_recipe(alpha=0.6), "out/", shard_size=1200, threads=2)
    with make_plan(_recipe(alpha=0.6), MergeOptions(threads=3)) as plan:
        layout = shard_layout(plan, 1200, merge_metadata(plan))
        os.makedirs("alone")
        for shard in reversed(layout.shards):  # any order, any process
            write_shard(plan, shard, os.path.join("alone", shard.name))
        with open(os.path.join(out, "model.safetensors.index.json")) as f:
            assert layout.index_json() == f.read()
    for shard in layout.shards:
        assert _digest(os.path.join("alone", shard.name)) == _digest(os.path.join(out, shard.name))
