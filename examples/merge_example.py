"""The bundled example: write three small checkpoints, merge them with a recipe, report.

Run: python examples/merge_example.py  (writes into examples/out/)
"""

from __future__ import annotations

import os

import torch

import mecha_core as mecha
from mecha_core.testing import write_checkpoint

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "out")


def make_models() -> None:
    """Three tiny 'checkpoints' with the same keys: a base and two fine-tunes of it."""
    gen = torch.Generator().manual_seed(0)
    base = {
        "encoder.weight": torch.randn(64, 32, generator=gen),
        "encoder.bias": torch.randn(64, generator=gen),
        "decoder.weight": torch.randn(32, 64, generator=gen),
        "position_ids": torch.arange(16),
    }
    for name, scale in (("base", 0.0), ("tuned_a", 0.1), ("tuned_b", 0.2)):
        tensors = {k: (v + scale * torch.randn(v.shape, generator=gen)).to(torch.float16)
                   if v.is_floating_point() else v for k, v in base.items()}
        write_checkpoint(os.path.join(OUT, f"{name}.safetensors"), tensors)


RECIPE = """\
mecha 1
# Add tuned_b's fine-tuning to a 70/30 mix of base and tuned_a.
base = model("base")
tuned_a = model("tuned_a")
tuned_b = model("tuned_b")
mix = weighted_sum(base, tuned_a, alpha=0.3)
merged = add_difference(mix, tuned_b, base, alpha=0.5)
"""


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    make_models()
    recipe_path = os.path.join(OUT, "example.mecha")
    with open(recipe_path, "w") as f:
        f.write(RECIPE)
    output = mecha.merge(recipe_path, os.path.join(OUT, "merged.safetensors"))
    print(f"merged 3 models with {os.path.relpath(recipe_path)}")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
