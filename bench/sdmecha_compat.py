"""Compatibility bench: sd-mecha's own output vs mecha's, for recipes sd-mecha itself wrote.

For each recipe below, sd-mecha (1.1.8 and 0.0.29, each in its own virtual environment) builds
the recipe with its Python API, serialises it to a ``.mecha`` file (its text format) and merges
it; then mecha merges that same file (through the mecha-sdmecha plugin) on the same models. The
script prints, per recipe, the largest absolute and relative difference over every key, and the
largest difference in float16 steps (ULPs of the output) — 0 is bit-identical.

The models are small SD1-shaped fp16 checkpoints: every required key of the real sd1-ldm layout
(../shared/data/architectures/sd1-ldm.json), each dimension above 8 divided by 64 (rounded up), so
square, tall and wide matrices and convs keep their kind; four of them (a base and three
fine-tunes of it).

Creating the two environments (torch is NEVER resolved by pip: it comes from the system
site-packages, torch 2.13.0 here; sd-mecha's other dependencies — numpy, scipy, safetensors,
tqdm, click, PyYAML — too, and fuzzywuzzy is installed beside it)::

    python -m venv --system-site-packages /tmp/sdmv-1.1.8
    /tmp/sdmv-1.1.8/bin/pip install --no-deps sd-mecha==1.1.8 fuzzywuzzy
    python -m venv --system-site-packages /tmp/sdmv-0.0.29
    /tmp/sdmv-0.0.29/bin/pip install --no-deps sd-mecha==0.0.29 fuzzywuzzy

Then::

    python bench/sdmecha_compat.py [--work DIR] [--sd-mecha-1 /tmp/sdmv-1.1.8/bin/python]
                                   [--sd-mecha-0 /tmp/sdmv-0.0.29/bin/python] [--only NAME,...]

sd-mecha 1.x merges in float32 (its default merge dtype), 0.0.x in float64; mecha merges each
recipe in the same work dtype. Both write float16.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
#: the real sd1-ldm layout: beside the checkout (../shared), or two levels up from a worktree
LAYOUTS = [os.path.join(ROOT, *up, "shared", "data", "architectures", "sd1-ldm.json") for up in ([".."], ["..", ".."])]

#: name -> sd-mecha 1.1.8 expression (a, b, c, d: models; s: sd_mecha). Random ones carry a seed.
RECIPES_1 = {
    "weighted_sum": "s.weighted_sum(a, b, alpha=0.3)",
    "add_difference": "s.add_difference(a, b, c, alpha=0.7)",
    "slerp": "s.slerp(a, b, alpha=0.4)",
    "add_cosine_a": "s.add_cosine_a(a, b, alpha=0.5)",
    "clamp": "s.clamp(s.add_difference(a, b, c, alpha=1.5), a, b)",
    "train_difference": "s.add_difference(a, b, c, alpha=s.train_difference_mask(a, b, c, alpha=1.0))",
    "add_opposite_mask": "s.add_difference(a, b, c, alpha=s.add_opposite_mask(a, b, c))",
    "add_perpendicular": "s.add_perpendicular(a, b, c, alpha=0.8)",
    "split_unet_te": "s.pick_component(s.weighted_sum(a, b), 'diffuser') | s.add_perpendicular(a, b, c)",
    "geometric_sum": "s.geometric_sum(a, b, alpha=0.4)",
    "multiply_quotient": "s.multiply_quotient(a, b, c, alpha=0.5)",
    "n_model_stock": "s.n_model_stock(a, b, c, d)",
    "crossover": "s.crossover(a, b, alpha=0.4, tilt=0.3)",
    "crossover_sharp": "s.crossover(a, b, alpha=0.4, tilt=0.0)",
    "ties": "s.add_difference_ties(a, b, c, d, k=0.3)",
    "ties_vote_sum": "s.add_difference(a, s.ties_sum(s.subtract(b, a), s.subtract(c, a), s.subtract(d, a), k=0.5, "
                     "vote_sgn=True))",
    "ties_extended": "s.add_difference_ties_extended(a, b, c, d, k=0.4)",
    "ties_extended_stock": "s.add_difference_ties_extended(a, b, c, d, k=0.4, apply_stock=True)",
    "ties_extended_median": "s.add_difference_ties_extended(a, b, c, d, k=0.4, apply_median=True)",
    "ties_with_dare": "s.add_ties_with_dare(a, b, c, d, probability=0.3, k=0.5, seed=7)",
    "ties_with_della": "s.add_ties_with_dare(a, b, c, d, probability=0.3, della_eps=0.1, k=0.5, seed=7)",
    "dropout": "s.dropout(a, b, c, probability=0.5, alpha=0.5, seed=42)",
    "tensor_sum": "s.tensor_sum(a, b, width=0.4, offset=0.3)",
    "top_k_tensor_sum": "s.copy_region(a, b, width=0.5, offset=0.2, top_k=True)",
    "rotate": "s.rotate(a, b, alignment=1.0, alpha=0.3)",
    "rotate_fractional": "s.rotate(a, b, alignment=0.6, alpha=0.2)",
}

#: name -> sd-mecha 0.0.29 expression.
RECIPES_0 = {
    "weighted_sum": "s.weighted_sum(a, b, alpha=0.3)",
    "add_difference": "s.add_difference(a, b, c, alpha=0.7)",
    "train_difference": "s.train_difference(a, b, c, alpha=1.0)",
    "add_perpendicular": "s.add_perpendicular(a, b, c, alpha=0.8)",
    "geometric_sum": "s.geometric_sum(a, b, alpha=0.4)",
    "ties_vote_value": "s.add_difference_ties(a, b, c, d, k=0.3, vote_sgn=0.0)",
    "ties_vote_count": "s.add_difference_ties(a, b, c, d, k=0.3, vote_sgn=1.0)",
    "rotate": "s.rotate(a, b, alignment=1.0, alpha=0.3)",
}

SDMECHA_1 = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
import sd_mecha as s
work, recipes = sys.argv[1], json.loads(sys.argv[2])


class Quiet:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


a, b, c, d = (s.model(f"{work}/{n}.safetensors", "sd1-ldm") for n in "abcd")
for name, expr in recipes.items():
    try:
        r = eval(expr)
        with open(f"{work}/{name}.1.mecha", "w") as f:
            f.write(s.serialize(r))
        s.merge(r, output=f"{work}/{name}.1.sd.safetensors", threads=1, merge_device="cpu",
                merge_dtype=torch.float32, output_dtype=torch.float16, tqdm=Quiet)
        print(json.dumps({"name": name, "ok": True}), flush=True)
    except Exception as exc:
        print(json.dumps({"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
"""

