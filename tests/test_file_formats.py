"""The file-format hook: a plugin's format is opened by suffix, merges like safetensors, and its
failures and bad specs are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_methods.plugin
from mecha_core.errors import MechaError
from mecha_core.specs import FileFormat, TensorInfo
from mecha_core.testing import plugin_from_functions, using, write_checkpoint
from mecha_core.validate import spec_errors


class _JsonWeights:
    """A toy format: tensors as JSON lists (``{key: [[...], ...]}``), read one key at a time."""

    def __init__(self, path: str):
        with open(path) as f:
            try:
                self.data = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not a JSON weights file: {exc.msg}") from None
        self.keys = {k: TensorInfo(tuple(torch.tensor(v).shape), "float32") for k, v in self.data.items()}
        self.metadata = {"format": "json"}
        self.reads: list[str] = []
        _opened.append(self)

    def read(self, key: str) -> torch.Tensor:
        self.reads.append(key)
        return torch.tensor(self.data[key], dtype=torch.float32)

    def close(self) -> None:
        pass


_opened: list[_JsonWeights] = []
JSON_FORMAT = plugin_from_functions("jsonw", mecha_file_formats=lambda: [
    FileFormat("jsonw", (".jsonw",), open=_JsonWeights, description="tensors as JSON lists")])


def test_a_plugin_format_merges_with_safetensors(tmp_path):
    a = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    b = {"w": torch.randn(3, 4), "b": torch.randn(3)}
    write_checkpoint(tmp_path / "a.safetensors", a)
    (tmp_path / "b.jsonw").write_text(json.dumps({k: v.tolist() for k, v in b.items()}))
    with using(mecha_methods.plugin, JSON_FORMAT):
        out = tmp_path / "o.safetensors"
        mecha_core.merge(mecha_core.weighted_sum(mecha_core.model(str(tmp_path / "a.safetensors")),
                                                 mecha_core.model(str(tmp_path / "b.jsonw")), alpha=0.25), out)
    merged = load_file(str(out))
    for key in a:
        torch.testing.assert_close(merged[key], a[key] * 0.75 + b[key] * 0.25)
    assert sorted(_opened[-1].reads) == ["b", "w"]  # each key read once, through the format


def test_a_file_the_format_refuses_is_one_line_naming_it(tmp_path):
    (tmp_path / "bad.jsonw").write_text("{not json")
    with using(mecha_methods.plugin, JSON_FORMAT):
        with pytest.raises(MechaError) as err:
            mecha_core.merge(mecha_core.model(str(tmp_path / "bad.jsonw")), tmp_path / "o.safetensors")
    assert "bad.jsonw" in str(err.value) and "not a JSON weights file" in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


@pytest.mark.parametrize("fmt, problem", [
    (FileFormat("x", (), open=print), "suffixes must be a non-empty tuple"),
    (FileFormat("x", (".GGUF",), open=print), "must be lower case"),
    (FileFormat("x", (".safetensors",), open=print), "not be .safetensors"),
    (FileFormat("x", (".x",), open="nope"), "open must be callable"),
])
def test_bad_file_format_specs(fmt, problem):
    errors = spec_errors(fmt)
    assert len(errors) == 1 and problem in errors[0] and "file format 'x'" in errors[0]
    assert spec_errors(FileFormat("x", (".x",), open=print)) == []
