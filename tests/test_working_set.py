"""Methods that cannot be sliced declare their working set; the scheduler admits them within the
memory budget, one at a time when one needs it all."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import mecha_core
from mecha_core import merge_method
from mecha_core.engine.plan import make_plan, MergeOptions
from mecha_core.engine.schedule import units
from mecha_core.testing import plugin_from_functions, using, write_checkpoint

BUDGET = 64 << 20


def _recording_method(working_set):
    """A whole-tensor method that records how many of its calls run at once."""
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    @merge_method(working_set=working_set)
    def heavy(a):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.05)  # long enough for other workers to start theirs if admitted
        with lock:
            state["now"] -= 1
        return a * 2

    return heavy, state


def _run(tmp_path, working_set) -> dict:
    heavy, state = _recording_method(working_set)
    model = {f"k{i}": torch.full((16, 16), float(i)) for i in range(8)}
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, model)
    with using(plugin_from_functions("heavy", mecha_merge_methods=lambda: [heavy])):
        out = tmp_path / "o.safetensors"
        mecha_core.merge(mecha_core.heavy(mecha_core.model(str(path))), out, threads=4, memory_budget=BUDGET)
    return state


def test_a_working_set_that_fills_the_budget_runs_alone(tmp_path):
    state = _run(tmp_path, lambda info, inputs, itemsize: BUDGET * 3 // 5)  # one fits, two do not
    assert state["most"] == 1


def test_small_working_sets_run_side_by_side(tmp_path):
    # the control: the same merge with a small declared working set does overlap, so the
    # test above observes the scheduler and not a merge that happens to run serially
    state = _run(tmp_path, lambda info, inputs, itemsize: 1 << 20)
    assert state["most"] > 1


@pytest.mark.parametrize("alignment,per_d2", [(1.0, 40), (0.5, 120)])
def test_rotate_declares_the_svd_working_set(tmp_path, alignment, per_d2):
    import mecha_methods.plugin

    path = tmp_path / "r.safetensors"
    write_checkpoint(path, {"w": torch.randn(512, 256)})
    with using(mecha_methods.plugin):
        node = mecha_core.rotate(mecha_core.model(str(path)), mecha_core.model(str(path)), alignment=alignment)
        with make_plan(node, MergeOptions(memory_budget=1 << 40)) as plan:
            (unit,) = units(plan)
    # inputs and result (3 tensors of 512·256 float32) plus rotate's d×d matrices (d = 256):
    # 40·d² bytes, 120·d² with a fractional alignment (its working_set is given the hyperparameters)
    assert unit.cost == 3 * 512 * 256 * 4 + per_d2 * 256 * 256


def test_a_sliced_rotate_unit_counts_its_working_set_besides_one_slice(tmp_path):
    import mecha_methods.plugin

    path = tmp_path / "r.safetensors"
    write_checkpoint(path, {"w": torch.randn(512, 256)})
    with using(mecha_methods.plugin):
        node = mecha_core.rotate(mecha_core.model(str(path)), mecha_core.model(str(path)))
        with make_plan(node, MergeOptions(memory_budget=1 << 40, chunk_elements=64 * 256)) as plan:
            (unit,) = units(plan)
    assert len(unit.pieces) == 8 and all(b - a == 64 * 256 for a, b in unit.pieces)
    # one slice of 64 rows (inputs and result, float32), the statistics' 28 bytes an element,
    # and the d×d matrices
    assert unit.cost == 3 * 64 * 256 * 4 + 28 * 64 * 256 + 40 * 256 * 256


def test_a_key_whose_working_set_exceeds_the_budget_is_named_in_a_warning(tmp_path, capfd):
    heavy, state = _recording_method(lambda info, inputs, itemsize: 2 * BUDGET)
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {"big": torch.ones(16, 16), "small": torch.ones(4)})
    with using(plugin_from_functions("heavy", mecha_merge_methods=lambda: [heavy])):
        mecha_core.merge(mecha_core.heavy(mecha_core.model(str(path))), tmp_path / "o.safetensors",
                         threads=2, memory_budget=BUDGET)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "key 'big' and 1 other key(s) cannot be sliced" in err[0] and "more than --memory-budget" in err[0]
    assert state["most"] == 1


def test_a_sliced_key_whose_declared_matrices_exceed_the_budget_is_named_in_a_warning(tmp_path, capfd):
    # rotate slices the rows of a 256 × 256 key, but its 256 × 256 matrices (40·d² = 2.6 MB)
    # alone exceed a 1 MB budget: the unit runs alone and the warning says so (a square key: a
    # wide one holds no d×d matrix)
    import mecha_methods.plugin

    path = tmp_path / "r.safetensors"
    write_checkpoint(path, {"w": torch.randn(256, 256), "small": torch.randn(4, 4)})
    with using(mecha_methods.plugin):
        node = mecha_core.rotate(mecha_core.model(str(path)), mecha_core.model(str(path)))
        mecha_core.merge(node, tmp_path / "o.safetensors", memory_budget=1 << 20, chunk_elements=8 * 256)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "key 'w' is merged in slices but its method holds more besides them" in err[0]
    assert "more than --memory-budget" in err[0]


def test_the_output_write_buffers_count_against_the_budget_in_the_over_budget_warning(tmp_path, capsys):
    """A key that fits the memory budget alone, but not beside the output writer's buffers
    (which every unit runs beside), is named too, and the peak the warning gives counts them."""
    from mecha_core.engine import schedule

    reserved = 8 << 20
    heavy, _ = _recording_method(lambda info, inputs, itemsize: BUDGET - (4 << 20))
    path = tmp_path / "m.safetensors"
    write_checkpoint(path, {"big": torch.ones(16, 16)})
    with using(plugin_from_functions("heavy", mecha_merge_methods=lambda: [heavy])):
        node = mecha_core.heavy(mecha_core.model(str(path)))
        with make_plan(node, MergeOptions(memory_budget=BUDGET)) as plan:
            todo = units(plan)
            assert schedule.over_budget(plan, todo) == []  # alone, within the budget
            ((key, need),) = schedule.over_budget(plan, todo, reserved)
            assert key == "big" and BUDGET - reserved < need < BUDGET
            schedule._warn_over_budget(plan, todo, reserved)
    err = capsys.readouterr().err
    # the need (the working set and 16·16 float32 input and result) and the peak with the buffers,
    # in the warning's units (MB: powers of 1000)
    assert f"needs about {(BUDGET - (4 << 20) + 2 * 256 * 4) / 1e6:,.1f} MB" in err
    assert f"holds about {(BUDGET - (4 << 20) + 2 * 256 * 4 + reserved) / 1e6:,.1f} MB at its peak" in err
    assert "8.4 MB of it the output's write buffers" in err
