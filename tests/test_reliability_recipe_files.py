"""Recipe files are checked before they are read: FIFOs, devices, huge files, model files and
link loops are one-line errors in bounded time and memory."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
import tracemalloc

import pytest
import torch

from mecha_core.errors import PlanError, RecipeError, SafetensorsError
from mecha_core.files import RECIPE_SIZE_LIMIT
from mecha_core.recipe import load_recipe
from mecha_core.testing import write_checkpoint

MiB = 1024 * 1024


def _load_bounded(path) -> tuple[str, int]:
    """load_recipe(path)'s error message and the peak bytes Python allocated meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises(RecipeError) as err:
            load_recipe(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert "\n" not in message
    return message, peak


def test_a_fifo_recipe_does_not_hang_the_cli(tmp_path):
    """Today opening a FIFO blocks until a writer comes: the merge never starts nor ends."""
    fifo = tmp_path / "recipe.mecha"
    os.mkfifo(fifo)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mecha_core", "merge", str(fifo),
                           "-o", str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "MECHA_DEBUG": ""},
                          check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "FIFO" in lines[0] and "recipe.mecha" in lines[0], proc.stderr
    assert time.monotonic() - started < 120
    assert sorted(os.listdir(tmp_path)) == ["recipe.mecha"]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_a_device_recipe_is_refused_before_reading(device):
    message, peak = _load_bounded(device)
    assert device in message and "character device" in message
    assert peak < MiB


def test_a_recipe_over_the_size_bound_is_refused_unread(tmp_path):
    path = tmp_path / "huge.mecha"
    with open(path, "wb") as f:  # text at the start (so no sniffing refuses it), sparse after
        f.write(b"mecha 1\n" + b"# padding\n" * 1000)
        f.truncate(RECIPE_SIZE_LIMIT + 1)
    message, peak = _load_bounded(path)
    assert "huge.mecha" in message and "too large" in message and f"{RECIPE_SIZE_LIMIT:,}" in message
    assert peak < MiB  # today the whole 64 MiB was read first


def test_a_recipe_at_the_size_bound_is_still_read(tmp_path):
    """The bound refuses only what is over it: a legal recipe padded with comments to just
    under 64 MiB loads (the limit is not off by one in the other direction)."""
    line = b"# " + b"c" * 1021 + b"\n"  # 1 KiB
    body = b"mecha 1\n" + b'a = model("a.safetensors")\n'
    tail = b"a\n"
    padding = RECIPE_SIZE_LIMIT - len(body) - len(tail)
    path = tmp_path / "big.mecha"
    with open(path, "wb") as f:
        f.write(body)
        f.write(line * (padding // len(line)))
        f.write(b"#" * (padding % len(line) - 1) + b"\n")
        f.write(tail)
    assert os.path.getsize(path) == RECIPE_SIZE_LIMIT
    node = load_recipe(path)
    assert node.path == "a.safetensors"


def test_a_safetensors_model_given_as_recipe_is_named_and_not_read_whole(tmp_path):
    path = tmp_path / "model.safetensors"
    write_checkpoint(path, {"w": torch.zeros(4)})
    with open(path, "r+b") as f:  # a 200 MB model, sparse: only its header is real
        f.truncate(200 * 1000 * 1000)
    message, peak = _load_bounded(path)
    assert "model.safetensors" in message and "safetensors model" in message
    assert peak < MiB


@pytest.mark.parametrize("kind,data,expect", [
    ("pickle", pickle.dumps({"state_dict": {}}, protocol=2), "pickle"),
    ("zip", b"PK\x03\x04" + b"\x00" * 60, "zip archive"),
    ("nul", b"mecha 1\n\x00\x00weights", "binary data"),
])
def test_other_binary_files_given_as_recipe(tmp_path, kind, data, expect):
    path = tmp_path / f"model.{kind}"
    path.write_bytes(data)
    message, _ = _load_bounded(path)
    assert f"model.{kind}" in message and expect in message


def test_a_recipe_link_loop_is_not_reported_as_missing(tmp_path):
    os.symlink(tmp_path / "b.mecha", tmp_path / "a.mecha")
    os.symlink(tmp_path / "a.mecha", tmp_path / "b.mecha")
    message, _ = _load_bounded(tmp_path / "a.mecha")
    assert "symbolic link loop" in message and "no such" not in message


def test_a_broken_recipe_link_says_so(tmp_path):
    os.symlink(tmp_path / "gone.mecha", tmp_path / "a.mecha")
    message, _ = _load_bounded(tmp_path / "a.mecha")
    assert "no such recipe file" in message and "symbolic link to a missing file" in message


def test_a_model_link_loop_is_not_reported_as_missing(tmp_path):
    import mecha_methods.plugin
    import mecha_core
    from mecha_core.testing import using

    os.symlink(tmp_path / "l2.safetensors", tmp_path / "l1.safetensors")
    os.symlink(tmp_path / "l1.safetensors", tmp_path / "l2.safetensors")
    (tmp_path / "r.mecha").write_text('mecha 1\na = model("l1.safetensors")\na\n')
    with using(mecha_methods.plugin), pytest.raises((PlanError, SafetensorsError)) as err:
        mecha_core.merge(tmp_path / "r.mecha", tmp_path / "out.safetensors")
    assert "symbolic link loop" in str(err.value) and "not found" not in str(err.value)
    from mecha_core.engine.safetensors_io import SafetensorsFile

    with pytest.raises(SafetensorsError, match="symbolic link loop"):
        SafetensorsFile(tmp_path / "l1.safetensors")
