"""Ctrl-C and SIGTERM in the middle of a real ``python -m mecha_core merge``: the temporary file
goes, the previous output stays byte for byte, and the exit code says the merge did not finish.

The merge is made slow by a test plugin whose method sleeps per key, installed for the
subprocess as a real distribution (a ``.dist-info`` folder on PYTHONPATH) so that the CLI finds
it through entry points like any other plugin. Its speed then does not depend on the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mecha_core.testing import write_checkpoint
from mecha_core.testing_corpus import leftover_temp_files

KEYS = 400
SLEEP = 0.05  # seconds per key: an uninterrupted merge takes KEYS * SLEEP / 2 threads = 10 s

PLUGIN = f'''
"""A merge method that takes its time (for interruption tests)."""
import time

from mecha_core import hookimpl, merge_method


@merge_method
def slow_copy(a, *, seconds: float = {SLEEP}):
    """a, after sleeping ``seconds``."""
    time.sleep(seconds)
    return a.clone()


@hookimpl
def mecha_merge_methods():
    return [slow_copy]
'''


def _install_plugin(site) -> None:
    site.mkdir()
    (site / "mecha_slow_test.py").write_text(PLUGIN)
    info = site / "mecha_slow_test-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mecha-slow-test\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mecha]\nslowtest = mecha_slow_test\n")


@pytest.fixture
def slow_merge(tmp_path):
    _install_plugin(tmp_path / "site")
    models = tmp_path / "models"
    models.mkdir()
    write_checkpoint(models / "a.safetensors", {f"k{i:03d}": torch.full((8,), float(i)) for i in range(KEYS)})
    (models / "slow.mecha").write_text('mecha 1\na = model("a.safetensors")\nslow_copy(a)\n')
    out = tmp_path / "out"
    out.mkdir()
    previous = b"the merge from last week, which a Ctrl-C must not cost"
    (out / "merged.safetensors").write_bytes(previous)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "site"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MECHA_LOAD_PLUGINS"] = "methods,slowtest"
    env.pop("MECHA_DEBUG", None)
    command = [sys.executable, "-m", "mecha_core", "merge", str(models / "slow.mecha"),
               "-o", str(out / "merged.safetensors"), "--threads", "2", "--quiet"]
    return command, env, out, previous


def _wait_for_temp_file(proc: subprocess.Popen, folder, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = leftover_temp_files(folder)
        if found:
            return found[0]
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the merge ended (exit {proc.returncode}) before writing:\n{err}")
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no temporary output appeared")


# SIGINT and SIGTERM, and signals whose default action would end the process without any
# cleanup (the temporary file would stay): a closed terminal, a quit key, a user signal
STOPPING = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1]


@pytest.mark.parametrize("signum", STOPPING, ids=[signal.Signals(s).name for s in STOPPING])
def test_interrupted_merge_leaves_no_file_and_keeps_the_old_one(slow_merge, signum):
    command, env, out, previous = slow_merge
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temp = _wait_for_temp_file(proc, out)
        assert temp.startswith(".merged.safetensors.") and temp.endswith(".tmp")
        time.sleep(0.3)  # well inside the merge: a few keys are written, most are not
        started = time.monotonic()
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=60)
        stopped_after = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0, stderr
    assert proc.returncode == 128 + signum, (proc.returncode, stderr)  # 130 for Ctrl-C, 143 for SIGTERM
    assert "Traceback" not in stderr, stderr
    assert "interrupted" in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    if signum != signal.SIGINT:
        assert signal.Signals(signum).name in stderr, stderr
    # left alone it would run about KEYS * SLEEP / 2 = 10 s more; stopping takes one key plus exit
    assert stopped_after < KEYS * SLEEP / 2 * 0.8, "the merge ran on after the signal"
    assert sorted(os.listdir(out)) == ["merged.safetensors"]
    assert (out / "merged.safetensors").read_bytes() == previous


def test_the_slow_merge_completes_when_left_alone(slow_merge, tmp_path, monkeypatch):
    """The same recipe and plugin, uninterrupted, do write the output (so the test above
    interrupts a merge that would have succeeded). In-process, on a handful of keys, to stay fast."""
    from typer.testing import CliRunner

    import mecha_methods.plugin
    from mecha_core.cli import app
    from mecha_core.engine.safetensors_io import SafetensorsFile
    from mecha_core.testing import using

    command, env, out, previous = slow_merge
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    import mecha_slow_test

    few = tmp_path / "few"
    few.mkdir()
    write_checkpoint(few / "a.safetensors", {f"k{i}": torch.full((8,), float(i)) for i in range(3)})
    (few / "slow.mecha").write_text('mecha 1\na = model("a.safetensors")\nslow_copy(a)\n')
    with using(mecha_methods.plugin, mecha_slow_test):
        result = CliRunner().invoke(app, ["merge", str(few / "slow.mecha"), "-o", str(out / "merged.safetensors"),
                                          "--threads", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    f = SafetensorsFile(out / "merged.safetensors")
    try:
        assert {k: f.read(k).tolist() for k in f.keys} == {f"k{i}": [float(i)] * 8 for i in range(3)}
    finally:
        f.close()
    assert leftover_temp_files(out) == []


def test_a_killed_merges_temporary_file_is_removed_by_the_next_merge(slow_merge, tmp_path):
    """SIGKILL leaves the temporary file (nothing can run); its name says which process made it,
    and the next merge into the folder removes it, once it is old enough, with one warning line."""
    from mecha_core.output import STALE_AFTER_S, TEMP_PATTERN

    command, env, out, previous = slow_merge
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        temp = _wait_for_temp_file(proc, out)
        time.sleep(0.3)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    match = TEMP_PATTERN.fullmatch(temp)
    assert match is not None and match.group("name") == "merged.safetensors", temp
    assert int(match.group("pid")) == proc.pid
    size = os.path.getsize(out / temp)
    assert size > 0
    # made old: the same name and size, last changed before the stale limit
    old = time.time() - STALE_AFTER_S - 60
    os.utime(out / temp, (old, old))
    # and one that changed a moment ago (it may be another host's merge in progress): kept
    recent = f".other.safetensors.mecha-{proc.pid}-0123456789ab.tmp"
    (out / recent).write_bytes(b"x" * 1234)
    # and one of a process that is running (this one): never touched, never mentioned
    running = f".mine.safetensors.mecha-{os.getpid()}-0123456789ab.tmp"
    (out / running).write_bytes(b"y")
    os.utime(out / running, (old, old))

    few = tmp_path / "few"
    few.mkdir()
    write_checkpoint(few / "a.safetensors", {f"k{i}": torch.full((8,), float(i)) for i in range(3)})
    (few / "copy.mecha").write_text('mecha 1\na = model("a.safetensors")\nslow_copy(a, seconds=0.0)\n')
    second = [*command[:4], str(few / "copy.mecha"), *command[5:]]
    done = subprocess.run(second, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 2, done.stderr
    removed = next(ln for ln in lines if temp in ln)
    assert 1000 <= size < 1000 * 1000  # 400 keys of 8 float32 and a header: some kilobytes
    assert removed.startswith("warning: removed") and f"({size / 1000:,.0f} kB)" in removed, removed
    kept = next(ln for ln in lines if recent in ln)
    assert kept.startswith("warning:") and "left alone" in kept and "(1 kB)" in kept, kept
    assert sorted(os.listdir(out)) == sorted(["merged.safetensors", recent, running])
    assert (out / "merged.safetensors").read_bytes() != previous  # the second merge did write
