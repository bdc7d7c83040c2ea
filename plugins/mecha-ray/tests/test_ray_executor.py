"""The ray executor on a local two-node cluster (one CPU per node, loopback only), started once.

Every output is compared with the local executor's bytes, or with plain torch for a sweep."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray
import torch
from ray.cluster_utils import Cluster
from safetensors.torch import load_file, save_file

import mecha_core as mecha
from mecha_core.errors import MechaError
from mecha_core.testing import install_plugin

HERE = Path(__file__).parent
SMALL_BUDGET = 4096  # a few hundred bytes per task: many tasks, spread over both nodes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes of one CPU each on 127.0.0.1; their workers find the test methods' plugin
    through PYTHONPATH, the driver through sys.path."""
    from mecha_core.plugins import reset_host

    site = tmp_path_factory.mktemp("site")
    install_plugin(site, HERE / "raytest_methods.py", entry="raytest", dist="mecha-raytest")
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "RAY_ADDRESS")}  # loopback: see conftest.py
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), saved["PYTHONPATH"]]))
    os.environ.pop("RAY_ADDRESS", None)
    sys.path.insert(0, str(site))
    reset_host()
    nodes = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False, "object_store_memory": 80 << 20})
    try:
        nodes.add_node(num_cpus=1, object_store_memory=80 << 20)
        ray.init(address=nodes.address, log_to_driver=False)
        live = [n for n in ray.nodes() if n["Alive"]]
        assert len(live) == 2 and {n["NodeManagerAddress"] for n in live} == {"127.0.0.1"}
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        sys.path.remove(str(site))
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_host()


@pytest.fixture
def inputs(tmp_path):
    g = torch.Generator().manual_seed(11)
    tables = []
    for name in ("a", "b"):
        table = {f"k{i}": torch.randn(64 + 9 * i, generator=g) for i in range(8)}
        table["seven"] = torch.randn(7, generator=g)
        table["h"] = torch.randn(8, 8, generator=g).half()
        save_file(table, tmp_path / f"{name}.safetensors")
        tables.append(table)
    return tmp_path, tables


def _digests(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_a_single_file_is_the_local_executors_bytes(cluster, inputs):
    folder, _ = inputs
    recipe = mecha.weighted_sum(mecha.model(str(folder / "a.safetensors")), mecha.model(str(folder / "b.safetensors")),
                           alpha=0.3)
    local = mecha.merge(recipe, folder / "local.safetensors", memory_budget=SMALL_BUDGET)
    remote = mecha.merge(recipe, folder / "ray.safetensors", memory_budget=SMALL_BUDGET, executor="ray")
    assert Path(remote).read_bytes() == Path(local).read_bytes()


def test_a_folder_output_is_the_local_executors_shards_and_index(cluster, inputs):
    folder, _ = inputs
    recipe = mecha.add_difference(mecha.model(str(folder / "a.safetensors")),
                                  mecha.model(str(folder / "b.safetensors")),
                                  mecha.model(str(folder / "a.safetensors")), alpha=0.7)
    local = mecha.merge(recipe, f"{folder}/local/", shard_size=700)
    remote = mecha.merge(recipe, f"{folder}/ray/", shard_size=700, executor="ray")
    got, want = _digests(Path(remote)), _digests(Path(local))
    assert len([n for n in want if n.startswith("model-")]) > 3  # several shards, so several tasks
    assert got == want


def test_a_worker_killed_mid_merge_is_retried_and_the_bytes_are_the_same(cluster, inputs, tmp_path_factory):
    folder, _ = inputs
    marker = tmp_path_factory.mktemp("marker") / "killed"

    def recipe():
        return mecha.add_dying_once(mecha.model(str(folder / "a.safetensors")),
                                    mecha.model(str(folder / "b.safetensors")), marker=str(marker))

    remote = mecha.merge(recipe(), folder / "ray.safetensors", memory_budget=SMALL_BUDGET, executor="ray")
    assert marker.exists()  # a worker did kill itself
    local = mecha.merge(recipe(), folder / "local.safetensors", memory_budget=SMALL_BUDGET)  # marker there: no kill
    assert Path(remote).read_bytes() == Path(local).read_bytes()


@pytest.mark.parametrize("output", ["out.safetensors", "out/"])
def test_a_failure_no_retry_mends_leaves_no_output_and_names_key_and_node(cluster, inputs, output):
    folder, _ = inputs
    before = sorted(os.listdir(folder))
    recipe = mecha.add_failing_on_seven(mecha.model(str(folder / "a.safetensors")),
                                        mecha.model(str(folder / "b.safetensors")))
    with pytest.raises(MechaError) as caught:
        mecha.merge(recipe, f"{folder}/{output}", memory_budget=SMALL_BUDGET, executor="ray",
                    **({"shard_size": 700} if output.endswith("/") else {}))
    message = str(caught.value)
    assert "\n" not in message
    assert "key 'seven'" in message and "seven elements are refused" in message
    assert "(on node 127.0.0.1 (" in message
    assert caught.value.exit_code == 1
    assert sorted(os.listdir(folder)) == before  # no output, no temporary left


def test_a_sweep_of_three_by_two_on_ray_gives_each_output_as_plain_torch_computes_it(cluster, inputs):
    folder, (a, b) = inputs
    recipe = mecha.weighted_sum(
        mecha.weighted_sum(mecha.model(str(folder / "a.safetensors")), mecha.model(str(folder / "b.safetensors")),
                           alpha=mecha.parameter("alpha")),
        mecha.model(str(folder / "b.safetensors")), alpha=mecha.parameter("beta"))
    results = mecha.sweep(recipe, f"{folder}/s-{{alpha}}-{{beta}}.safetensors",
                          {"alpha": [0.1, 0.5, 0.9], "beta": [0.0, 0.25]}, executor="ray")
    assert [v for v, _ in results] == [{"alpha": al, "beta": be} for al in (0.1, 0.5, 0.9) for be in (0.0, 0.25)]
    for values, path in results:
        assert path == f"{folder}/s-{values['alpha']}-{values['beta']}.safetensors"
        got = load_file(path)
        for key in a:
            first = a[key].float() * (1 - values["alpha"]) + b[key].float() * values["alpha"]
            want = (first * (1 - values["beta"]) + b[key].float() * values["beta"]).to(a[key].dtype)
            torch.testing.assert_close(got[key], want, rtol=1e-3 if a[key].dtype == torch.float16 else 1e-6,
                                       atol=1e-3 if a[key].dtype == torch.float16 else 1e-6)
