"""Damaged, hostile and missing model files, through the CLI: exit 2, one clear line naming the
file, nothing written, nothing unpickled."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from typer.testing import CliRunner

import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import (
    BASE_DATA, UNPICKLED_MARKER, base_header, check_clean_failure, damaged_cases, safetensors_bytes,
    snapshot, write_corpus,
)
from mecha_core.engine.safetensors_io import SafetensorsFile

CASES = damaged_cases()
runner = CliRunner()
PREVIOUS = b"the previous merge, which must survive"


@pytest.fixture
def workspace(tmp_path):
    """models/ (a good file and the corpus), out/ (a previous output) and a recipe per case."""
    models = tmp_path / "models"
    corpus = write_corpus(models)
    write_checkpoint(models / "good.safetensors",
                     {"a": torch.arange(4.0).reshape(2, 2), "b": torch.arange(4.0)})
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "merged.safetensors").write_bytes(PREVIOUS)
    with using(mecha_methods.plugin):
        yield tmp_path, corpus


def _recipe(folder, damaged: str, first: bool = False) -> str:
    inputs = [f'model("{damaged}")', 'model("good.safetensors")']
    if not first:
        inputs.reverse()
    path = folder / "recipe.mecha"
    path.write_text("mecha 1\n" + f"x = {inputs[0]}\ny = {inputs[1]}\nweighted_sum(x, y, alpha=0.5)\n")
    return str(path)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_merge_refuses_a_damaged_input(workspace, case):
    tmp, corpus = workspace
    recipe = _recipe(tmp, case.name)
    before = snapshot(tmp)
    result = runner.invoke(app, ["merge", recipe, "-o", str(tmp / "out" / "merged.safetensors"),
                                 "--models-dir", str(tmp / "models")])
    # a missing model is reported by the recipe's model lookup, with the folders it searched
    expect = ("not found", "looked in") if case.kind == "missing" else (case.expect,)
    message = check_clean_failure(result.exit_code, result.stderr, fragments=(case.name, *expect),
                                  folder=tmp, before=before)
    assert len(message) < 400, "a hostile header must not flood the terminal"
    assert not os.path.exists(tmp / "models" / UNPICKLED_MARKER)


@pytest.mark.parametrize("case", [c for c in CASES if c.name in
                                  ("truncated.safetensors", "pickle.safetensors", "model.ckpt",
                                   "offsets_overlap.safetensors")], ids=lambda c: c.name)
def test_damaged_first_input_is_refused_too(workspace, case):
    tmp, _ = workspace
    recipe = _recipe(tmp, case.name, first=True)
    before = snapshot(tmp)
    result = runner.invoke(app, ["merge", recipe, "-o", str(tmp / "out" / "merged.safetensors"),
                                 "--models-dir", str(tmp / "models")])
    check_clean_failure(result.exit_code, result.stderr, fragments=(case.name, case.expect),
                        folder=tmp, before=before)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_inspect_refuses_a_damaged_file(workspace, case):
    tmp, corpus = workspace
    path, _ = corpus[case.name]
    before = snapshot(tmp)
    result = runner.invoke(app, ["inspect", path])
    check_clean_failure(result.exit_code, result.stderr, fragments=(path, case.expect),
                        folder=tmp, before=before)
    assert not os.path.exists(tmp / "models" / UNPICKLED_MARKER)


def test_the_corpus_pickles_really_are_hostile(tmp_path):
    """The 'nothing was unpickled' checks above can fail: unpickling a corpus file does leave the
    marker behind."""
    corpus = write_corpus(tmp_path)
    path, case = corpus["pickle.safetensors"]
    assert case.hostile
    with open(path, "rb") as f:
        pickle.load(f)  # the test's own deliberate unpickling of its own file
    assert os.path.exists(tmp_path / UNPICKLED_MARKER)


def test_the_corpus_base_file_is_valid(tmp_path):
    """Each damaged case differs from a file the reader accepts, with the values it holds."""
    path = tmp_path / "base.safetensors"
    path.write_bytes(safetensors_bytes(base_header(), BASE_DATA))
    f = SafetensorsFile(path)
    try:
        assert f.read("a").tolist() == [[1.0, 2.0], [3.0, 4.0]]
        assert f.read("b").tolist() == [5.0, 6.0, 7.0, 8.0]
    finally:
        f.close()


def test_a_file_without_read_permission(workspace, monkeypatch):
    tmp, _ = workspace
    path = tmp / "models" / "locked.safetensors"
    path.write_bytes(safetensors_bytes(base_header()))
    os.chmod(path, 0)
    if os.access(path, os.R_OK):  # running as root, which reads anything: refuse the open itself
        real_open = os.open

        def refuse(p, *args, **kwargs):
            if os.fspath(p) == str(path):
                raise PermissionError(13, "Permission denied", str(p))
            return real_open(p, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    try:
        result = runner.invoke(app, ["inspect", str(path)])
    finally:
        monkeypatch.undo()
        os.chmod(path, 0o644)
    check_clean_failure(result.exit_code, result.stderr, fragments=(str(path), "permission denied"))


def test_debug_option_raises_instead_of_one_line(tmp_path, monkeypatch):
    """With --debug the error propagates (the traceback is shown) instead of becoming one line."""
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    monkeypatch.setenv("MECHA_DEBUG", "0")  # --debug sets it to 1; restored after the test
    plain = runner.invoke(app, ["inspect", str(path)])
    check_clean_failure(plain.exit_code, plain.stderr, fragments=(str(path), "too short"))
    debug = runner.invoke(app, ["--debug", "inspect", str(path)])
    from mecha_core.errors import SafetensorsError

    assert isinstance(debug.exception, SafetensorsError) and debug.exit_code != 2
    assert "error: " not in debug.stderr


def test_mecha_debug_variable_raises_instead_of_one_line(tmp_path, monkeypatch):
    path = tmp_path / "empty.safetensors"
    path.write_bytes(b"")
    monkeypatch.setenv("MECHA_DEBUG", "1")
    result = runner.invoke(app, ["inspect", str(path)])
    from mecha_core.errors import SafetensorsError

    assert isinstance(result.exception, SafetensorsError)
    assert "too short" in str(result.exception)


def test_a_fifo_is_refused_without_blocking(workspace):
    """Opening a FIFO for reading would wait for a writer forever; it is refused up front."""
    tmp, _ = workspace
    fifo = tmp / "models" / "pipe.safetensors"
    os.mkfifo(fifo)
    recipe = _recipe(tmp, "pipe.safetensors")
    result = runner.invoke(app, ["merge", recipe, "-o", str(tmp / "out" / "merged.safetensors"),
                                 "--models-dir", str(tmp / "models")])
    check_clean_failure(result.exit_code, result.stderr, fragments=("pipe.safetensors", "not a regular file"),
                        # only out/ is compared: snapshot() would block reading the FIFO as well
                        folder=tmp / "out", before={"merged.safetensors": PREVIOUS})
