"""Where the output goes: never over an input, never half-written, never lost on a full disk."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from typer.testing import CliRunner

import mecha_core.engine.run as engine_run
import mecha_core.output as mecha_output
import mecha_methods.plugin
from mecha_core.cli import app
from mecha_core.engine.safetensors_io import SafetensorsFile
from mecha_core.testing import using, write_checkpoint
from mecha_core.testing_corpus import check_clean_failure, leftover_temp_files, snapshot

runner = CliRunner()
PREVIOUS = b"yesterday's merge: must come through every failure byte for byte"
RECIPE = 'mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\nweighted_sum(a, b, alpha=0.5)\n'
KEYS = 12


@pytest.fixture
def work(tmp_path):
    """a and b with twelve keys each (so a merge makes many writes), a recipe, a previous output."""
    write_checkpoint(tmp_path / "a.safetensors", {f"k{i:02d}": torch.full((64,), float(i)) for i in range(KEYS)})
    write_checkpoint(tmp_path / "b.safetensors", {f"k{i:02d}": torch.full((64,), float(3 * i)) for i in range(KEYS)})
    (tmp_path / "recipe.mecha").write_text(RECIPE)
    (tmp_path / "merged.safetensors").write_bytes(PREVIOUS)
    with using(mecha_methods.plugin):
        yield tmp_path


def merge(folder, output, *options: str):
    return runner.invoke(app, ["merge", str(folder / "recipe.mecha"), "-o", str(output), "-q", *options])


def check_merged(path) -> None:
    """The merge worked: every key is the mean of a's (i) and b's (3 i) values, 2 i."""
    f = SafetensorsFile(path)
    try:
        assert sorted(f.keys) == [f"k{i:02d}" for i in range(KEYS)]
        for i in range(KEYS):
            assert f.read(f"k{i:02d}").tolist() == [2.0 * i] * 64
    finally:
        f.close()


@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink", "hardlink", "second_input"])
def test_output_equal_to_an_input_is_refused_before_writing(work, monkeypatch, spelling):
    monkeypatch.chdir(work)
    (work / "sub").mkdir()
    if spelling == "symlink":
        os.symlink(work / "a.safetensors", work / "link.safetensors")
    if spelling == "hardlink":
        os.link(work / "a.safetensors", work / "hard.safetensors")
    output = {
        "same": str(work / "a.safetensors"),
        "dot": "./a.safetensors",
        "dotdot": "sub/../a.safetensors",
        "symlink": "link.safetensors",
        "hardlink": "hard.safetensors",
        "second_input": str(work / "b.safetensors"),
    }[spelling]
    before = snapshot(work)
    result = merge(work, output)
    victim = "b.safetensors" if spelling == "second_input" else "a.safetensors"
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("overwrite the input", victim))


def test_the_same_merge_to_a_new_path_works(work):
    """The refusals above are about the path, not about the recipe."""
    result = merge(work, work / "fresh.safetensors")
    assert result.exit_code == 0, result.output
    check_merged(work / "fresh.safetensors")
    assert leftover_temp_files(work) == []


def test_missing_output_folder(work):
    before = snapshot(work)
    result = merge(work, work / "no" / "such" / "merged.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", "does not exist"))


def test_output_is_a_directory(work):
    (work / "out.safetensors").mkdir()
    before = snapshot(work)
    result = merge(work, work / "out.safetensors")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("out.safetensors", "is a directory"))


def test_unwritable_output_folder(work, monkeypatch):
    locked = work / "locked"
    locked.mkdir()
    (locked / "merged.safetensors").write_bytes(PREVIOUS)
    os.chmod(locked, 0o555)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: make creating the file fail instead
            def refuse(*args, **kwargs):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

            monkeypatch.setattr(mecha_output, "_create_temp", refuse)
        before = snapshot(work)
        result = merge(work, locked / "merged.safetensors")
        monkeypatch.undo()
    finally:
        os.chmod(locked, 0o755)
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", "cannot write", "ermission denied"))


def _fail_writes_after(monkeypatch, calls: int, error: int = errno.ENOSPC) -> list[int]:
    """Make the engine's os.pwrite fail with ``error`` from call ``calls + 1`` on. Every unit
    writes its bytes at once (no staging in regions past the page cache, which writes these
    small files in one or two calls): the fault lands part way through the keys. A failure of
    the staged writes: tests/test_direct_write.py."""
    monkeypatch.setenv("MECHA_DIRECT_WRITE", "0")
    real = os.pwrite
    count = [0]

    def pwrite(fd, data, offset):
        count[0] += 1
        if count[0] > calls:
            raise OSError(error, os.strerror(error))
        return real(fd, data, offset)

    monkeypatch.setattr(engine_run.os, "pwrite", pwrite)
    return count


@pytest.mark.parametrize("good_writes", [0, 1, 5, KEYS - 1])
def test_disk_full_part_way(work, monkeypatch, good_writes):
    """The disk fills after some writes (0: the header itself fails)."""
    count = _fail_writes_after(monkeypatch, good_writes)
    before = snapshot(work)
    result = merge(work, work / "merged.safetensors", "--threads", "1")
    monkeypatch.undo()
    assert count[0] > good_writes, "the fault was never reached"
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", os.strerror(errno.ENOSPC)), code=1)


def test_disk_full_when_reserving_space(work, monkeypatch):
    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(engine_run.os, "posix_fallocate", no_space)
    before = snapshot(work)
    result = merge(work, work / "merged.safetensors")
    monkeypatch.undo()
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", "disk space"), code=1)


def test_io_error_while_writing(work, monkeypatch):
    _fail_writes_after(monkeypatch, 3, errno.EIO)
    before = snapshot(work)
    result = merge(work, work / "merged.safetensors", "--threads", "2")
    monkeypatch.undo()
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", os.strerror(errno.EIO)), code=1)


def test_rename_into_place_fails(work, monkeypatch):
    """The last step (the atomic rename) failing still leaves no temporary file behind."""
    def refuse(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(engine_run.os, "replace", refuse)
    before = snapshot(work)
    result = merge(work, work / "merged.safetensors")
    monkeypatch.undo()
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("merged.safetensors", os.strerror(errno.EXDEV)), code=1)


def test_after_a_failure_the_next_merge_succeeds(work, monkeypatch):
    _fail_writes_after(monkeypatch, 2)
    assert merge(work, work / "merged.safetensors", "--threads", "1").exit_code == 1  # failed while merging
    monkeypatch.undo()
    result = merge(work, work / "merged.safetensors")
    assert result.exit_code == 0, result.output
    check_merged(work / "merged.safetensors")
    assert leftover_temp_files(work) == []


def test_disk_full_on_a_new_output_leaves_nothing(work, monkeypatch):
    _fail_writes_after(monkeypatch, 4)
    before = snapshot(work)
    result = merge(work, work / "brand_new.safetensors", "--threads", "2")
    monkeypatch.undo()
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("brand_new.safetensors", os.strerror(errno.ENOSPC)), code=1)
    assert not (work / "brand_new.safetensors").exists()


def test_output_equal_to_the_recipe_is_refused(work):
    """The recipe is the user's file too: writing the merge over it would lose it."""
    before = snapshot(work)
    result = merge(work, work / "recipe.mecha")
    check_clean_failure(result.exit_code, result.stderr, folder=work, before=before,
                        fragments=("recipe.mecha", "overwrite the recipe"))


