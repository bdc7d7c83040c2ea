"""``mecha inspect`` and ``mecha info`` with the SD1, SDXL and SD3 plugins: every real layout is
detected from a header-only (sparse) file as itself and never as another; missing, unexpected and
misshapen keys, dtypes and sizes are reported; ambiguity is an error naming the candidates."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import mecha_sd1.plugin
import mecha_sd3.plugin
import mecha_sdxl.plugin
from mecha_core.cli import app
from mecha_core.kit import synthetic
from mecha_core.testing import using

runner = CliRunner()
LAYOUTS = ["sd1-ldm", "sd1-diffusers", "sd1-diffusers-unet", "sdxl-sgm", "sdxl-kohya", "sdxl-diffusers",
           "sdxl-diffusers-unet", "sd3-comfyui"]
ITEMSIZE = {"float16": 2, "float32": 4, "int64": 8, "int32": 4}


@pytest.fixture
def host():
    with using(mecha_sd1.plugin, mecha_sdxl.plugin, mecha_sd3.plugin) as h:
        yield h


def _inspect(path, *extra):
    result = runner.invoke(app, ["inspect", str(path), *extra])
    return result


def _nbytes(table) -> int:
    total = 0
    for shape, dtype in table.values():
        n = 1
        for d in shape:
            n *= d
        total += n * ITEMSIZE[dtype]
    return total


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_layout_is_detected_as_itself(tmp_path, host, name):
    arch = host.architecture(name)
    table = synthetic.key_table(arch, arch.keys if name == "sd3-comfyui" else None, "float16")
    path = synthetic.write_header_only(tmp_path / "model.safetensors", table)
    result = _inspect(path, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["architecture"] == name
    assert report["missing"] == [] and report["unexpected"] == [] and report["shape_mismatches"] == []
    assert report["keys"] == len(table) and report["bytes"] == _nbytes(table)
    assert sum(report["dtypes"].values()) == len(table) and set(report["dtypes"]) <= {"float16", "int64", "int32"}
    assert sum(c["bytes"] for c in report["components"].values()) == report["bytes"]
    expected_target = {"sd1-diffusers": "sd1-ldm", "sd1-diffusers-unet": "sd1-ldm", "sdxl-kohya": "sdxl-sgm",
                       "sdxl-diffusers": "sdxl-sgm", "sdxl-diffusers-unet": "sdxl-sgm"}
    assert report["converts_to"] == expected_target.get(name)


def test_sd3_without_text_encoders_is_still_sd3(tmp_path, host):
    arch = host.architecture("sd3")
    keys = [k for k, s in arch.keys.items() if s.component in ("diffuser", "vae")]
    path = synthetic.write_header_only(tmp_path / "sd3_medium.safetensors", synthetic.key_table(arch, keys, "float16"))
    report = json.loads(_inspect(path, "--json").output)
    assert report["architecture"] == "sd3-comfyui" and report["missing"] == []
    assert set(report["components"]) == {"diffuser", "vae"}
    assert report["missing_optional"] == 198 + 518 + 220  # clip_l, clip_g, t5xxl


def test_missing_unexpected_and_misshapen_keys_are_listed(tmp_path, host):
    arch = host.architecture("sd1-ldm")
    table = synthetic.key_table(arch, dtype="float16")
    dropped = sorted(table)[:5]
    for k in dropped:
        del table[k]
    table["my.extra.key"] = ((3,), "float32")
    wrong = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    table[wrong] = ((320, 320), "float16")  # a linear where SD1 has a 1x1 conv
    path = synthetic.write_header_only(tmp_path / "odd.safetensors", table)
    report = json.loads(_inspect(path, "--json").output)
    assert report["architecture"] == "sd1-ldm"
    assert report["missing"] == dropped
    assert report["unexpected"] == ["my.extra.key"]
    assert report["shape_mismatches"] == [{"key": wrong, "expected": [320, 320, 1, 1], "found": [320, 320]}]
    text = _inspect(path).output
    assert "missing keys (5)" in text and "unexpected keys (1): my.extra.key" in text
    assert f"{wrong} (320, 320) (expected (320, 320, 1, 1))" in text


def test_old_spellings_are_counted_as_renamed(tmp_path, host):
    arch = host.architecture("sd1-ldm")
    table = synthetic.key_table(arch, dtype="float16")
    old = {k: a for k, s in arch.keys.items() for a in s.aliases if k in table}
    table = {old.get(k, k): v for k, v in table.items()}
    path = synthetic.write_header_only(tmp_path / "old.safetensors", table)
    report = json.loads(_inspect(path, "--json").output)
    assert report["architecture"] == "sd1-ldm" and report["missing"] == []
    assert report["renamed"] == sorted(old.values()) and len(old) > 0


def test_an_unknown_file_reports_its_closest_architecture(tmp_path, host):
    arch = host.architecture("sdxl-sgm")
    required = [k for k in arch.keys if not arch.keys[k].optional]
    half = required[: len(required) // 2]
    path = synthetic.write_header_only(tmp_path / "half.safetensors", synthetic.key_table(arch, half, "float16"))
    result = _inspect(path, "--json")
    report = json.loads(result.output)
    assert report["architecture"] is None
    assert report["closest"] == {"architecture": "sdxl-sgm",
                                 "required_keys_present": round(len(half) / len(required), 4)}
    assert "closest: sdxl-sgm (50% of its required keys" in _inspect(path).output


def test_ambiguity_is_an_error_naming_the_candidates(tmp_path, host):
    both = synthetic.key_table(host.architecture("sd1-ldm"), dtype="float16")
    both.update(synthetic.key_table(host.architecture("sd1-diffusers"), dtype="float16"))
    path = synthetic.write_header_only(tmp_path / "both.safetensors", both)
    result = runner.invoke(app, ["inspect", str(path)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert "\n" not in line and "both.safetensors" in line
    assert "ambiguous" in line and "sd1-diffusers" in line and "sd1-ldm" in line


def test_info_lists_every_architecture(host):
    result = runner.invoke(app, ["info", "--json"])
    assert result.exit_code == 0
    listed = {a["name"]: a for a in json.loads(result.output)}
    assert set(listed) == set(LAYOUTS) | {"sd3.5-medium", "sd3.5-large"}  # SD3.5: computed layouts, no table
    assert listed["sd1-ldm"]["plugin"] == "sd1" and listed["sd1-ldm"]["blocks"] == 26
    assert listed["sdxl-sgm"]["blocks"] == 21 and listed["sd3-comfyui"]["blocks"] == 30
    text = runner.invoke(app, ["info"]).output
    assert all(name in text for name in LAYOUTS)


@pytest.mark.parametrize("name, expected", [("sd1", "sd1-ldm"), ("sdxl", "sdxl-sgm"), ("sd3", "sd3-comfyui")])
def test_info_accepts_old_names(host, name, expected):
    report = json.loads(runner.invoke(app, ["info", name, "--json"]).output)
    assert report["name"] == expected and name in report["aliases"]
    assert report["component_aliases"]["txt"] == "clip_l" and report["component_aliases"]["unet"] == "diffuser"


def test_info_verbose_lists_the_keys_of_blocks_and_classes(host):
    report = json.loads(runner.invoke(app, ["info", "sd1-ldm", "-v", "--json"]).output)
    assert report["block_keys"]["IN00"] == ["model.diffusion_model.input_blocks.0.0.bias",
                                            "model.diffusion_model.input_blocks.0.0.weight"]
    assert sorted(report["class_keys"]["final_layer_norm"]) == [
        "cond_stage_model.transformer.text_model.final_layer_norm.bias",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    assert report["block_sizes"]["M00"] == 46 and sum(report["block_sizes"].values()) == 1831
    assert report["converters"][0]["from"] == "sd1-diffusers"
    text = runner.invoke(app, ["info", "sd1-ldm", "-v"]).output
    assert "block IN00 (2 keys):" in text and "    model.diffusion_model.input_blocks.0.0.bias" in text


def test_info_of_an_unknown_architecture_exits_2(host):
    result = runner.invoke(app, ["info", "sd9"])
    assert result.exit_code == 2 and "sd9" in result.output
