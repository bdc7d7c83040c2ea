"""Scaled fp8 checkpoints: read as real weights (scales gone from the key table), written on
request as fp8 with a scale per weight; checked against dequantisation written here in torch."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
from mecha_core.errors import MechaError
from mecha_core.testing import open_model, using, write_checkpoint

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


@pytest.fixture
def host():
    with using(mecha_methods.plugin) as h:
        yield h


def _weights(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"blocks.0.linear.weight": torch.randn(48, 32, generator=gen) * 0.05,
            "blocks.0.linear.bias": torch.randn(48, generator=gen) * 0.01,
            "blocks.0.conv.weight": torch.randn(16, 8, 3, 3, generator=gen) * 0.2,
            "blocks.0.norm.scale": 1 + torch.randn(32, generator=gen) * 0.1}


def _scaled_file(path, weights, *, scale_name: str, per_row: bool = False) -> dict[str, torch.Tensor]:
    """A scaled fp8 file as ComfyUI writes one, and each weight's real (dequantised) values."""
    tensors, real = {"scaled_fp8": torch.empty(0, dtype=FP8)}, {}
    for key, w in weights.items():
        if w.dim() < 2:
            tensors[key] = w.to(torch.bfloat16)
            real[key] = tensors[key].float()
            continue
        amax = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) if per_row else w.abs().max()
        scale = (amax / FP8_MAX).float()
        codes = (w / scale).to(FP8)
        base = key.removesuffix("weight")
        tensors[key] = codes
        tensors[base + scale_name] = scale.reshape(-1) if per_row else scale.reshape(())
        tensors[base + "scale_input"] = torch.tensor(1.0)
        real[key] = codes.float() * scale
    write_checkpoint(path, tensors)
    return real


def test_scaled_inputs_read_as_real_weights(host, tmp_path):
    real = _scaled_file(tmp_path / "a.safetensors", _weights(0), scale_name="scale_weight")
    source = open_model(tmp_path / "a.safetensors", host)
    try:
        assert set(source.keys) == set(real)  # scales, input scales and the marker are gone
        for key, want in real.items():
            assert torch.equal(source.read(key).float(), want), key
    finally:
        source.close()


def test_weighted_sum_of_two_scaled_files_matches_torch(host, tmp_path):
    a = _scaled_file(tmp_path / "a.safetensors", _weights(1), scale_name="scale_weight")
    b = _scaled_file(tmp_path / "b.safetensors", _weights(2), scale_name="weight_scale", per_row=True)
    out = tmp_path / "out.safetensors"
    recipe = mecha_core.weighted_sum(mecha_core.model(str(tmp_path / "a.safetensors")),
                                     mecha_core.model(str(tmp_path / "b.safetensors")), alpha=0.3)
    mecha_core.merge(recipe, out, threads=2, output_dtype="float32")
    merged = load_file(str(out))
    assert set(merged) == set(a)
    for key in a:
        torch.testing.assert_close(merged[key], a[key] * 0.7 + b[key] * 0.3, rtol=1e-6, atol=1e-7, msg=key)
    # averaging the stored codes and scales separately (what a merger unaware of scales does) differs a lot
    codes = load_file(str(tmp_path / "a.safetensors"))["blocks.0.linear.weight"].float()
    assert not torch.allclose(merged["blocks.0.linear.weight"], codes * 0.7, atol=1e-2)


def test_fp8_scaled_output_round_trip(host, tmp_path):
    weights = _weights(3)
    weights["blocks.0.linear.weight"][0, 0] = 0.0  # a zero stays zero
    write_checkpoint(tmp_path / "w.safetensors", weights)
    out = tmp_path / "out.safetensors"
    mecha_core.merge(mecha_core.model(str(tmp_path / "w.safetensors")), out, threads=2,
                     output_dtype="float8_e4m3fn", fp8_scaled=True)
    stored = load_file(str(out))
    assert stored["scaled_fp8"].dtype == FP8 and stored["scaled_fp8"].numel() == 0
    for key, w in weights.items():
        if w.dim() >= 2:
            codes, scale = stored[key], stored[key.removesuffix("weight") + "scale_weight"]
            assert codes.dtype == FP8 and scale.dtype == torch.float32 and scale.shape == ()
            assert float(scale) == pytest.approx(float(w.abs().max()) / FP8_MAX, rel=1e-6)
            back = codes.float() * scale
            # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; subnormals 2^-10 absolute (in scale units)
            assert bool(((back - w).abs() <= w.abs() * 2 ** -4 + float(scale) * 2 ** -10).all()), key
            assert not torch.equal(back, w)  # it was quantised
        else:
            assert stored[key].dtype == torch.bfloat16 and torch.equal(stored[key], w.to(torch.bfloat16)), key
    assert stored["blocks.0.linear.weight"][0, 0].float() == 0
    with safe_open(str(out), "pt") as f:
        assert "mecha_recipe" in f.metadata()
    # read back as an input: the real weights, within the format's error
    source = open_model(out, host)
    try:
        assert set(source.keys) == set(weights)
        got = source.read("blocks.0.conv.weight")
        w = weights["blocks.0.conv.weight"]
        assert bool(((got - w).abs() <= w.abs() * 2 ** -4 + w.abs().max() / FP8_MAX * 2 ** -10).all())
    finally:
        source.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "w.safetensors"]  # no float32 leftover


