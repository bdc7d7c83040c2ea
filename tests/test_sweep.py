"""Sweeps (``-p alpha=0.2,0.4`` with ``{alpha}`` in the output name; ``mecha_core.sweep``) and the
executor choice (``--executor``, ``executor=``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import mecha_core as mecha
from mecha_core.cli import app
from mecha_core.errors import MechaError, OutputError
from mecha_core.sweeps import sweep_points
from mecha_core.testing import write_checkpoint

runner = CliRunner()
# (a + alpha (b - a)) then + beta (b - that): two parameters to sweep
RECIPE = ('mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\nalpha = parameter("alpha")\n'
          'beta = parameter("beta")\nfirst = weighted_sum(a, b, alpha=alpha)\nweighted_sum(first, b, alpha=beta)\n')


@pytest.fixture
def models(work):
    g = torch.Generator().manual_seed(3)
    a = {"w": torch.randn(8, 4, generator=g), "v": torch.randn(5, generator=g)}
    b = {"w": torch.randn(8, 4, generator=g), "v": torch.randn(5, generator=g)}
    write_checkpoint(work / "a.safetensors", a)
    write_checkpoint(work / "b.safetensors", b)
    (work / "r.mecha").write_text(RECIPE)
    return work, a, b


def _expected(a, b, alpha, beta):
    first = {k: a[k] + alpha * (b[k] - a[k]) for k in a}
    return {k: first[k] + beta * (b[k] - first[k]) for k in a}


def test_the_points_are_the_product_in_the_documented_order():
    points = sweep_points({"alpha": [1, 2], "beta": [3, 4, 5]})
    assert [tuple(p.values.values()) for p in points] == [(1, 3), (1, 4), (1, 5), (2, 3), (2, 4), (2, 5)]
    assert points[0].labels == {"alpha": "1", "beta": "3"}


def test_a_cli_sweep_of_three_by_two_writes_six_outputs_each_as_plain_torch_computes_it(models):
    folder, a, b = models
    result = runner.invoke(app, ["merge", "r.mecha", "-p", "alpha=0.2,0.4,0.6", "-p", "beta=0,0.5",
                                 "-o", "out-{alpha}-{beta}.safetensors", "--json"])
    assert result.exit_code == 0, result.output
    outputs = json.loads(result.stdout)["outputs"]
    assert [o["params"] for o in outputs] == [{"alpha": al, "beta": be} for al in (0.2, 0.4, 0.6) for be in (0, 0.5)]
    for entry in outputs:
        al, be = entry["params"]["alpha"], entry["params"]["beta"]
        assert entry["output"] == str(folder / f"out-{al}-{be}.safetensors")
        assert entry["bytes"] == os.path.getsize(entry["output"])
        got = load_file(entry["output"])
        for key, want in _expected(a, b, al, be).items():
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)


def test_the_api_sweep_returns_each_outputs_values_and_path(models):
    folder, a, b = models
    node = mecha.compose("r.mecha", beta=0.5)
    results = mecha.sweep(node, "api-{alpha}.safetensors", {"alpha": [0.25, 0.75]})
    assert [values for values, _ in results] == [{"alpha": 0.25}, {"alpha": 0.75}]
    for values, path in results:
        assert path == str(folder / f"api-{values['alpha']}.safetensors")
        got = load_file(path)
        for key, want in _expected(a, b, values["alpha"], 0.5).items():
            torch.testing.assert_close(got[key], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("output", "message"), [
    ("out.safetensors", "put {alpha} in the output's name"),
    ("out-{beta}.safetensors", "put {alpha} in the output's name"),
    ("out-{alpha}-{gamma}.safetensors", "{gamma} names no parameter of the sweep"),
])
def test_an_output_name_without_every_swept_placeholder_is_refused_before_any_merge(models, output, message):
    folder, _, _ = models
    before = sorted(os.listdir(folder))
    result = runner.invoke(app, ["merge", "r.mecha", "-p", "alpha=0.2,0.4", "-p", "beta=1", "-o", output])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert sorted(os.listdir(folder)) == before


def test_outputs_that_collide_are_refused_before_any_merge(models):
    folder, _, _ = models
    before = sorted(os.listdir(folder))
    result = runner.invoke(app, ["merge", "r.mecha", "-p", "alpha=0.5,0.50", "-p", "beta=1", "-o",
                                 "o-{alpha}.safetensors"])
    assert result.exit_code == 2
    assert "writes this output twice (for alpha=0.5 and alpha=0.5)" in result.output
    assert sorted(os.listdir(folder)) == before
    with pytest.raises(OutputError, match="twice"):
        mecha.sweep(mecha.compose("r.mecha", beta=1), "x-{alpha}.safetensors", {"alpha": [0.5, 0.5]})


def test_an_unknown_executor_is_one_line(models):
    result = runner.invoke(app, ["merge", "r.mecha", "-p", "alpha=0.2", "-p", "beta=1", "-o", "o.safetensors",
                                 "--executor", "nope"])
    assert result.exit_code == 2
    assert result.output.strip().startswith("error: unknown executor 'nope' (installed: local")
    assert len(result.output.strip().splitlines()) == 1
    with pytest.raises(MechaError, match="unknown executor 'nope'"):
        mecha.merge(mecha.compose("r.mecha", alpha=0.1, beta=1), "o.safetensors", executor="nope")
    assert not os.path.exists("o.safetensors")


def test_the_local_executor_by_name_writes_what_the_default_writes(models):
    folder, a, b = models
    node = mecha.compose("r.mecha", alpha=0.3, beta=0.1)
    mecha.merge(node, "default.safetensors")
    mecha.merge(node, "local.safetensors", executor="local")
    assert (folder / "default.safetensors").read_bytes() == (folder / "local.safetensors").read_bytes()
    with pytest.raises(MechaError, match="executor 'local' has no setting 'address'"):
        mecha.merge(node, "x.safetensors", executor="local", executor_settings={"address": "auto"})
