"""mergekit ``slices:`` (layer ranges, layer stacking) and ``modules:``, checked against plain-torch
computations of mergekit 0.1.5's plan (plan.py: layers renumbered slice after slice, the
embeddings from the first slice's sources, the final norm and head from the last slice's, ``t``
over each slice's own layers) on the conftest's tiny 3-layer Llama models, and loaded back with
transformers."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

import mecha_core as mecha
from mecha_core.errors import MechaError, RecipeError

_LAYER = re.compile(r"\.layers\.(\d+)\.")


def folder_tensors(folder: str) -> dict[str, torch.Tensor]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for name in files:
        out.update(load_file(os.path.join(folder, name)))
    return out


def layer_of(key: str) -> int | None:
    found = _LAYER.search(key)
    return int(found.group(1)) if found else None


def renamed(key: str, layer: int) -> str:
    return _LAYER.sub(f".layers.{layer}.", key, count=1)


def stack_reference(models: dict[str, dict[str, torch.Tensor]], slices: list[list[tuple[str, int, int]]],
                    merge_fn) -> dict[str, torch.Tensor]:
    """mergekit's plan, written out: output layer ``first + i`` of a slice is ``merge_fn`` of its
    sources' layers ``start + i`` at t = i / (n - 1) (1 for one layer); the keys outside the
    layers take the first slice's sources (embeddings) or the last's (the rest) at t = 0."""
    template = next(iter(models.values()))
    out: dict[str, torch.Tensor] = {}
    first = 0
    for index, sources in enumerate(slices):
        width = sources[0][2] - sources[0][1]
        for i in range(width):
            t = i / (width - 1) if width > 1 else 1.0
            for key in template:
                if layer_of(key) == 0:
                    out_key = renamed(key, first + i)
                    inputs = [models[name][renamed(key, start + i)] for name, start, _ in sources]
                    out[out_key] = merge_fn(out_key, inputs, t, index)
        first += width
    for key in template:
        if layer_of(key) is None:
            index = 0 if "embed_tokens" in key else len(slices) - 1
            inputs = [models[name][key] for name, _, _ in slices[index]]
            out[key] = merge_fn(key, inputs, 0.0, index)
    return out


def gradient(value, t: float):
    """evaluate_setting's gradient: anchors evenly on [0, 1], linear between."""
    if not isinstance(value, list):
        return value
    x = t * (len(value) - 1)
    lo = math.floor(x)
    hi = min(lo + 1, len(value) - 1)
    return value[lo] + (x - lo) * (value[hi] - value[lo])


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit's slerp: coefficients from the unit vectors, applied to the raw tensors."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    dot = float((x / x.norm()) @ (y / y.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(theta)
    return (math.sin((1 - t) * theta) / s * a.double() + math.sin(t * theta) / s * b.double()).float()


