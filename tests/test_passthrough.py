"""Keys that pass through unchanged are copied file to file, with the bytes the engine writes."""

from __future__ import annotations

import pytest
import torch

import mecha_core
from mecha_core.engine import passthrough
from mecha_core.engine.safetensors_io import SafetensorsFile
from mecha_core.errors import MergeError
from mecha_core.testing import using, write_checkpoint


def _models(tmp_path):
    gen = torch.Generator().manual_seed(0)
    a = {"w": torch.randn(300, 70, generator=gen).half(), "ids": torch.arange(77).reshape(1, 77),
         "only_a": torch.randn(1000, generator=gen).to(torch.bfloat16)}
    b = {"w": torch.randn(300, 70, generator=gen).half(), "ids": torch.arange(77).reshape(1, 77) * 2}
    paths = []
    for name, m in (("a", a), ("b", b)):
        path = tmp_path / f"{name}.safetensors"
        write_checkpoint(path, m)
        paths.append(path)
    return paths


def _merge(tmp_path, paths, name, **options):
    import mecha_methods.plugin

    with using(mecha_methods.plugin):
        a, b = (mecha_core.model(str(p)) for p in paths)
        out = tmp_path / name
        mecha_core.merge(mecha_core.weighted_sum(a, b, alpha=0.25), out, allow_missing=True, **options)
        return out.read_bytes()


@pytest.mark.parametrize("chunk", [None, 100])
def test_passed_through_keys_are_copied_with_the_same_bytes(tmp_path, monkeypatch, chunk):
    paths = _models(tmp_path)
    copied = []
    real = SafetensorsFile.copy_to

    def spy(self, key, fd, position, start=0, stop=None):
        done = real(self, key, fd, position, start, stop)
        copied.append((key, done))
        return done

    monkeypatch.setattr(SafetensorsFile, "copy_to", spy)
    fast = _merge(tmp_path, paths, "fast.safetensors", chunk_elements=chunk)
    # the integer buffer (from the first input) and the key only a has went file to file
    assert {k for k, done in copied if done} == {"ids", "only_a"}
    monkeypatch.setattr(passthrough.PassThrough, "__contains__", lambda self, key: False)
    copied.clear()
    slow = _merge(tmp_path, paths, "slow.safetensors", chunk_elements=chunk)
    assert copied == []
    assert fast == slow


def test_a_copy_the_kernel_refuses_falls_back_to_writing(tmp_path, monkeypatch):
    paths = _models(tmp_path)
    monkeypatch.setattr(SafetensorsFile, "copy_to", lambda *a, **k: False)
    refused = _merge(tmp_path, paths, "refused.safetensors")
    monkeypatch.setattr(passthrough.PassThrough, "__contains__", lambda self, key: False)
    assert refused == _merge(tmp_path, paths, "plain.safetensors")


def test_a_passed_through_nan_is_still_refused(tmp_path):
    paths = _models(tmp_path)
    a = {"w": torch.zeros(300, 70).half(), "ids": torch.arange(77).reshape(1, 77),
         "only_a": torch.tensor([1.0, float("nan")]).to(torch.bfloat16)}
    write_checkpoint(paths[0], a)
    with pytest.raises(MergeError, match="only_a.*NaN/Inf"):
        _merge(tmp_path, paths, "nan.safetensors")
    assert not (tmp_path / "nan.safetensors").exists()
    _merge(tmp_path, paths, "allowed.safetensors", allow_nonfinite=True)
    from safetensors.torch import load_file

    assert torch.isnan(load_file(tmp_path / "allowed.safetensors")["only_a"]).tolist() == [False, True]
