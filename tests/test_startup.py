"""The fixed cost of a merge: what a run does besides merging (issues 15/16, start-up).

Times are measured in bench/bench_startup.py, not here; these tests pin the mechanisms: the exit
skips the interpreter's shutdown collections yet the output is complete, plugins load with the
garbage collector paused, input maps are released off the caller's thread, and an LLM merge
imports no tokenizer library."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys

import pytest
import torch

from mecha_core.lazy import import_without_collections
from mecha_core.testing import read_tensors, write_checkpoint

#: a merge in a fresh process, through the command line (``mecha merge``) or the Python API; an
#: exit handler registered before the merge runs after mecha's (exit handlers run last registered
#: first) and reports what the interpreter's shutdown will see
EXIT_PROBE = """
import atexit, gc, json, sys
atexit.register(lambda: print("EXIT " + json.dumps({"frozen": gc.get_freeze_count()}), flush=True))
if sys.argv[1] == "cli":
    from mecha_core.__main__ import main
    open("r.mecha", "w").write('mecha 1\\na = model("a.safetensors")\\nb = model("b.safetensors")\\n'
                               'weighted_sum(a, b, alpha=0.25)\\n')
    sys.argv = ["mecha", "merge", "r.mecha", "-o", "m.safetensors"]
    sys.exit(main())
