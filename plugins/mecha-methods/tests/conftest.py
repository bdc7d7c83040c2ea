"""Shared pieces of the mecha-methods tests: random fp32 checkpoints and a merge runner.

Every method is run through ``mecha_core.merge`` (plan, engine, file) and the output file is read
back. The runner uses a tiny slice size, so element-wise methods are really evaluated in slices;
a method wrongly flagged element-wise would then disagree with its reference.
"""

from __future__ import annotations

import itertools

import mecha_methods.plugin
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mecha_core
from mecha_core.testing import using, write_checkpoint

#: Key shapes covering the cases methods treat differently: a matrix, a conv kernel, a vector.
SHAPES = {"lin.weight": (12, 6), "conv.weight": (6, 3, 3, 3), "lin.bias": (12,)}


def random_model(seed: int, shapes=SHAPES, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen) * scale for k, s in shapes.items()}


def near(model: dict, seed: int, spread: float) -> dict[str, torch.Tensor]:
    """A fine-tune of ``model``: the same tensors plus noise of size ``spread``."""
    gen = torch.Generator().manual_seed(seed)
    return {k: v + spread * torch.randn(v.shape, generator=gen) for k, v in model.items()}


def assert_close(out, ref, tol: float = 1e-4, what: str = "") -> None:
    """Entry-wise: |out − ref| ≤ tol·max|ref| (a relative error on the tensor's scale)."""
    out = np.asarray(out, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    scale = max(float(np.abs(ref).max()), 1e-12)
    err = float(np.abs(out - ref).max()) / scale
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


class Runner:
    """Writes checkpoints and runs recipes built from them through mecha_core.merge."""

    def __init__(self, folder):
        self.folder = folder
        self.count = itertools.count()

    def files(self, *models: dict) -> list:
        paths = []
        for m in models:
            path = self.folder / f"in{next(self.count)}.safetensors"
            write_checkpoint(path, m)
            paths.append(mecha_core.model(str(path)))
        return paths

    def merge(self, build, *models: dict, chunk_elements: int = 16, **options) -> dict[str, np.ndarray]:
        """``build(*model_nodes)`` returns the recipe; returns the output as float64 arrays."""
        out = self.folder / f"out{next(self.count)}.safetensors"
        recipe = build(*self.files(*models))
        mecha_core.merge(recipe, out, chunk_elements=chunk_elements, **options)
        return {k: v.double().numpy() for k, v in load_file(out).items()}

    def merge_path(self, build, *models: dict, **options):
        out = self.folder / f"out{next(self.count)}.safetensors"
        mecha_core.merge(build(*self.files(*models)), out, **options)
        return out

    def call(self, method: str, *models: dict, **hypers) -> dict[str, np.ndarray]:
        """Merge with ``mecha_core.<method>(*models, **hypers)``."""
        return self.merge(lambda *nodes: getattr(mecha_core, method)(*nodes, **hypers), *models)


@pytest.fixture
def run(tmp_path):
    with using(mecha_methods.plugin):
        yield Runner(tmp_path)


def arrays(model: dict) -> dict[str, np.ndarray]:
    return {k: v.double().numpy() for k, v in model.items()}