def logits_match(folder: str, expected: dict[str, torch.Tensor], layers: int) -> None:
    """The merged folder loads with transformers and computes what a model holding ``expected`` does."""
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert loaded.config.num_hidden_layers == layers
    config = transformers.LlamaConfig.from_pretrained(folder)
    reference = transformers.LlamaForCausalLM(config)
    reference.load_state_dict(expected, strict=False)  # lm_head may be tied to the embeddings
    ids = torch.tensor([[1, 5, 9, 17, 33, 2]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-5)


def write(tmp_path, text: str, name: str = "c.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# -- layer stacking ----------------------------------------------------------------------------
STACK = """merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
  - sources:
      - model: {b}
        layer_range: [1, 3]
        parameters:
          scale: [{{filter: o_proj, value: 0.5}}, {{value: 1}}]
  - sources:
      - model: {c}
        layer_range: [0, 3]
"""


def test_a_passthrough_stack_renumbers_layers_and_rewrites_the_config(tmp_path, llamas):
    config = write(tmp_path, STACK.format(**llamas))
    out = mecha.merge(config, str(tmp_path / "out") + "/")
    result = folder_tensors(out)
    models = {n: load_file(os.path.join(llamas[n], "model.safetensors")) for n in "abc"}

    def passthrough(key, inputs, t, index):
        return inputs[0] * (0.5 if index == 1 and "o_proj" in key else 1.0)

    expected = stack_reference(models, [[("a", 0, 2)], [("b", 1, 3)], [("c", 0, 3)]], passthrough)
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert torch.equal(result[key], value), key
    # the embeddings are a's, the final norm and head c's (the first and the last slice)
    assert torch.equal(result["model.embed_tokens.weight"], models["a"]["model.embed_tokens.weight"])
    assert torch.equal(result["model.norm.weight"], models["c"]["model.norm.weight"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 7
    logits_match(out, expected, 7)


SLERP = """merge_method: slerp
base_model: {a}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
slices:
  - sources:
      - model: {a}
        layer_range: [0, 2]
      - model: {b}
        layer_range: [1, 3]
  - sources:
      - model: {a}
        layer_range: [2, 3]
      - model: {b}
        layer_range: [0, 1]
    parameters:
      t: [{{filter: mlp, value: 0.25}}]
"""


def test_slerp_with_slices_takes_t_over_each_slice(tmp_path, llamas):
    config = write(tmp_path, SLERP.format(**llamas))
    out = mecha.merge(config, str(tmp_path / "out") + "/")
    result = folder_tensors(out)
    models = {n: load_file(os.path.join(llamas[n], "model.safetensors")) for n in "ab"}
    global_t = [("self_attn", [0, 0.5, 0.3, 0.7, 1]), ("mlp", [1, 0.5, 0.7, 0.3, 0]), (None, 0.5)]

    def merge_fn(key, inputs, t, index):
        # the slice's own t (a filter list that misses falls through to the global one)
        if index == 1 and "mlp" in key:
            value = 0.25
        else:
            value = next(gradient(v, t) for f, v in global_t if f is None or f in key)
        return slerp(value, inputs[0], inputs[1])

    expected = stack_reference(models, [[("a", 0, 2), ("b", 1, 3)], [("a", 2, 3), ("b", 0, 1)]], merge_fn)
    assert set(result) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(result[key], value, rtol=1e-6, atol=1e-6, msg=key)
    # t moves along the slice: layer 1 (the slice's last) is not layer 0's mix
    assert not torch.allclose(result["model.layers.0.mlp.up_proj.weight"],
                              slerp(0.5, models["a"]["model.layers.0.mlp.up_proj.weight"],
                                    models["b"]["model.layers.1.mlp.up_proj.weight"]))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["num_hidden_layers"] == 3
    logits_match(out, expected, 3)


def test_whole_model_slices_merge_as_the_models_form(tmp_path, llamas):
    """The most common published form: one slice over every layer is the models: form."""
    a, b = llamas["a"], llamas["b"]
    sliced = (f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: [0, 1]}}\nslices:\n  - sources:\n"
              f"      - {{model: {a}, layer_range: [0, 3]}}\n      - {{model: {b}, layer_range: [0, 3]}}\n")
    listed = (f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: [0, 1]}}\nmodels:\n  - model: {a}\n"
              f"  - model: {b}\n")
    one = load_file(mecha.merge(write(tmp_path, sliced, "s.yml"), str(tmp_path / "s.safetensors")))
    two = load_file(mecha.merge(write(tmp_path, listed, "m.yml"), str(tmp_path / "m.safetensors")))
    assert list(one) == list(two)
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_modules_default_is_the_slices_form_with_module_parameters(tmp_path, llamas):
    base, a = llamas["base"], llamas["a"]
    sources = (f"      - sources:\n          - {{model: {base}, layer_range: [0, 3]}}\n"
               f"          - {{model: {a}, layer_range: [0, 3]}}\n")
    with_module = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodules:\n  default:\n"
                   f"    parameters: {{weight: 0.25}}\n    slices:\n{sources}")
    global_only = (f"merge_method: task_arithmetic\nbase_model: {base}\nparameters: {{weight: 0.25}}\nslices:\n"
                   + sources.replace("      ", "  ", 1).replace("\n          ", "\n      "))
    module_models = (f"merge_method: task_arithmetic\nbase_model: {base}\nmodules:\n  default:\n"
                     f"    parameters: {{weight: 0.25}}\n    models:\n      - model: {a}\n")
    one = load_file(mecha.merge(write(tmp_path, with_module, "m.yml"), str(tmp_path / "m.safetensors")))
    two = load_file(mecha.merge(write(tmp_path, global_only, "g.yml"), str(tmp_path / "g.safetensors")))
    three = load_file(mecha.merge(write(tmp_path, module_models, "mm.yml"), str(tmp_path / "mm.safetensors")))
    wb, wa = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(a, "model.safetensors"))
    for key in wb:
        torch.testing.assert_close(one[key], wb[key] + 0.25 * (wa[key] - wb[key]), rtol=1e-6, atol=1e-6)
        assert torch.equal(one[key], two[key]) and torch.equal(one[key], three[key])