import mecha_core as mecha
a, b = mecha.model("a.safetensors"), mecha.model("b.safetensors")
mecha.merge(mecha.weighted_sum(a, b, alpha=0.25), "m.safetensors")
"""


@pytest.fixture
def two_models(tmp_path):
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0, 4.0]), "v": torch.tensor([8.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([5.0, 6.0, 0.0]), "v": torch.tensor([0.0])})
    return tmp_path


def _probe(work, env_extra, via="cli"):
    env = {k: v for k, v in os.environ.items() if k != "MECHA_EXIT_GC"} | env_extra
    proc = subprocess.run([sys.executable, "-c", EXIT_PROBE, via],
                          capture_output=True, text=True, timeout=300, cwd=work, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.rsplit("EXIT ", 1)[1])


def test_after_a_merge_the_shutdown_collections_skip_what_was_alive_at_exit(two_models):
    report = _probe(two_models, {})
    assert report["frozen"] > 10_000  # torch's objects, at least
    merged = read_tensors(two_models / "m.safetensors")  # and the output is whole, renamed in place
    assert merged["w"].tolist() == [0.75 * 1 + 0.25 * 5, 0.75 * 2 + 0.25 * 6, 0.75 * 4 + 0.25 * 0]
    assert merged["v"].tolist() == [6.0]
    assert [p.name for p in two_models.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_mecha_exit_gc_full_keeps_pythons_own_shutdown(two_models):
    assert _probe(two_models, {"MECHA_EXIT_GC": "full"}) == {"frozen": 0}


def test_a_merge_through_the_python_api_leaves_the_callers_shutdown_alone(two_models):
    # the exit handler belongs to the ``mecha`` command's process, not to a program that imports mecha
    assert _probe(two_models, {}, via="api") == {"frozen": 0}
    assert read_tensors(two_models / "m.safetensors")["v"].tolist() == [6.0]


def test_plugins_load_with_garbage_collection_paused_and_restore_it():
    from mecha_core.plugins import PluginHost, plugin_from_functions

    seen = []

    def methods():
        seen.append(gc.isenabled())
        return []

    probe = plugin_from_functions("probe", mecha_merge_methods=methods)
    assert gc.isenabled()
    PluginHost([("probe", probe)], autoload=False)
    assert seen == [False] and gc.isenabled()
    gc.disable()  # a caller that paused it keeps it paused
    try:
        PluginHost([("probe", probe)], autoload=False)
        assert seen == [False, False] and not gc.isenabled()
    finally:
        gc.enable()


def test_a_released_object_is_freed_on_the_release_thread_not_the_callers():
    import threading

    from mecha_core.exiting import release_in_background

    freed = threading.Event()
    where = []

    class Held:
        def __del__(self):
            where.append(threading.current_thread().name)
            freed.set()

    release_in_background(Held())
    assert freed.wait(30)
    assert where == ["mecha-release"]


def test_closing_an_input_unmaps_it_soon_after(tmp_path):
    import time

    from mecha_core.engine.safetensors_io import SafetensorsFile

    path = write_checkpoint(tmp_path / "mapped.safetensors", {"w": torch.arange(4096, dtype=torch.float32)})

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return any(line.rstrip().endswith(str(path)) for line in maps)

    f = SafetensorsFile(path)
    assert float(f.read("w").sum()) == sum(range(4096))
    assert mapped()
    f.close()
    deadline = time.monotonic() + 30
    while mapped() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mapped()


#: which heavy modules a merge imported
IMPORTED = """
import json, sys
sys.argv = ["mecha", *sys.argv[1:]]
from mecha_core.__main__ import main
code = main()
from mecha_core.plugins import get_host
built = get_host().architectures.built()
print("\\nIMPORTED " + json.dumps({"code": code, "built": built, **{m: m in sys.modules for m in ["torch", *HEAVY]}}))
"""
HEAVY = ["transformers", "tokenizers", "jinja2"]


def test_merging_llm_folders_imports_no_tokenizer_library(tmp_path):
    import importlib.util

    from mecha_core.testing import write_checkpoint

    assert all(importlib.util.find_spec(m) for m in HEAVY)  # installed: their absence means something
    hidden, layers = 8, 2
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        tensors = {"model.embed_tokens.weight": torch.randn(16, hidden), "model.norm.weight": torch.ones(hidden),
                   "lm_head.weight": torch.randn(16, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}."
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                tensors[p + f"self_attn.{proj}.weight"] = torch.randn(hidden, hidden)
            for proj, shape in (("gate_proj", (32, hidden)), ("up_proj", (32, hidden)), ("down_proj", (hidden, 32))):
                tensors[p + f"mlp.{proj}.weight"] = torch.randn(shape)
            tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
            tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
        write_checkpoint(folder / "model.safetensors", tensors)
        (folder / "config.json").write_text(json.dumps({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
            "num_hidden_layers": layers, "intermediate_size": 32, "num_attention_heads": 2,
            "num_key_value_heads": 2, "vocab_size": 16, "tie_word_embeddings": False}))
    (tmp_path / "r.mecha").write_text('mecha 1\na = model("a")\nb = model("b")\nweighted_sum(a, b, alpha=0.5)\n')
    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}" + IMPORTED, "merge", "r.mecha", "-o", "out/",
                           "-q"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(proc.stdout.rsplit("IMPORTED ", 1)[1])
    # torch: the probe sees; built: no fixed architecture's table (SD1, SDXL, SD3, Flux) was built
    assert report == {"code": 0, "built": [], "torch": True, **{m: False for m in HEAVY}}, proc.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "llama"  # a real LLM merge


def test_merging_sd1_checkpoints_builds_the_sd1_table_alone(tmp_path):
    # detection skips the SDXL, SD3, Flux and diffusers-naming tables: an SD1 file cannot match them
    from mecha_sd1 import layout

    from mecha_core.kit.synthetic import key_table, write_layout

    table = {k: ((2,) if shape else shape, dtype) for k, (shape, dtype) in key_table(layout.architecture()).items()}
    for seed, name in enumerate(("a", "b")):
        write_layout(tmp_path / f"{name}.safetensors", table, seed=seed)
    (tmp_path / "r.mecha").write_text('mecha 1\na = model("a.safetensors")\nb = model("b.safetensors")\n'
                                      'weighted_sum(a, b, alpha=0.25)\n')
    proc = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}" + IMPORTED, "merge", "r.mecha", "-o",
                           "m.safetensors", "-q"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    report = json.loads(proc.stdout.rsplit("IMPORTED ", 1)[1])
    assert (report["code"], report["built"]) == (0, ["sd1-ldm"]), proc.stderr
    a, b, merged = (read_tensors(tmp_path / f"{n}.safetensors") for n in ("a", "b", "m"))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert len(merged) == len(table)
    assert torch.equal(merged[key], (a[key].float() * 0.75 + b[key].float() * 0.25).to(merged[key].dtype))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="os.fork is POSIX only")
def test_a_forked_child_releases_on_its_own_thread():
    import threading

    from mecha_core.exiting import release_in_background

    release_in_background(object())  # the parent's thread runs
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread did not survive the fork
        freed = threading.Event()

        class Held:
            def __del__(self):
                freed.set()

        release_in_background(Held())
        os._exit(0 if freed.wait(30) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_inspect_prints_components_in_file_order_whatever_the_hash_seed(tmp_path):
    from mecha_sd1 import layout

    from mecha_core.kit.synthetic import key_table, write_layout

    table = {k: ((1,) if shape else shape, dtype) for k, (shape, dtype) in
             key_table(layout.architecture(), dtype="float16").items()}
    path = write_layout(tmp_path / "sd1.safetensors", table)
    in_file_order = list(dict.fromkeys(layout.architecture().keys[k].component for k in table))
    orders = []
    for seed in ("1", "2", "3"):
        proc = subprocess.run([sys.executable, "-m", "mecha_core", "inspect", path], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
        line = next(x for x in proc.stdout.splitlines() if x.strip().startswith("components:"))
        orders.append([part.split(" (")[0].strip() for part in line.split(":", 1)[1].split("),")])
    assert orders == [in_file_order] * 3 and len(in_file_order) == 3


def test_torch_is_imported_with_the_collector_paused_then_frozen(tmp_path, monkeypatch):
    (tmp_path / "heavy_module_for_test.py").write_text("import gc\nCOLLECTING = gc.isenabled()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "heavy_module_for_test", raising=False)
    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        module = import_without_collections("heavy_module_for_test")
        assert module.COLLECTING is False
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen
    finally:
        gc.unfreeze()


def test_a_paused_collector_stays_paused(tmp_path, monkeypatch):
    (tmp_path / "heavy_module_for_test2.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    gc.disable()
    try:
        frozen = gc.get_freeze_count()
        import_without_collections("heavy_module_for_test2")
        assert not gc.isenabled()
        assert gc.get_freeze_count() == frozen  # nothing frozen behind the caller's back
    finally:
        gc.enable()


def test_only_the_command_imports_torch_with_the_collector_paused(monkeypatch):
    from mecha_core import exiting, lazy

    paused = []
    monkeypatch.setattr(lazy, "import_without_collections", lambda name: paused.append(name) or sys.modules[name])
    monkeypatch.delenv("MECHA_EXIT_GC", raising=False)
    monkeypatch.setattr(exiting, "_registered", True)  # the mecha command's process
    lazy._import("json")
    assert paused == ["json"]
    monkeypatch.setenv("MECHA_EXIT_GC", "full")  # Python's own collections asked for
    lazy._import("json")
    monkeypatch.delenv("MECHA_EXIT_GC")
    monkeypatch.setattr(exiting, "_registered", False)  # a program that imports mecha
    lazy._import("json")
    assert paused == ["json"]
