"""mergekit's ``model: BASE+LORA``: a PEFT adapter folder (written here in PEFT's layout) merged
into its base before the merge, compared with W + (lora_alpha / r)·B@A computed in plain torch."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import mecha_core as mecha
from mecha_core.errors import RecipeError

TARGETS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")


def tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, llamas):
    """A PEFT adapter folder of the tiny base: rank 4, lora_alpha 8, on three module kinds of
    every layer, plus modules_to_save lm_head; returns (folder, {model key: its ΔW or new weight})."""
    folder = tmp_path_factory.mktemp("adapter")
    base = tensors(llamas["base"])
    gen = torch.Generator().manual_seed(7)
    stored, expected = {}, {}
    for key, weight in base.items():
        module = key.removesuffix(".weight")
        if not module.endswith(TARGETS):
            continue
        a = torch.randn(4, weight.shape[1], generator=gen) * 0.1
        b = torch.randn(weight.shape[0], 4, generator=gen) * 0.1
        stored[f"base_model.model.{module}.lora_A.weight"] = a
        stored[f"base_model.model.{module}.lora_B.weight"] = b
        expected[key] = weight.double() + (8 / 4) * (b.double() @ a.double())
    head = base["lm_head.weight"] + torch.randn(base["lm_head.weight"].shape, generator=gen) * 0.05
    stored["base_model.model.lm_head.weight"] = head
    expected["lm_head.weight"] = head.double()
    save_file(stored, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
              "modules_to_save": ["lm_head"], "task_type": "CAUSAL_LM", "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder), expected


def merge(tmp_path, text: str) -> dict[str, torch.Tensor]:
    (tmp_path / "c.yml").write_text(text)
    return tensors(mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "out") + "/"))


def test_passthrough_of_base_plus_lora_is_the_merged_model(tmp_path, llamas, adapter):
    folder, expected = adapter
    result = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {llamas['base']}+{folder}\n")
    base = tensors(llamas["base"])
    assert set(result) == set(base)
    for key, value in base.items():
        want = expected[key].float() if key in expected else value
        torch.testing.assert_close(result[key], want, rtol=1e-6, atol=1e-7, msg=key)
    assert len(expected) == 3 * 3 + 1


def test_base_plus_lora_in_a_task_arithmetic_merge(tmp_path, llamas, adapter):
    """task_arithmetic of base with 'a' and 'base+lora': base + 0.5·(a − base) + 0.7·(merged − base)."""
    folder, expected = adapter
    text = (f"merge_method: task_arithmetic\nbase_model: {llamas['base']}\nmodels:\n"
            f"  - model: {llamas['a']}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {llamas['base']}+{folder}\n    parameters: {{weight: 0.7}}\n")
    result = merge(tmp_path, text)
    base, a = tensors(llamas["base"]), tensors(llamas["a"])
    for key in base:
        merged = expected[key] if key in expected else base[key].double()
        want = base[key].double() + 0.5 * (a[key].double() - base[key].double()) + 0.7 * (merged - base[key].double())
        torch.testing.assert_close(result[key], want.float(), rtol=1e-5, atol=1e-6, msg=key)


def test_a_lora_named_by_hub_id_resolves_in_the_local_cache(tmp_path, llamas, adapter, monkeypatch):
    folder, expected = adapter
    cache = tmp_path / "hub"
    shutil.copytree(folder, cache / "models--org--adapter" / "snapshots" / "r1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    result = merge(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {llamas['base']}+org/adapter\n")
    for key, want in expected.items():
        torch.testing.assert_close(result[key], want.float(), rtol=1e-6, atol=1e-7, msg=key)


def test_a_reference_with_two_pluses_names_its_line(tmp_path):
    (tmp_path / "bad.yml").write_text("merge_method: linear\nmodels:\n  - model: x\n  - model: y+l1+l2\n")
    with pytest.raises(RecipeError) as err:
        mecha.load_recipe(str(tmp_path / "bad.yml"))
    assert "bad.yml:4" in str(err.value) and "BASE+LORA" in str(err.value) and "\n" not in str(err.value)
