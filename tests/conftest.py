"""Fixtures shared by several core test files.

A test file that defines its own fixture of the same name (several reliability files have their
own ``work``) uses its own.
"""

from __future__ import annotations

import mecha_methods.plugin
import pytest
import torch

from mecha_core.testing import using, write_checkpoint

TEMPLATE = ('mecha 1\nbase = parameter("base")\ntuned = parameter("tuned")\nk = parameter("k")\n'
            "add_difference(base, tuned, base, alpha=k)\n")


@pytest.fixture
def methods():
    """The mecha-methods plugin as the current host."""
    with using(mecha_methods.plugin) as host:
        yield host


@pytest.fixture
def work(tmp_path, monkeypatch):
    """The current folder holds a.safetensors, b.safetensors and template.mecha; methods are loaded."""
    write_checkpoint(tmp_path / "a.safetensors", {"w": torch.tensor([1.0, 2.0])})
    write_checkpoint(tmp_path / "b.safetensors", {"w": torch.tensor([3.0, 6.0])})
    (tmp_path / "template.mecha").write_text(TEMPLATE)
    monkeypatch.chdir(tmp_path)
    with using(mecha_methods.plugin):
        yield tmp_path
