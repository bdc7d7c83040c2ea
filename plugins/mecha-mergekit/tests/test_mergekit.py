"""mergekit configs read and merged by mecha-mergekit, checked against plain-torch computations of
mergekit 0.1.5's definitions written here (mergekit/merge_methods, sparsify.py, config.py's
evaluate_setting), on tiny Llama models built with transformers."""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
from mecha_core.errors import MechaError, RecipeError

LAYERS = 3  # conftest's models


def tensors(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


# -- mergekit's definitions, written independently ------------------------------------------------
def t_of(key: str) -> float:
    """mergekit's t: layer i of n at i / (n - 1); tensors outside the layers at 0."""
    found = re.search(r"\.layers\.(\d+)\.", key)
    return int(found.group(1)) / (LAYERS - 1) if found else 0.0


def setting(value, key: str):
    """evaluate_setting: a filter list (first match, substring of the key), a gradient, a scalar."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and isinstance(value[0], dict):
        for entry in value:
            if entry.get("filter") in (None, "*") or entry["filter"] in key:
                return setting(entry["value"], key)
        return None
    if isinstance(value, list):
        x = t_of(key) * (len(value) - 1)
        lo = math.floor(x)
        hi = min(lo + 1, len(value) - 1)
        return value[lo] + (x - lo) * (value[hi] - value[lo])
    return value


def param(name, key, own, glob, default=None):
    for scope in (own, glob):
        if name in scope and setting(scope[name], key) is not None:
            return setting(scope[name], key)
    return default


def top_k_mask(delta, density):
    k = max(1, int(density * delta.numel()))
    mask = torch.zeros(delta.numel())
    mask[delta.abs().flatten().topk(k).indices] = 1
    return mask.reshape(delta.shape)


def band_mask(delta, density, gamma):
    n = delta.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    mask = torch.zeros(n)
    mask[delta.abs().flatten().argsort()[bottom:bottom + keep]] = 1
    return mask.reshape(delta.shape)


def gta_ref(key, base, models, own, glob, *, elect, sparsify, normalize):
    deltas, weights = [], []
    for x, p in zip(models, own):
        d = x - base
        density = param("density", key, p, glob, 1.0)
        if sparsify == "top" and density < 1:
            d = d * top_k_mask(d, density)
        if sparsify == "band" and density < 1:
            d = d * band_mask(d, density, param("gamma", key, p, glob, 0.01))
        w = param("weight", key, p, glob)
        deltas.append(d * w)
        weights.append(torch.full_like(d, w))
    total = sum(deltas)
    if elect:
        sign = torch.where(total >= 0, 1.0, -1.0)  # + where the deltas cancel
        masks = [(torch.sign(d) == sign).float() for d in deltas]
        mixed = sum(d * m for d, m in zip(deltas, masks))
        div = sum(w * m for w, m in zip(weights, masks))
        div = torch.where(div == 0, torch.ones_like(div), div)
    else:
        mixed, div = total, sum(weights)
        div = torch.where(div.abs() < 1e-8, torch.ones_like(div), div)
    if param("normalize", key, {}, glob, normalize):
        mixed = mixed / div
    return base + mixed * param("lambda", key, {}, glob, 1.0)


# -- running mecha ------------------------------------------------------------------------------
def yaml_models(entries) -> str:
    out = []
    for folder, params in entries:
        out.append(f"  - model: {folder}")
        if params:
            out.append(f"    parameters: {params}")
    return "\n".join(out)


def merge(tmp_path, text: str, name: str = "out") -> dict[str, torch.Tensor]:
    cfg = tmp_path / f"{name}.yml"
    cfg.write_text(text)
    folder = mecha.merge(str(cfg), str(tmp_path / name) + "/")
    return tensors(folder)


def check_all(result, reference_of, keys):
    for key in keys:
        torch.testing.assert_close(result[key], reference_of(key), rtol=1e-5, atol=1e-6, msg=key)


def _own(params: str | None) -> dict:
    import yaml
    return yaml.safe_load(params) if params else {}


GTA = {  # method: (elect, sparsify, default normalize)
    "task_arithmetic": (False, None, False),
    "ties": (True, "top", True),
    "breadcrumbs": (False, "band", False),
    "breadcrumbs_ties": (True, "band", False),
}


@pytest.mark.parametrize("method", sorted(GTA))
def test_deterministic_task_arithmetic_family(tmp_path, llamas, method):
    elect, sparsify, normalize = GTA[method]
    gamma = ", gamma: 0.05" if sparsify == "band" else ""
    per_model = [f"{{weight: [0.2, 1.0], density: 0.6{gamma}}}",
                 "{weight: 0.7, density: [{filter: mlp, value: 0.3}, {value: 0.8}]}",
                 "{weight: -0.4}"]
    glob = "{density: 0.5, lambda: 1.3}" if method != "ties" else "{density: 0.5, int8_mask: true}"
    text = (f"merge_method: {method}\nbase_model: {llamas['base']}\nparameters: {glob}\nmodels:\n"
            + yaml_models([(llamas["base"], None)] + list(zip([llamas[n] for n in "abc"], per_model))) + "\n")
    result = merge(tmp_path, text)
    base, xs = tensors(llamas["base"]), [tensors(llamas[n]) for n in "abc"]
    owns = [_own(p) for p in per_model]
    check_all(result, lambda k: gta_ref(k, base[k], [x[k] for x in xs], owns, _own(glob), elect=elect,
                                        sparsify=sparsify, normalize=normalize), base)


def test_ties_elects_plus_where_deltas_cancel(tmp_path, llamas):
    """Two fine-tunes whose deltas are exact opposites: mergekit's sum election picks +, so the
    positive delta survives alone (normalised by its weight), where mecha's ties keeps nothing."""
    root = tmp_path / "opposite"
    shutil.copytree(llamas["base"], root)
    base = tensors(llamas["base"])
    a = tensors(llamas["a"])
    from safetensors.torch import save_file
    halves = {k: torch.zeros_like(base[k]) for k in base}  # a zero base: the deltas are exactly ±x
    plus, minus = root / "plus", root / "minus"
    for folder, sign in ((plus, 1), (minus, -1)):
        shutil.copytree(llamas["base"], folder)
        save_file({k: (halves[k] + sign * a[k] * 0.25).contiguous() for k in base}, str(folder / "model.safetensors"))
    save_file(halves, str(root / "model.safetensors"))
    text = (f"merge_method: ties\nbase_model: {root}\nparameters: {{density: 1.0, weight: 1.0}}\nmodels:\n"
            f"  - model: {plus}\n  - model: {minus}\n")
    result = merge(tmp_path, text)
    for key in base:
        delta = a[key] * 0.25
        expected = halves[key] + torch.where(delta > 0, delta, -delta)  # the positive one of ±delta
        torch.testing.assert_close(result[key], expected, rtol=1e-6, atol=1e-7)
        assert not torch.equal(result[key], halves[key])


def test_linear_normalised_with_gradients_and_filters(tmp_path, llamas):
    per_model = ["{weight: [1, 0, 2]}", "{weight: [{filter: self_attn, value: 0.25}, {value: 3}]}"]
    text = "merge_method: linear\nmodels:\n" + yaml_models(zip([llamas["a"], llamas["b"]], per_model)) + "\n"
    result = merge(tmp_path, text)
    a, b = tensors(llamas["a"]), tensors(llamas["b"])
    owns = [_own(p) for p in per_model]

    def ref(k):
        wa, wb = param("weight", k, owns[0], {}), param("weight", k, owns[1], {})
        return (wa * a[k] + wb * b[k]) / (wa + wb)
    check_all(result, ref, a)


def test_linear_unnormalised_with_base_as_input(tmp_path, llamas):
    text = (f"merge_method: linear\nbase_model: {llamas['base']}\nparameters: {{weight: 0.5, normalize: false}}\n"
            f"models:\n  - model: {llamas['a']}\n    parameters: {{weight: 2}}\n")
    result = merge(tmp_path, text)
    a, base = tensors(llamas["a"]), tensors(llamas["base"])
    check_all(result, lambda k: 2 * a[k] + 0.5 * base[k], a)


def slerp_ref(t, a, b):
    """mergekit's slerp: coefficients from the unit vectors, applied to the raw tensors."""
    x, y = a.flatten().double(), b.flatten().double()
    dot = float((x / x.norm()) @ (y / y.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a.double() + t * b.double()).float()
    theta = math.acos(max(-1.0, min(1.0, dot)))
    return ((math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double()) / math.sin(theta)).float()


def test_slerp_with_the_classic_filtered_gradients(tmp_path, llamas):
    glob = ("{t: [{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]},"
            " {value: 0.5}]}")
    text = (f"merge_method: slerp\nbase_model: {llamas['a']}\nparameters: {glob}\nmodels:\n"
            f"  - model: {llamas['a']}\n  - model: {llamas['c']}\n")
    result = merge(tmp_path, text)
    a, c = tensors(llamas["a"]), tensors(llamas["c"])
    check_all(result, lambda k: slerp_ref(param("t", k, {}, _own(glob)), a[k], c[k]), a)


def nuslerp_ref(t, a, b):
    x, y = a.flatten().double(), b.flatten().double()
    cos = float((x / x.norm()) @ (y / y.norm()))
    theta = math.acos(max(-1.0, min(1.0, cos)))
    return ((math.sin((1 - t) * theta) * a.double() + math.sin(t * theta) * b.double()) / math.sin(theta)).float()


@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(tmp_path, llamas, with_base):
    base_line = f"base_model: {llamas['base']}\n" if with_base else ""
    text = (f"merge_method: nuslerp\n{base_line}models:\n  - model: {llamas['a']}\n    parameters: {{weight: 1}}\n"
            f"  - model: {llamas['b']}\n    parameters: {{weight: 3}}\n")
    result = merge(tmp_path, text)
    a, b, base = tensors(llamas["a"]), tensors(llamas["b"]), tensors(llamas["base"])
    if with_base:
        check_all(result, lambda k: base[k] + nuslerp_ref(0.75, a[k] - base[k], b[k] - base[k]), a)
    else:
        check_all(result, lambda k: nuslerp_ref(0.75, a[k], b[k]), a)


def test_nearswap(tmp_path, llamas):
    text = (f"merge_method: nearswap\nbase_model: {llamas['base']}\nparameters: {{t: 0.02}}\nmodels:\n"
            f"  - model: {llamas['b']}\n")
    result = merge(tmp_path, text)
    base, b = tensors(llamas["base"]), tensors(llamas["b"])

    def ref(k):
        w = torch.clamp(0.02 / torch.clamp((base[k] - b[k]).abs(), min=1e-6), 0, 1)
        return w * b[k] + (1 - w) * base[k]
    check_all(result, ref, base)


def test_model_stock(tmp_path, llamas):
    text = (f"merge_method: model_stock\nbase_model: {llamas['base']}\nmodels:\n"
            f"  - model: {llamas['a']}\n  - model: {llamas['b']}\n  - model: {llamas['c']}\n")
    result = merge(tmp_path, text)
    base, xs = tensors(llamas["base"]), [tensors(llamas[n]) for n in "abc"]

    def ref(k):
        ds = [x[k].flatten().double() - base[k].flatten().double() for x in xs]
        cos = sum(float(p @ q / (p.norm() * q.norm())) for i, p in enumerate(ds) for q in ds[i + 1:]) / 3
        t = 3 * cos / (1 + 2 * cos)
        return (t * sum(x[k].double() for x in xs) / 3 + (1 - t) * base[k].double()).float()
    check_all(result, ref, base)


def test_passthrough_scale_by_filter(tmp_path, llamas):
    text = (f"merge_method: passthrough\nmodels:\n  - model: {llamas['a']}\n"
            "    parameters: {scale: [{filter: o_proj, value: 0.5}, {value: 1.0}]}\n")
    result = merge(tmp_path, text)
    a = tensors(llamas["a"])
    check_all(result, lambda k: a[k] * (0.5 if "o_proj" in k else 1.0), a)


# -- random methods: kept fraction and the L1 rescale, and the formula given the drawn mask --------
@pytest.mark.parametrize("method,extra", [("dare_linear", ""), ("dare_ties", ""), ("della", ", epsilon: 0.1"),
                                          ("della_linear", "")])
def test_random_methods_keep_density_and_the_l1_norm(tmp_path, llamas, method, extra):
    text = (f"merge_method: {method}\nbase_model: {llamas['base']}\nmodels:\n  - model: {llamas['c']}\n"
            f"    parameters: {{weight: 1.0, density: 0.4{extra}}}\n")
    result = merge(tmp_path, text)
    base, c = tensors(llamas["base"]), tensors(llamas["c"])
    kept_total = count_total = 0
    for key in base:
        delta = c[key] - base[key]
        change = result[key] - base[key]
        kept = change != 0
        kept_total, count_total = kept_total + int(kept.sum()), count_total + kept.numel()
        scale = delta.abs().sum() / delta[kept].abs().sum()  # the kept entries rescaled to the L1 norm
        torch.testing.assert_close(change, torch.where(kept, delta * scale, torch.zeros_like(delta)),
                                   rtol=1e-5, atol=1e-7)
    assert abs(kept_total / count_total - 0.4) < 0.02


def test_della_keeps_large_deltas_more_often(tmp_path, llamas):
    """della's keep probability rises with the rank of |δ| in its row: density ± epsilon."""
    text = (f"merge_method: della_linear\nbase_model: {llamas['base']}\nmodels:\n  - model: {llamas['c']}\n"
            "    parameters: {weight: 1.0, density: 0.5, epsilon: 0.4}\n")
    result = merge(tmp_path, text)
    base, c = tensors(llamas["base"]), tensors(llamas["c"])
    key = "model.embed_tokens.weight"
    delta = (c[key] - base[key]).abs()
    kept = result[key] != base[key]
    rank = delta.argsort(dim=1).argsort(dim=1).float() / (delta.shape[1] - 1)
    assert kept[rank > 0.8].float().mean() > 0.75
    assert kept[rank < 0.2].float().mean() < 0.25


def test_dtype_rounds_inputs_and_output(tmp_path, llamas):
    text = (f"merge_method: task_arithmetic\nbase_model: {llamas['base']}\ndtype: bfloat16\nmodels:\n"
            f"  - model: {llamas['a']}\n    parameters: {{weight: 0.5}}\n")
    result = merge(tmp_path, text)
    base, a = tensors(llamas["base"]), tensors(llamas["a"])

    def ref(k):
        b16, a16 = base[k].bfloat16().float(), a[k].bfloat16().float()
        return (b16 + 0.5 * (a16 - b16)).bfloat16().float()
    for key in base:
        torch.testing.assert_close(result[key].float(), ref(key), rtol=0, atol=0)


# -- the config language around the methods -----------------------------------------------------
def test_import_prints_a_recipe_that_merges_to_the_same_bytes(tmp_path, llamas):
    text = (f"merge_method: ties\nbase_model: {llamas['base']}\nparameters: {{density: [0.3, 0.9], weight: 1}}\n"
            f"models:\n  - model: {llamas['a']}\n  - model: {llamas['b']}\n")
    (tmp_path / "c.yml").write_text(text)
    done = subprocess.run([sys.executable, "-m", "mecha_core", "recipe", "import", str(tmp_path / "c.yml")],
                          capture_output=True, text=True, cwd=tmp_path, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("mecha 1") and "mergekit_ties(" in done.stdout
    (tmp_path / "c.mecha").write_text(done.stdout)
    from_yaml = mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "y.safetensors"))
    from_mecha = mecha.merge(str(tmp_path / "c.mecha"), str(tmp_path / "m.safetensors"))
    assert open(from_yaml, "rb").read() == open(from_mecha, "rb").read()


def test_hub_ids_resolve_in_the_local_cache(tmp_path, llamas, monkeypatch):
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tuned" / "snapshots" / "abc123"
    shutil.copytree(llamas["a"], snapshot)
    (cache / "models--org--tuned" / "refs").mkdir()
    (cache / "models--org--tuned" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    text = "merge_method: passthrough\nmodels:\n  - model: org/tuned\n"
    result = merge(tmp_path, text)
    a = tensors(llamas["a"])
    assert all(torch.equal(result[k], a[k]) for k in a)


def test_an_id_not_found_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    (tmp_path / "c.yml").write_text("merge_method: passthrough\nmodels:\n  - model: org/missing\n")
    with pytest.raises(MechaError) as err:
        mecha.merge(str(tmp_path / "c.yml"), str(tmp_path / "o.safetensors"))
    assert "org/missing" in str(err.value) and "looked in" in str(err.value) and "\n" not in str(err.value)
    assert not os.path.exists(tmp_path / "o.safetensors")


@pytest.mark.parametrize("text,line,words", [
    ("merge_method: ties\nbase_model: x\nmodels:\n  - model: y\nfoo: 1\n", 5, "unknown key 'foo'"),
    ("merge_method: linear\nmodels:\n  - model: y\n    parameters:\n      weight: 1\n      densty: 0.5\n", 6,
     "parameter 'densty'"),
    ("merge_method: passthrough\nslices:\n  - sources: []\n", 3, "a slice needs sources"),
    ("merge_method: linear\nmodels:\n  - model: y+lora+x\n", 3, "base+lora"),
    ("merge_method: ram\nbase_model: x\nmodels:\n  - model: y\n", 1, "ram"),
    ("merge_method: frankenmerge\nmodels:\n  - model: y\n", 1, "unknown merge_method"),
    ("merge_method: linear\nmodels:\n  - model: y\n    parameters: {weight: [{filtr: mlp, value: 1}]}\n", 4,
     "'filter' and 'value'"),
    ("merge_method: linear\nmodels:\n  - model: y\ntokenizer_source: union\n", 3, "model 'y'"),
    ("merge_method: linear\nmodels:\n  - model: y\n  - [oops\n", 5, "not valid YAML"),
    ("merge_method: ties\nmodels:\n  - model: y\n", 1, "needs a base_model"),
    ("merge_method: linear\ndtype: int8\nmodels:\n  - model: y\n", 2, "dtype"),
])
def test_bad_configs_name_the_yaml_line(tmp_path, text, line, words):
    (tmp_path / "bad.yml").write_text(text)
    with pytest.raises(RecipeError) as err:
        mecha.load_recipe(str(tmp_path / "bad.yml"))
    message = str(err.value)
    assert "\n" not in message and words in message, message
    assert f"bad.yml:{line}:" in message or f"bad.yml:{line}" in message.split(" ")[0], message


def test_detection_needs_a_yaml_name_and_a_top_level_key():
    from mecha_mergekit.reader import detect
    assert detect("merge_method: linear\n", "c.yml") and detect("models:\n  - model: a\n", "c.YAML")
    assert not detect("merge_method: linear\n", "c.mecha")
    assert not detect("name: x\n  merge_method: linear\n", "c.yml")


def test_multislerp_with_base(tmp_path, llamas):
    text = (f"merge_method: multislerp\nbase_model: {llamas['base']}\nmodels:\n"
            f"  - model: {llamas['a']}\n    parameters: {{weight: 1}}\n  - model: {llamas['b']}\n"
            f"    parameters: {{weight: 2}}\n  - model: {llamas['c']}\n    parameters: {{weight: 1}}\n")
    result = merge(tmp_path, text)
    base, xs = tensors(llamas["base"]), [tensors(llamas[n]) for n in "abc"]
    w = torch.tensor([0.25, 0.5, 0.25], dtype=torch.float64)

    def ref(k):
        ds = [(x[k].double() - base[k].double()).flatten() for x in xs]
        norms = torch.stack([d.norm() for d in ds])
        units = [d / (n + 1e-8) for d, n in zip(ds, norms)]
        mu = sum(wi * u for wi, u in zip(w, units))
        mu = mu / mu.norm()
        tangent = sum(wi * (u - (u @ mu) * mu) for wi, u in zip(w, units))
        tn = tangent.norm() + 1e-8
        point = mu * torch.cos(tn) + tangent * torch.sin(tn) / tn
        return (base[k].double() + (point * (norms * w).sum()).reshape(base[k].shape)).float()
    check_all(result, ref, base)


def test_karcher_of_the_base_and_two_models(tmp_path, llamas):
    text = (f"merge_method: karcher\nbase_model: {llamas['base']}\nparameters: {{max_iter: 50, tol: 1e-9}}\n"
            f"models:\n  - model: {llamas['a']}\n  - model: {llamas['c']}\n")
    result = merge(tmp_path, text)
    xs = [tensors(llamas[n]) for n in ("a", "c", "base")]

    def ref(k):
        """The Fréchet mean on the sphere by many Riemannian gradient steps (converged)."""
        vs = [x[k].double().flatten() for x in xs]
        us = [v / v.norm() for v in vs]
        mean = sum(us) / 3
        mean = mean / mean.norm()
        for _ in range(200):
            logs = []
            for u in us:
                cos = torch.clamp(mean @ u, -1, 1)
                theta = torch.arccos(cos)
                logs.append(torch.zeros_like(u) if theta < 1e-12 else theta / torch.sin(theta) * (u - cos * mean))
            step = sum(logs) / 3
            n = step.norm()
            if n < 1e-14:
                break
            mean = torch.cos(n) * mean + torch.sin(n) * step / n
            mean = mean / mean.norm()
        return (mean * sum(v.norm() for v in vs) / 3).reshape(x_shape(k)).float()

    def x_shape(k):
        return xs[0][k].shape
    check_all(result, ref, xs[0])


def test_sce(tmp_path, llamas):
    text = (f"merge_method: sce\nbase_model: {llamas['base']}\nparameters: {{select_topk: 0.5}}\nmodels:\n"
            f"  - model: {llamas['a']}\n  - model: {llamas['b']}\n  - model: {llamas['c']}\n")
    result = merge(tmp_path, text)
    base, xs = tensors(llamas["base"]), [tensors(llamas[n]) for n in "abc"]

    def ref(k):
        ds = [x[k] - base[k] for x in xs]
        mean = sum(ds) / 3
        var = sum((d - mean) ** 2 for d in ds) / 3
        keep = torch.zeros(var.numel())
        keep[var.flatten().topk(int(torch.count_nonzero(var) * 0.5)).indices] = 1
        ds = [d * keep.reshape(var.shape) for d in ds]
        sign = torch.where(sum(ds) >= 0, 1.0, -1.0)
        ms = [(torch.sign(d) == sign).float() for d in ds]
        energy = torch.tensor([float((d ** 2).mean()) for d in ds])
        energy = energy / energy.sum()
        num = sum(e * m * d for e, m, d in zip(energy, ms, ds))
        den = torch.clamp(sum(e * m for e, m in zip(energy, ms)), min=1e-6)
        return base[k] + num / den
    check_all(result, ref, base)


def test_arcee_fusion(tmp_path, llamas):
    text = (f"merge_method: arcee_fusion\nbase_model: {llamas['base']}\nmodels:\n  - model: {llamas['base']}\n"
            f"  - model: {llamas['b']}\n")
    result = merge(tmp_path, text)
    base, b = tensors(llamas["base"]), tensors(llamas["b"])

    def ref(k):
        p = torch.softmax(b[k], dim=-1) + 1e-8
        q = torch.softmax(base[k], dim=-1) + 1e-8
        score = (b[k] - base[k]).abs() * (p * (p / q).log()).sum(-1, keepdim=True)
        flat = score.flatten().sort().values
        n = flat.numel() - 1
        q1, med, q3 = flat[int(0.25 * n)], flat[int(0.5 * n)], flat[int(0.75 * n)]
        return torch.where(score >= med + 1.5 * (q3 - q1), b[k], base[k])
    check_all(result, ref, base)