def test_import_prints_a_recipe_that_merges_to_the_same_bytes_for_any_thread_count(tmp_path, llamas):
    config = write(tmp_path, STACK.format(**llamas))
    done = subprocess.run([sys.executable, "-m", "mecha_core", "recipe", "import", config],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert 'layers="1:3", at=2, of=7, outside="none"' in done.stdout, done.stdout
    (tmp_path / "c.mecha").write_text(done.stdout)
    from_yaml = mecha.merge(config, str(tmp_path / "y") + "/", threads=1, shard_size=20_000)
    from_mecha = mecha.merge(str(tmp_path / "c.mecha"), str(tmp_path / "m") + "/", threads=3, shard_size=20_000)
    names = sorted(n for n in os.listdir(from_yaml) if n != "recipe.mecha")
    assert names == sorted(n for n in os.listdir(from_mecha) if n != "recipe.mecha")
    assert "model.safetensors.index.json" in names
    for name in names:
        assert open(os.path.join(from_yaml, name), "rb").read() == open(os.path.join(from_mecha, name), "rb").read()


# -- refusals: one line naming the YAML line, before any tensor is read -----------------------------
BAD = [
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 5]\n",
     4, "are not inside its 3 layers"),
    ("merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
     "      - {{model: {a}, layer_range: [0, 2]}}\n      - {{model: {b}, layer_range: [0, 3]}}\n",
     7, "every source of a slice has as many layers"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [2, 1]\n",
     5, "empty or negative"),
    ("merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0]\n",
     5, "layer_range must be [start, end]"),
    ("merge_method: slerp\nbase_model: {c}\nparameters: {{t: 0.5}}\nslices:\n  - sources:\n"
     "      - {{model: {a}, layer_range: [0, 2]}}\n      - {{model: {b}, layer_range: [0, 2]}}\n",
     5, "is not a source of this slice"),
    ("merge_method: passthrough\nslices:\n  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n"
     "    residual_weight: 0.5\n", 4, "never uses it"),
    ("merge_method: passthrough\nmodels:\n  - model: {a}\nslices:\n"
     "  - sources: [{{model: {a}, layer_range: [0, 2]}}]\n", 4, "exactly one of models, slices or modules"),
    ("merge_method: passthrough\nmodules:\n  text_decoder:\n    slices:\n"
     "      - sources: [{{model: {a}, layer_range: [0, 2]}}]\n", 3, "multi-module architecture"),
    ("merge_method: linear\nslices:\n  - sources:\n      - {{model: {a}, layer_range: [0, 2]}}\n"
     "  - sources:\n      - {{model: {a}, layer_range: [0, 1]}}\n      - {{model: {b}, layer_range: [1, 2]}}\n",
     5, "the last slice has 2 sources but the first 1"),
]


@pytest.mark.parametrize("text,line,words", BAD)
def test_bad_slices_name_the_yaml_line_and_exit_2(tmp_path, llamas, text, line, words):
    config = write(tmp_path, text.format(**llamas), "bad.yml")
    done = subprocess.run([sys.executable, "-m", "mecha_core", "merge", config, "-o", str(tmp_path / "out") + "/"],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    message = done.stderr.strip()
    assert done.returncode == 2, message
    assert len(message.splitlines()) == 1 and words in message, message
    assert f"bad.yml:{line}:" in message, message
    assert not os.path.exists(tmp_path / "out")


def test_a_slice_error_is_raised_when_the_config_is_read(tmp_path, llamas):
    text = BAD[1][0].format(**llamas)
    with pytest.raises(RecipeError, match="bad.yml:7"):
        mecha.load_recipe(write(tmp_path, text, "bad.yml"))
    out_of_range = BAD[0][0].format(**llamas)  # the range is checked against the header when planning
    with pytest.raises(MechaError, match="bad.yml:4:.*not inside its 3 layers"):
        mecha.merge(write(tmp_path, out_of_range, "bad.yml"), str(tmp_path / "o.safetensors"))
