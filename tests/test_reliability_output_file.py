"""The one output writer (``mecha_core.output.OutputFile``) and every file it must not replace:
special files as targets, names too long, link loops, and every file a merge reads."""

from __future__ import annotations

import os
import socket
import stat
import tempfile

import pytest
import torch
from typer.testing import CliRunner

import mecha_core
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.engine.safetensors_io import SafetensorsFile
from mecha_core.errors import OutputError
from mecha_core.output import TEMP_PATTERN, OutputFile, write_text_atomically
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, leftover_temp_files, snapshot

runner = CliRunner()
TEMPLATE = 'mecha 1\na = model("a.safetensors")\nweighted_sum(a, parameter("x"), alpha=0.5)\n'
SUB = 'mecha 1\nb = model("b.safetensors")\nb\n'


@pytest.fixture
def work(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"k": torch.full((4,), 1.0)})
    write_checkpoint(tmp_path / "b.safetensors", {"k": torch.full((4,), 3.0)})
    (tmp_path / "tmpl.mecha").write_text(TEMPLATE)
    (tmp_path / "sub.mecha").write_text(SUB)
    with using(mecha_methods.plugin):
        yield tmp_path


def merge(*args: str):
    return runner.invoke(app, ["merge", *map(str, args), "-q"])


# -- targets that are not regular files ------------------------------------------------------------

@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_a_device_node_is_never_replaced(work, device):
    """As root, today's rename would replace /dev/null with a regular file."""
    before = os.stat(device)
    result = merge(work / "sub.mecha", "-o", device)
    check_clean_failure(result.exit_code, result.stderr, fragments=(device, "character device"))
    after = os.stat(device)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev
    assert leftover_temp_files("/dev") == []


def test_a_fifo_output_is_refused_and_stays_a_fifo(work):
    (work / "fifo").mkdir()
    os.mkfifo(work / "fifo" / "pipe")
    result = merge(work / "sub.mecha", "-o", work / "fifo" / "pipe")
    check_clean_failure(result.exit_code, result.stderr, fragments=("pipe", "FIFO"))
    assert os.listdir(work / "fifo") == ["pipe"]  # (snapshot() would block opening the FIFO)
    assert stat.S_ISFIFO(os.stat(work / "fifo" / "pipe").st_mode)


def test_a_socket_output_is_refused():
    folder = tempfile.mkdtemp(dir="/tmp")  # a socket path must stay under ~108 bytes
    path = os.path.join(folder, "s")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(path)
        with pytest.raises(OutputError, match="is a socket"):
            OutputFile(path)
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(folder)


def test_compose_refuses_a_device_output(work):
    result = runner.invoke(app, ["compose", str(work / "tmpl.mecha"), "-o", "/dev/null",
                                 "-p", "x", str(work / "sub.mecha")])
    check_clean_failure(result.exit_code, result.stderr, fragments=("/dev/null", "character device"))
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_mecha_lora_checks_its_output_before_reading_any_input(tmp_path):
    import mecha_lora

    # the input does not even exist: the output is refused first, nothing is read
    with pytest.raises(OutputError, match="character device"):
        mecha_lora.merge_loras([tmp_path / "missing.safetensors"], "/dev/null")
    with pytest.raises(OutputError, match="overwrite the input"):
        mecha_lora.extract_lora(tmp_path / "t.safetensors", tmp_path / "b.safetensors", tmp_path / "b.safetensors")


def test_a_name_too_long_is_one_line(work):
    name = "x" * 300 + ".safetensors"
    result = merge(work / "sub.mecha", "-o", work / name)
    message = check_clean_failure(result.exit_code, result.stderr, max_lines=1)
    assert "too long" in message


def test_an_output_link_loop_is_named_as_such(work):
    loops = work / "loops"
    loops.mkdir()
    os.symlink(loops / "loop2", loops / "loop1")
    os.symlink(loops / "loop1", loops / "loop2")
    result = merge(work / "sub.mecha", "-o", loops / "loop1")
    check_clean_failure(result.exit_code, result.stderr, fragments=("loop1", "symbolic link loop"))
    assert sorted(os.listdir(loops)) == ["loop1", "loop2"] and os.path.islink(loops / "loop1")


# -- every file the merge reads is protected -------------------------------------------------------

