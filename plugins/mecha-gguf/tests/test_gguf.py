"""GGUF files written with gguf's own writer: every type mecha-gguf reads dequantises exactly as
gguf.quants.dequantize (the package's reference), and a GGUF file merges with safetensors."""

from __future__ import annotations

import gguf
import mecha_methods.plugin
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as reference
from gguf.quants import quantize
from safetensors.torch import load_file

import mecha_core
import mecha_gguf.plugin
from mecha_core.errors import MechaError
from mecha_core.testing import using, write_checkpoint
from mecha_gguf.reader import GGUFFile

SHAPE = (6, 512)  # two K-quant super-blocks per row
QUANTISED = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants.quantize writes these
K_QUANTS = {"Q2_K": (-4, -2), "Q3_K": (-2,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (-2,)}  # their float16 fields


def _k_blocks(rng, name: str) -> np.ndarray:
    """Random K-quant blocks (gguf has no quantiser for them): random codes and sub-scales, and
    float16 super-block scales of a sane size where the format keeps them."""
    qtype = T[name]
    elements, size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(SHAPE[0] * SHAPE[1] // elements, size), dtype=np.uint8)
    for offset in K_QUANTS[name]:
        start = offset % size
        scales = (rng.standard_normal((blocks.shape[0], 1)) * 0.01).astype(np.float16)
        blocks[:, start:start + 2] = scales.view(np.uint8)
    return blocks.reshape(SHAPE[0], -1)


def _write(path, tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else T[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    data = (rng.standard_normal(SHAPE) * 0.1).astype(np.float32)
    tensors = {"plain.F32": (data, "F32"), "plain.F16": (data.astype(np.float16), "F16"),
               "plain.BF16": (quantize(data, T.BF16), "BF16")}
    for name in QUANTISED:
        tensors[f"q.{name}"] = (quantize(data, T[name]), name)
    for name in K_QUANTS:
        tensors[f"k.{name}"] = (_k_blocks(rng, name), name)
    path = tmp_path_factory.mktemp("gguf") / "all.gguf"
    _write(path, tensors)
    return path, data


@pytest.mark.parametrize("key", ["plain.F32", "plain.F16", "plain.BF16", *(f"q.{n}" for n in QUANTISED),
                                 *(f"k.{n}" for n in K_QUANTS)])
def test_every_type_matches_ggufs_reference(written, key):
    path, data = written
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}[key]
    want = torch.from_numpy(np.array(reference(np.asarray(stored.data), stored.tensor_type)))
    f = GGUFFile(str(path))
    try:
        got = f.read(key)
        assert tuple(got.shape) == SHAPE and f.keys[key].shape == SHAPE
        assert got.dtype == {"plain.F16": torch.float16, "plain.BF16": torch.bfloat16}.get(key, torch.float32)
        assert torch.equal(got.float(), want.float()), key
        assert bool(torch.isfinite(got).all()) and float(got.float().abs().max()) > 0
        if key.startswith(("plain.", "q.")):  # quantised from real data: close to it, as the format allows
            assert float((got.float() - torch.from_numpy(data)).abs().max()) < 0.1
    finally:
        f.close()


def test_a_gguf_file_merges_with_safetensors(tmp_path):
    rng = np.random.default_rng(1)
    a = (rng.standard_normal(SHAPE) * 0.1).astype(np.float32)
    b = torch.randn(SHAPE)
    _write(tmp_path / "a.gguf", {"blocks.0.weight": (quantize(a, T.Q8_0), "Q8_0"), "blocks.0.bias": (a[0], "F32")})
    write_checkpoint(tmp_path / "b.safetensors", {"blocks.0.weight": b, "blocks.0.bias": b[0].clone()})
    stored = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "a.gguf")).tensors}["blocks.0.weight"]
    a_real = torch.from_numpy(np.array(reference(np.asarray(stored.data), stored.tensor_type)))
    with using(mecha_methods.plugin, mecha_gguf.plugin):
        out = tmp_path / "o.safetensors"
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(str(tmp_path / "a.gguf")),
                                                 mecha_core.model(str(tmp_path / "b.safetensors")), alpha=0.4), out)
    merged = load_file(str(out))
    torch.testing.assert_close(merged["blocks.0.weight"], a_real * 0.6 + b * 0.4)
    torch.testing.assert_close(merged["blocks.0.bias"], torch.from_numpy(a[0]) * 0.6 + b[0] * 0.4)


def test_a_damaged_gguf_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with using(mecha_methods.plugin, mecha_gguf.plugin):
        with pytest.raises(MechaError) as err:
            mecha_core.merge(mecha_core.model(str(tmp_path / "bad.gguf")), tmp_path / "o.safetensors")
    assert "bad.gguf" in str(err.value) and "\n" not in str(err.value) and err.value.exit_code == 2
    assert not (tmp_path / "o.safetensors").exists()


def test_inspect_reads_a_gguf_file_through_the_plugin(tmp_path):
    """``mecha inspect`` opens what a merge opens: the key table as the plugin reads it, with the
    stored types and bytes (Q8_0: 34 bytes per 32 values) beside the dtype a read returns."""
    from typer.testing import CliRunner

    from mecha_core.cli import app
    from mecha_core.cli.describe import inspect_summary

    rng = np.random.default_rng(2)
    a = (rng.standard_normal(SHAPE) * 0.1).astype(np.float32)
    path = tmp_path / "a.gguf"
    _write(path, {"blocks.0.weight": (quantize(a, T.Q8_0), "Q8_0"), "blocks.0.bias": (a[0], "F32")})
    with using(mecha_methods.plugin, mecha_gguf.plugin) as host:
        summary = inspect_summary(path, host)
        text = CliRunner().invoke(app, ["inspect", str(path)])
    assert summary["format"] == "gguf" and summary["keys"] == 2
    assert summary["dtypes"] == {"Q8_0": 1, "float32": 1}
    assert summary["read_as"] == {"float32": 2}
    assert summary["bytes"] == SHAPE[0] * SHAPE[1] // 32 * 34 + SHAPE[1] * 4
    assert summary["parameters"] == SHAPE[0] * SHAPE[1] + SHAPE[1]
    assert text.exit_code == 0, text.output
    assert "format: gguf, read as float32 (2)" in text.output and "Q8_0 (1)" in text.output