SDMECHA_0 = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
import sd_mecha as s
work, recipes = sys.argv[1], json.loads(sys.argv[2])
a, b, c, d = (s.model(f"{work}/{n}.safetensors", "sd1") for n in "abcd")
class Quiet:
    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False

    def update(self, *args, **kwargs):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


merger = s.RecipeMerger(default_dtype=torch.float64, tqdm=Quiet)
for name, expr in recipes.items():
    try:
        r = eval(expr)
        with open(f"{work}/{name}.0.mecha", "w") as f:
            f.write(s.serialize(r))
        merger.merge_and_save(r, output=f"{work}/{name}.0.sd.safetensors", save_dtype=torch.float16, threads=1)
        print(json.dumps({"name": name, "ok": True}), flush=True)
    except Exception as exc:
        print(json.dumps({"name": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
"""


def small(shape: list[int]) -> list[int]:
    return [s if s <= 8 else math.ceil(s / 64) for s in shape]


def build_models(work: str) -> None:
    import torch
    from mecha_core.kit import save

    layout = next((p for p in LAYOUTS if os.path.exists(p)), None)
    if layout is None:
        sys.exit("sd1-ldm.json not found (expected ../shared/data/architectures beside the checkout)")
    with open(layout) as f:
        keys = {k: v for k, v in json.load(f)["keys"].items() if not v.get("optional")}
    gen = torch.Generator().manual_seed(19)
    base: dict = {}
    for name, scale in zip("abcd", (None, 0.01, 0.01, 0.01)):
        path = os.path.join(work, f"{name}.safetensors")
        tensors = {}
        for key, spec in keys.items():
            shape = small(spec["shape"])
            if spec["dtype"].startswith("int"):
                tensors[key] = torch.arange(shape[-1] if shape else 1).reshape(shape)
            elif scale is None:
                tensors[key] = (torch.randn(shape, generator=gen) * 0.05).half()
            else:  # a fine-tune of a: a small random change
                tensors[key] = (base[key].float() + torch.randn(shape, generator=gen) * scale).half()
        if scale is None:
            base = tensors
        if not os.path.exists(path):
            save(tensors, path)


def compare(ours: str, theirs: str, skip: str = "") -> tuple[float, float, float, int]:
    """(max abs difference, max relative difference, max difference in float16 steps, keys
    compared), over the keys not starting with ``skip`` (when given)."""
    import torch
    from safetensors.torch import load_file

    x, y = load_file(ours), load_file(theirs)
    if set(x) != set(y):
        raise ValueError(f"key sets differ: {len(set(x) ^ set(y))} keys")
    worst_abs = worst_rel = worst_ulp = 0.0
    compared = 0
    for k in x:
        if not x[k].is_floating_point() or (skip and k.startswith(skip)):
            continue
        compared += 1
        a, b = x[k].double(), y[k].double()
        d = torch.where(a == b, torch.zeros_like(a), (a - b).abs())  # equal infinities are no difference
        worst_abs = max(worst_abs, float(d.max()) if d.numel() else 0.0)
        worst_rel = max(worst_rel, float((d / b.abs().clamp(min=1e-6)).max()) if d.numel() else 0.0)
        step = torch.finfo(torch.float16).eps * torch.maximum(a.abs(), b.abs()).clamp(min=2 ** -14)
        worst_ulp = max(worst_ulp, float((d / step).max()) if d.numel() else 0.0)
    return worst_abs, worst_rel, worst_ulp, compared


def run_generation(label: str, python: str, script: str, recipes: dict, work: str, work_dtype: str) -> list[tuple]:
    import mecha_core as mecha

    done = subprocess.run([python, "-c", script, work, json.dumps(recipes)], capture_output=True, text=True,
                          timeout=3600)
    status = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            status[row["name"]] = row
    rows = []
    suffix = "1" if label.startswith("1") else "0"
    for name in recipes:
        row = status.get(name)
        if row is None:
            rows.append((label, name, "sd-mecha did not run", textwrap.shorten(done.stderr, 120)))
            continue
        if not row["ok"]:
            rows.append((label, name, "sd-mecha failed", row["error"]))
            continue
        recipe = os.path.join(work, f"{name}.{suffix}.mecha")
        out = os.path.join(work, f"{name}.{suffix}.mecha.safetensors")
        if os.path.exists(out):
            os.unlink(out)
        try:
            # allow_nonfinite: sd-mecha writes what overflows float16 as inf (unclamped Model Stock's t)
            mecha.merge(recipe, out, work_dtype=work_dtype, output_dtype="float16", threads=1, allow_nonfinite=True)
        except Exception as exc:  # noqa: BLE001 (the row shows why mecha refused)
            rows.append((label, name, "mecha refused", textwrap.shorten(str(exc), 160)))
            continue
        # sd-mecha 0.0.x copies the VAE from the first model unmerged; mecha merges every key
        # (docs/recipe-format.md), so those keys are left out of 0.0.29's comparison
        skip = "first_stage_model." if suffix == "0" else ""
        worst_abs, worst_rel, worst_ulp, n = compare(out, os.path.join(work, f"{name}.{suffix}.sd.safetensors"), skip)
        rows.append((label, name, f"{worst_abs:.3g}", f"{worst_rel:.3g}", f"{worst_ulp:.3g}", str(n)))
        print(f"{label} {name:<22} abs {worst_abs:.3g} rel {worst_rel:.3g} steps {worst_ulp:.3g}", file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=os.path.join(HERE, "out", "sdmecha_compat"))
    parser.add_argument("--sd-mecha-1", default="/tmp/sdmv-1.1.8/bin/python")
    parser.add_argument("--sd-mecha-0", default="/tmp/sdmv-0.0.29/bin/python")
    parser.add_argument("--only", default="", help="comma-separated recipe names (default: all)")
    args = parser.parse_args()
    os.makedirs(args.work, exist_ok=True)
    work = os.path.abspath(args.work)
    build_models(work)
    only = {n for n in args.only.split(",") if n}
    rows = []
    for label, python, script, recipes, dtype in (
            ("1.1.8", args.sd_mecha_1, SDMECHA_1, RECIPES_1, "float32"),
            ("0.0.29", args.sd_mecha_0, SDMECHA_0, RECIPES_0, "float64")):
        chosen = {k: v for k, v in recipes.items() if not only or k in only}
        if not os.path.exists(python):
            rows.append((label, "-", f"no interpreter at {python}", "see the module docstring"))
            continue
        rows += run_generation(label, python, script, chosen, work, dtype)
    print("| sd-mecha | recipe | max abs diff | max rel diff | max fp16 steps | keys compared |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print("| " + " | ".join(r) + " |" + (" |" * (6 - len(r))))


if __name__ == "__main__":
    main()