TRUNCATE_MID_MERGE = """
import os, sys
import mecha_core.engine.safetensors_io as safetensors_io
from mecha_core.cli import app

victim, keep = sys.argv[1], int(sys.argv[2])
real, reads = safetensors_io.SafetensorsFile.read, [0]

def read(self, key):
    if os.path.abspath(self.path) == os.path.abspath(victim):
        reads[0] += 1
        if reads[0] == 3:  # two of its keys read: another program now cuts the input short
            os.truncate(victim, keep)
    return real(self, key)

safetensors_io.SafetensorsFile.read = read
app(sys.argv[3:], prog_name="mecha")
"""


def test_an_input_truncated_during_the_merge_is_an_error_not_a_crash(work):
    # a mapped page past a file's new end kills the process with SIGBUS (leaving the temporary
    # output behind); within the last page it reads zeros, a silently wrong merge (these keys
    # are that small). The reader checks the file's size before each read instead.
    import subprocess
    import sys

    victim = work / "b.safetensors"
    original = victim.read_bytes()
    keep = SafetensorsFile(victim).data_start + 8
    before = snapshot(work)
    before["b.safetensors"] = original[:keep]
    proc = subprocess.run([sys.executable, "-c", TRUNCATE_MID_MERGE, str(victim), str(keep),
                           "merge", str(work / "recipe.mecha"), "-o", str(work / "merged.safetensors"),
                           "-q", "--threads", "1"], capture_output=True, text=True, timeout=120)
    check_clean_failure(proc.returncode, proc.stderr, folder=work, before=before,
                        fragments=("b.safetensors", "shrank"), code=1)