def test_fp8_scaled_needs_an_fp8_output_dtype(host, tmp_path):
    write_checkpoint(tmp_path / "w.safetensors", _weights(4))
    with pytest.raises(MechaError, match="--fp8-scaled .*float8_e4m3fn or float8_e5m2 \\(got bfloat16\\)"):
        mecha_core.merge(mecha_core.model(str(tmp_path / "w.safetensors")), tmp_path / "o.safetensors",
                         output_dtype="bfloat16", fp8_scaled=True)
    assert not (tmp_path / "o.safetensors").exists()


def test_a_scale_that_fits_no_weight_is_refused(host, tmp_path):
    _scaled_file(tmp_path / "a.safetensors", _weights(5), scale_name="scale_weight")
    tensors = load_file(str(tmp_path / "a.safetensors"))
    tensors["blocks.0.linear.scale_weight"] = torch.ones(5)
    write_checkpoint(tmp_path / "bad.safetensors", tensors)
    with pytest.raises(MechaError) as err:
        mecha_core.merge(mecha_core.model(str(tmp_path / "bad.safetensors")), tmp_path / "o.safetensors")
    message = str(err.value)
    assert "bad.safetensors" in message and "'blocks.0.linear.scale_weight'" in message and "\n" not in message
    assert err.value.exit_code == 2 and not (tmp_path / "o.safetensors").exists()


def test_the_command_line_flag(host, tmp_path):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    weights = _weights(6)
    write_checkpoint(tmp_path / "w.safetensors", weights)
    (tmp_path / "r.mecha").write_text(mecha_core.dump_recipe(mecha_core.model(str(tmp_path / "w.safetensors"))))
    out = tmp_path / "o.safetensors"
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.mecha"), "-o", str(out), "-q",
                                      "--output-dtype", "float8_e4m3fn", "--fp8-scaled"])
    assert result.exit_code == 0, result.output
    stored = load_file(str(out))
    assert stored["blocks.0.linear.weight"].dtype == FP8 and "blocks.0.linear.scale_weight" in stored
    result = CliRunner().invoke(app, ["merge", str(tmp_path / "r.mecha"), "-o", str(tmp_path / "p.safetensors"),
                                      "-q", "--fp8-scaled"])
    assert result.exit_code == 2 and "--fp8-scaled" in result.output


def test_a_sharded_folder_with_scales_in_another_shard_is_dequantised(host, tmp_path):
    """The scale of a weight may sit in a different shard than the weight: the folder is read as
    one key table, so the pair is still found and the weight reads as its real values."""
    import json
    import os

    real = _scaled_file(tmp_path / "whole.safetensors", _weights(3), scale_name="weight_scale")
    stored = load_file(str(tmp_path / "whole.safetensors"))
    folder = tmp_path / "folder"
    os.makedirs(folder)
    scales = sorted(k for k in stored if k.endswith(("weight_scale", "scale_input")) or k == "scaled_fp8")
    shards = {"model-00001-of-00002.safetensors": sorted(set(stored) - set(scales)),
              "model-00002-of-00002.safetensors": scales}
    for name, keys in shards.items():
        write_checkpoint(folder / name, {k: stored[k] for k in keys})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    other = _scaled_file(tmp_path / "b.safetensors", _weights(4), scale_name="scale_weight")

    out = tmp_path / "out.safetensors"
    recipe = mecha_core.weighted_sum(mecha_core.model(str(folder)), mecha_core.model(str(tmp_path / "b.safetensors")),
                                     alpha=0.5)
    mecha_core.merge(recipe, out, output_dtype="float32")
    merged = load_file(str(out))
    assert set(merged) == set(real)  # no scale, input scale or marker key in the output
    for key in real:
        torch.testing.assert_close(merged[key], real[key] * 0.5 + other[key] * 0.5, rtol=1e-6, atol=1e-7, msg=key)


def test_inspect_shows_scaled_weights_as_a_merge_reads_them(host, tmp_path):
    """The scale keys fold into their weights in ``mecha inspect`` as in a merge: the key count is
    the model's, the dtypes are what is stored, each weight's bytes include its float32 scale."""
    from mecha_core.cli.describe import inspect_summary

    weights = _weights(5)
    _scaled_file(tmp_path / "a.safetensors", weights, scale_name="scale_weight")
    summary = inspect_summary(tmp_path / "a.safetensors", host)
    matrices = [w for w in weights.values() if w.dim() >= 2]
    others = [w for w in weights.values() if w.dim() < 2]
    assert summary["keys"] == len(weights) and summary["scaled_fp8_weights"] == len(matrices)
    assert summary["dtypes"] == {"bfloat16": len(others), "float8_e4m3fn": len(matrices)}
    assert summary["bytes"] == sum(w.numel() + 4 for w in matrices) + sum(w.numel() * 2 for w in others)
    assert summary["parameters"] == sum(w.numel() for w in weights.values())
