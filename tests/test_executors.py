"""The executor hook (``mecha_executors``) and the kit an executor is built on
(``mecha_core.kit.executors``), with a plugin executor that computes units in reverse order,
each in a plan of its own, as a worker process would."""

from __future__ import annotations

import os
from pathlib import Path

import mecha_methods.plugin
import pytest
import torch
from typer.testing import CliRunner

import mecha_core as mecha
from mecha_core.cli import app
from mecha_core.errors import MechaError, MergeError
from mecha_core.kit import executors as kit
from mecha_core.specs import Executor
from mecha_core.testing import check_plugin, plugin_from_functions, using, write_checkpoint

calls: list[str] = []


def _reverse(jobs):
    """Each job's units computed last to first, each in a fresh plan of its own (a 'worker')."""
    def fill(plan, pwrite):
        fingerprint = kit.plan_fingerprint(plan)
        for unit in reversed(kit.work_units(plan)):
            with kit.open_plan(job) as own, kit.single_threaded():
                assert kit.plan_fingerprint(own) == fingerprint
                units = {(u.key, u.start): u for u in kit.work_units(own)}
                pwrite(*kit.unit_writer(own)(units[unit.key, unit.start]))
        calls.append("fill")

    def shards(plan, targets):
        for shard, path in reversed(targets):
            with kit.open_plan(job) as own:
                kit.write_shard_file(own, shard, path)
        calls.append("shards")

    out = []
    for job in jobs:
        out.append(kit.write_folder(job, write_shards=shards) if job.folder else kit.write_file(job, fill=fill))
    return out


def _failing(jobs):
    def fill(plan, pwrite):
        unit = kit.work_units(plan)[0]
        pwrite(*kit.unit_writer(plan)(unit))  # something written, then the failure
        raise MergeError(f"key '{unit.key}': the worker failed")

    return [kit.write_file(job, fill=fill) for job in jobs]


REVERSE = plugin_from_functions("reverse", mecha_executors=lambda: [
    Executor("reverse", run=_reverse, description="units last to first"),
    Executor("failing", run=_failing, settings=("address",), description="fails after a write")])


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(5)
    for name in "ab":
        write_checkpoint(tmp_path / f"{name}.safetensors",
                         {f"k{i}": torch.randn(300 + i, generator=g) for i in range(6)} |
                         {"m": torch.randn(6, 5, generator=g).half()})
    calls.clear()
    with using(mecha_methods.plugin, REVERSE):
        recipe = mecha.weighted_sum(mecha.model("a.safetensors"), mecha.model("b.safetensors"), alpha=0.35)
        yield tmp_path, recipe


def test_units_computed_elsewhere_in_any_order_give_the_local_bytes(setup):
    folder, recipe = setup
    local = mecha.merge(recipe, "local.safetensors", chunk_elements=64)
    other = mecha.merge(recipe, "other.safetensors", chunk_elements=64, executor="reverse")
    assert calls == ["fill"]
    assert Path(other).read_bytes() == Path(local).read_bytes()


def test_shards_written_elsewhere_in_any_order_give_the_local_folder(setup):
    folder, recipe = setup
    local = mecha.merge(recipe, "local/", shard_size=2500)
    other = mecha.merge(recipe, "other/", shard_size=2500, executor="reverse")
    assert calls == ["shards"]
    names = sorted(os.listdir(local))
    assert len([n for n in names if n.startswith("model-")]) >= 3
    assert sorted(os.listdir(other)) == names
    for name in names:
        assert (Path(other) / name).read_bytes() == (Path(local) / name).read_bytes(), name


def test_an_executor_failing_after_a_write_leaves_no_output(setup):
    folder, recipe = setup
    before = sorted(os.listdir(folder))
    with pytest.raises(MergeError, match="key 'k0': the worker failed") as caught:
        mecha.merge(recipe, "out.safetensors", executor="failing", executor_settings={"address": "x"})
    assert caught.value.exit_code == 1
    assert sorted(os.listdir(folder)) == before


def test_an_executor_may_not_take_the_cores_name_and_is_listed(setup):
    taken = plugin_from_functions("taken", mecha_executors=lambda: [Executor("local", run=_reverse)])
    assert any("conflicts with the core's executor 'local'" in p for p in check_plugin(taken))
    bad = plugin_from_functions("bad", mecha_executors=lambda: [Executor("Bad Name", run=None)])
    problems = check_plugin(bad)
    assert any("lower-case letters" in p for p in problems) and any("run must be callable" in p for p in problems)
    result = CliRunner().invoke(app, ["plugins", "list", "-v"])
    assert result.exit_code == 0
    assert "reverse" in result.output and "executors" in result.output


def test_the_ray_address_is_refused_without_the_ray_executor(setup):
    folder, _ = setup
    (folder / "r.mecha").write_text('mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'
                                    'weighted_sum(a, b, alpha=0.5)\n')
    result = CliRunner().invoke(app, ["merge", "r.mecha", "-o", "o.safetensors", "--ray-address", "x:1"])
    assert result.exit_code == 2 and "--ray-address is for --executor ray" in result.output
    with pytest.raises(MechaError, match="executor 'reverse' has no setting 'address'"):
        mecha.merge(mecha.load_recipe("r.mecha"), "o.safetensors", executor="reverse",
                    executor_settings={"address": "x"})
    assert not (folder / "o.safetensors").exists()