def test_the_recipe_named_by_p_is_not_overwritten(work):
    """Today ``merge tmpl.mecha -p x=sub.mecha -o sub.mecha`` exits 0 having replaced sub.mecha."""
    before = snapshot(work)
    result = merge(work / "tmpl.mecha", "-p", f"x={work / 'sub.mecha'}", "-o", work / "sub.mecha")
    check_clean_failure(result.exit_code, result.stderr, fragments=("sub.mecha", "overwrite", "-p x"),
                        folder=work, before=before)


def test_a_hard_link_to_the_p_recipe_is_refused_too(work):
    os.link(work / "sub.mecha", work / "other.mecha")
    before = snapshot(work)
    result = merge(work / "tmpl.mecha", "-p", f"x={work / 'sub.mecha'}", "-o", work / "other.mecha")
    check_clean_failure(result.exit_code, result.stderr, fragments=("other.mecha", "sub.mecha"),
                        folder=work, before=before)


def test_a_recipe_composed_in_through_the_api_is_protected(work):
    """The API knows the composed recipe's file only from its nodes' locations."""
    recipe = mecha_core.compose(str(work / "tmpl.mecha"), x=str(work / "sub.mecha"))
    before = snapshot(work)
    with pytest.raises(OutputError, match="sub.mecha"):
        mecha_core.merge(recipe, work / "sub.mecha")
    assert snapshot(work) == before


def test_the_main_recipe_through_the_api_is_protected(work):
    before = snapshot(work)
    with pytest.raises(OutputError, match="the recipe"):
        mecha_core.merge(work / "sub.mecha", work / "sub.mecha")
    assert snapshot(work) == before


def test_a_model_given_by_p_is_protected(work):
    before = snapshot(work)
    result = merge(work / "tmpl.mecha", "-p", f"x={work / 'b.safetensors'}", "-o", work / "b.safetensors")
    check_clean_failure(result.exit_code, result.stderr, fragments=("b.safetensors", "overwrite"),
                        folder=work, before=before)


def test_the_same_merge_elsewhere_works(work):
    """The refusals above are about the output path, not the recipe: 0.5 * 1 + 0.5 * 3 = 2."""
    result = merge(work / "tmpl.mecha", "-p", f"x={work / 'sub.mecha'}", "-o", work / "out.safetensors")
    assert result.exit_code == 0, result.output
    f = SafetensorsFile(work / "out.safetensors")
    try:
        assert f.read("k").tolist() == [2.0] * 4
    finally:
        f.close()
    assert leftover_temp_files(work) == []


# -- OutputFile itself ---------------------------------------------------------------------------

def test_the_temporary_file_is_recognisable_and_removed_without_commit(tmp_path):
    out = OutputFile(tmp_path / "result.bin")
    with out:
        name = os.path.basename(out.path)
        m = TEMP_PATTERN.fullmatch(name)
        assert m is not None and m.group("name") == "result.bin" and int(m.group("pid")) == os.getpid()
        assert os.path.dirname(out.path) == str(tmp_path)
        os.write(out.fd, b"partial")
    assert os.listdir(tmp_path) == []


def test_commit_keeps_an_existing_outputs_mode_and_writes_through_a_link(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    os.chmod(real, 0o640)
    os.symlink(real, tmp_path / "link.txt")
    path = write_text_atomically(tmp_path / "link.txt", "new ü\n")
    assert path == str(real)
    assert real.read_bytes() == "new ü\n".encode()
    assert stat.S_IMODE(os.stat(real).st_mode) == 0o640
    assert os.path.islink(tmp_path / "link.txt")
    assert sorted(os.listdir(tmp_path)) == ["link.txt", "real.txt"]


def test_a_new_output_gets_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        write_text_atomically(tmp_path / "new.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o640


def test_protect_names_both_files(tmp_path):
    (tmp_path / "in.txt").write_text("input")
    os.link(tmp_path / "in.txt", tmp_path / "hard.txt")
    with pytest.raises(OutputError) as err:
        OutputFile(tmp_path / "hard.txt", protect={tmp_path / "in.txt": "the recipe in.txt"})
    assert "hard.txt" in str(err.value) and "the recipe in.txt" in str(err.value)
    assert (tmp_path / "in.txt").read_text() == "input"
