"""sd-mecha 1.x recipes naming sd-mecha's own methods merge to what sd-mecha's definitions give.

Every recipe is written here in sd-mecha's ``version 0.1.0`` text (as sd-mecha 1.1.8 serialises
it: inputs, then every hyperparameter through ``dict`` -> ``literal`` -> ``convert_singleton``),
merged by mecha, and compared with a plain-torch computation of sd-mecha's definition written
here (its order of operations; its random draws for the random methods). The models are small
SD1-layout checkpoints: real sd1-ldm key names (text encoder and U-Net), tiny shapes covering a
vector, square, tall and wide matrices, a 3x3 conv and a 1x1 conv.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_methods.plugin
import mecha_sdmecha.plugin
from mecha_core import load_recipe
from mecha_core.errors import RecipeError
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import plugin_from_functions, using, write_checkpoint

TE = "cond_stage_model.transformer.text_model.encoder.layers.0."
UNET = "model.diffusion_model."
KEYS = {
    TE + "self_attn.q_proj.weight": KeySpec((6, 6), "float32", "clip_l", blocks=("BASE",), klass="q_proj"),
    TE + "mlp.fc1.weight": KeySpec((8, 6), "float32", "clip_l", blocks=("BASE",), klass="mlp_fc1"),
    TE + "mlp.fc2.weight": KeySpec((6, 8), "float32", "clip_l", blocks=("BASE",), klass="mlp_fc2"),
    TE + "layer_norm1.bias": KeySpec((6,), "float32", "clip_l", blocks=("BASE",), klass="layer_norm1"),
    UNET + "input_blocks.1.0.in_layers.2.weight": KeySpec((4, 4, 3, 3), "float32", "diffuser", blocks=("IN01",),
                                                           klass="in_layers_2"),
    UNET + "input_blocks.1.1.proj_in.weight": KeySpec((4, 4, 1, 1), "float32", "diffuser", blocks=("IN01",),
                                                       klass="proj_in"),
    UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight": KeySpec((4, 6), "float32", "diffuser",
                                                                               blocks=("IN01",), klass="to_k"),
    UNET + "out.2.bias": KeySpec((4,), "float32", "diffuser", blocks=("OUT11",), klass="out_2"),
}
SMALL_SD1 = Architecture("sd1-ldm", KEYS, blocks=("BASE", "IN01", "OUT11"),
                         classes=tuple(sorted({s.klass for s in KEYS.values()})), aliases=("sd1",),
                         component_aliases={"txt": "clip_l", "unet": "diffuser"})
SMALL_SD1_PLUGIN = plugin_from_functions("small_sd1", mecha_architectures=lambda: [SMALL_SD1])
SQUARE_TALL_CONV = [TE + "self_attn.q_proj.weight", TE + "mlp.fc1.weight", UNET + "input_blocks.1.0.in_layers.2.weight",
                    UNET + "input_blocks.1.1.proj_in.weight"]


def tensors(seed: int, base: dict | None = None, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Random weights; with ``base``, a fine-tune of it (base + scale · noise)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, spec in KEYS.items():
        noise = torch.randn(spec.shape, generator=g)
        out[k] = noise if base is None else base[k] + scale * noise
    return out


@pytest.fixture
def models(tmp_path):
    base = tensors(0)
    t = {"a": base, "b": tensors(1, base, 0.3), "c": tensors(2, base, 0.3), "d": tensors(3, base, 0.3)}
    for name, sd in t.items():
        write_checkpoint(tmp_path / f"{name}.safetensors", sd)
    with using(mecha_methods.plugin, mecha_sdmecha.plugin, SMALL_SD1_PLUGIN):
        yield tmp_path, t


class Recipe:
    """Lines of an sd-mecha 1.x recipe, with the instruction index each line takes."""

    def __init__(self, *models: str):
        self.lines = ["version 0.1.0"]
        for m in models:
            self.lines.append(f'model "{m}.safetensors" model_config="sd1-ldm" merge_space="weight"')

    def add(self, line: str) -> str:
        self.lines.append(line)
        return f"&{len(self.lines) - 2}"

    def value(self, v: str) -> str:
        """A scalar hyperparameter as sd-mecha 1.x writes it: three lines."""
        d = self.add(f"dict key={v}")
        lit = self.add(f'literal {d} model_config="singleton-mecha" merge_space="param"')
        return self.add(f'merge "convert_singleton" {lit}')

    @property
    def text(self) -> str:
        return "\n".join(self.lines)  # no final newline, as sd-mecha writes


def merged(folder, text: str) -> dict[str, torch.Tensor]:
    out = folder / "out.safetensors"
    if out.exists():
        out.unlink()
    mecha.merge(text, out, models_dir=folder)
    return load_file(out)


def check(got: dict, want: dict, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k].to(got[k].dtype), atol=atol, rtol=rtol), (
            k, (got[k] - want[k]).abs().max().item())


# -- train difference (sd-mecha 1.x's add_difference(a, b, c, alpha=train_difference_mask(a, b, c))) --
def test_train_difference_mask_as_add_differences_alpha(models):
    folder, t = models
    r = Recipe("a", "b", "c")
    diff = r.add('merge "subtract" &1 &2')
    mask = r.add(f'merge "train_difference_mask" &0 &1 &2 {r.value("0.7")}')
    ad = r.add(f'merge "add_difference" &0 {diff} {mask}')
    r.add(f'merge "fallback" {ad} &0')
    assert load_recipe(r.text).args[0].method.name == "sdmecha_add_difference_masked"
    want = {}
    for k in KEYS:
        a, b, c = t["a"][k], t["b"][k], t["c"][k]
        m = 0.7 * 1.8 * torch.nan_to_num((b - a).abs() / ((b - a).abs() + (b - c).abs()), nan=0)
        want[k] = a + (b - c) * m
    check(merged(folder, r.text), want)


def test_add_opposite_masks(models):
    folder, t = models
    for name in ("add_opposite_mask", "add_strict_opposite_mask"):
        r = Recipe("a", "b", "c")
        diff = r.add('merge "subtract" &1 &2')
        mask = r.add(f'merge "{name}" &0 &1 &2 {r.value("1.0")}')
        r.add(f'merge "add_difference" &0 {diff} {mask}')
        want = {}
        for k in KEYS:
            a, b, c = t["a"][k], t["b"][k], t["c"][k]
            if name == "add_opposite_mask":
                m = 2 * torch.nan_to_num((a - b).abs() / ((a - b).abs() + (a + b - 2 * c).abs()), nan=0)
            else:
                th = torch.maximum((a - c).abs(), (b - c).abs())
                m = 2 * torch.clamp(torch.nan_to_num((c - a) * (b - c) / th ** 2, nan=0), min=0)
            want[k] = a + (b - c) * m
        check(merged(folder, r.text), want)


# -- add_perpendicular (a wrapper: subtract, perpendicular_component, add_difference) ---------------
def perpendicular(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y minus its projection on x, both flattened."""
    xf, yf = x.flatten().double(), y.flatten().double()
    return (yf - xf * (xf @ yf) / (xf @ xf)).reshape(x.shape)


def test_add_perpendicular(models):
    folder, t = models
    r = Recipe("a", "b", "c")
    da = r.add('merge "subtract" &0 &2')
    db = r.add('merge "subtract" &1 &2')
    perp = r.add(f'merge "perpendicular_component" {da} {db}')
    r.add(f'merge "add_difference" &0 {perp} {r.value("0.5")}')
    want = {k: t["a"][k] + 0.5 * perpendicular(t["a"][k] - t["c"][k], t["b"][k] - t["c"][k]).float() for k in KEYS}
    check(merged(folder, r.text), want, atol=1e-5)


def test_the_sd1_split_of_sd_mechas_recipe_serialize_example(models):
    # examples/recipe_serialize.py: pick_component(weighted_sum(a, b), "diffuser") | add_perpendicular(a, b, c)
    folder, t = models
    r = Recipe("a", "b", "c")
    ws = r.add(f'merge "weighted_sum" &0 &1 {r.value("0.5")}')
    comp = r.add('dict key="diffuser"')
    lit = r.add(f'literal {comp} model_config="singleton-mecha" merge_space="param"')
    name = r.add(f'merge "convert_singleton" {lit}')
    pick = r.add(f'merge "pick_component" {ws} {name}')
    da = r.add('merge "subtract" &0 &2')
    db = r.add('merge "subtract" &1 &2')
    perp = r.add(f'merge "perpendicular_component" {da} {db}')
    te = r.add(f'merge "add_difference" &0 {perp} {r.value("1.0")}')
    r.add(f'merge "fallback" {pick} {te}')
    want = {}
    for k, spec in KEYS.items():
        a, b, c = t["a"][k], t["b"][k], t["c"][k]
        want[k] = (0.5 * a + 0.5 * b if spec.component == "diffuser"
                   else a + perpendicular(a - c, b - c).float())
    check(merged(folder, r.text), want, atol=1e-5)


# -- geometric_sum, multiply_quotient, scale -----------------------------------------------------------
def test_geometric_sum_takes_complex_powers(models):
    folder, t = models
    r = Recipe("a", "b")
    r.add(f'merge "geometric_sum" &0 &1 {r.value("0.3")}')
    want = {}
    for k in KEYS:
        a, b = t["a"][k].double(), t["b"][k].double()
        # |a|^0.7·|b|^0.3·cos(π·(0.7·[a<0] + 0.3·[b<0])): the principal complex powers' real part
        phase = math.pi * (0.7 * (a < 0).double() + 0.3 * (b < 0).double())
        want[k] = (a.abs() ** 0.7 * b.abs() ** 0.3 * torch.cos(phase)).float()
    check(merged(folder, r.text), want, atol=1e-5)


def test_multiply_quotient_and_scale(models):
    folder, t = models
    r = Recipe("a", "b", "c")
    mq = r.add(f'merge "multiply_quotient" &0 &1 &2 {r.value("0.5")}')
    delta = r.add(f'merge "subtract" {mq} &2')
    scaled = r.add(f'merge "scale" {delta} {r.value("2.0")}')
    r.add(f'merge "add_difference" &2 {scaled} {r.value("1.0")}')
    want = {}
    for k in KEYS:
        a, b, c = (t[n][k].double() for n in "abc")
        ac, bc = torch.log(a.abs() / c.abs()), torch.log(b.abs() / c.abs())
        power = 0.5 * torch.clamp(-ac * bc / torch.maximum(ac.abs(), bc.abs()) ** 2, min=0)
        ratio = b / c
        value = a * ratio.abs() ** power * torch.cos(math.pi * power * (ratio < 0).double())
        want[k] = (c + 2.0 * (value - c)).float()
    check(merged(folder, r.text), want, atol=1e-4)


# -- model stock: cosine per row, t unclamped (model_stock and the n_model_stock wrapper) ----------------
def model_stock_reference(deltas: list[torch.Tensor]) -> torch.Tensor:
    n = len(deltas)
    rows = [d.double() for d in deltas]
    cos = []
    for x, y in zip(rows, rows[1:]):
        dot = (x * y).sum(-1)
        cos.append(dot / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-6))  # rows along the last dim
    c = torch.stack(cos).mean(0)
    t = (n * c / (1 + (n - 1) * c)).unsqueeze(-1)
    return torch.nan_to_num(t * sum(rows) / n).float()


def test_n_model_stock(models):
    folder, t = models
    r = Recipe("a", "b", "c", "d")
    deltas = [r.add(f'merge "subtract" &{i} &0') for i in (1, 2, 3)]
    ms = r.add(f'merge "model_stock" {" ".join(deltas)} cos_eps={r.value("1e-06")}')
    r.add(f'merge "add_difference" &0 {ms} {r.value("1.0")}')
    want = {k: t["a"][k] + model_stock_reference([t[n][k] - t["a"][k] for n in "bcd"]) for k in KEYS}
    got = merged(folder, r.text)
    check(got, want, atol=1e-5, rtol=1e-4)  # t is large where the cosine nears −1/(n − 1): compare relatively
    # t is per row and not clamped: some rows of the square key scale the mean by t outside [0, 1]
    k = TE + "self_attn.q_proj.weight"
    mean = sum(t[n][k] - t["a"][k] for n in "bcd") / 3
    ratio = (got[k] - t["a"][k]) / mean
    assert ratio.std(dim=-1).max() < 1e-3 and ratio[:, 0].unique().numel() > 1


# -- crossover: sd-mecha's smooth filter ---------------------------------------------------------------
def crossover_reference(a: torch.Tensor, b: torch.Tensor, alpha: float, tilt: float) -> torch.Tensor:
    """sd-mecha's filter for 0 < tilt < 1: per rfftn bin the RMS over dims of its frequency ramp
    (last dim 0..1, the others 0..1..0 with negative frequencies mirrored), then a ramp of slope
    cot(π·tilt/2) through (1 − alpha) clipped to [0, 1]."""
    spectrum_a, spectrum_b = torch.fft.rfftn(a.double()), torch.fft.rfftn(b.double())
    axes = []
    for i, s in enumerate(spectrum_a.shape):
        if i == len(spectrum_a.shape) - 1 or s == 1:
            axes.append(torch.linspace(0, 1, s, dtype=torch.float64))
        else:  # frequencies 0, 1, ..., then negative ones, as |f| / (s // 2)
            f = torch.tensor([min(j, s - j) if j < s - s // 2 else s - j for j in range(s)], dtype=torch.float64)
            first = torch.linspace(0, (s - 1) // 2, s - s // 2, dtype=torch.float64)
            second = torch.linspace(s // 2, 1, s // 2, dtype=torch.float64)
            assert torch.allclose(torch.cat([first, second]), f)
            axes.append(f / (s // 2))
    grids = torch.meshgrid(*(x ** 2 for x in axes), indexing="ij")
    mesh = (sum(grids) / len(axes)).sqrt() if len(axes) > 1 else axes[0]
    cot = 1 / math.tan(math.pi * tilt / 2)
    f = (mesh * cot + alpha * cot + alpha - cot).clip(0, 1)
    return torch.fft.irfftn((1 - f) * spectrum_a + f * spectrum_b, s=a.shape).float()


def test_crossover_uses_sd_mechas_smooth_filter(models):
    folder, t = models
    r = Recipe("a", "b")
    r.add(f'merge "crossover" &0 &1 {r.value("0.4")} {r.value("0.25")}')
    want = {k: crossover_reference(t["a"][k], t["b"][k], 0.4, 0.25) for k in KEYS}
    check(merged(folder, r.text), want, atol=1e-5)


# -- TIES: the keep rule, extended and with dropout -------------------------------------------------------
def trim(delta: torch.Tensor, k: float) -> torch.Tensor:
    """sd-mecha's filter_top_k by sorting: the threshold is the max(int((1 − k)·n), 1)-th smallest
    magnitude, every entry at least that large is kept."""
    threshold = delta.flatten().abs().sort().values[max(int((1 - k) * delta.numel()), 1) - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_parts(deltas: list[torch.Tensor], k: float, by_value: bool) -> tuple[torch.Tensor, torch.Tensor]:
    trimmed = torch.stack([trim(d, k) for d in deltas])
    sign = torch.sign(trimmed.sum(0) if by_value else torch.sign(trimmed).sum(0))
    agree = torch.sign(trimmed) == sign
    return trimmed * agree, agree.sum(0).double()


def test_ties_keeps_every_entry_tied_with_the_threshold_in_half_precision(tmp_path):
    # fp16 weights give float32 deltas with many equal magnitudes: sd-mecha keeps all of them
    g = torch.Generator().manual_seed(5)
    key = TE + "self_attn.q_proj.weight"
    base = torch.randn((64, 64), generator=g).half()  # fp16 steps of 1/1024 to 1/512 here: deltas repeat
    tuned = [(base.float() + torch.randn((64, 64), generator=g) * 0.002).half() for _ in range(2)]
    arch = Architecture("sd1-ldm", {key: KeySpec((64, 64), "float16", "clip_l")}, aliases=("sd1",))
    for name, w in zip("abc", [base, *tuned]):
        write_checkpoint(tmp_path / f"{name}.safetensors", {key: w})
    r = Recipe("a", "b", "c")
    d1, d2 = r.add('merge "subtract" &1 &0'), r.add('merge "subtract" &2 &0')
    ties = r.add(f'merge "ties_sum" {d1} {d2} k={r.value("0.3")} vote_sgn={r.value("false")}')
    r.add(f'merge "add_difference" &0 {ties} {r.value("1.0")}')
    fp16_plugin = plugin_from_functions("fp16_sd1", mecha_architectures=lambda: [arch])
    with using(mecha_methods.plugin, mecha_sdmecha.plugin, fp16_plugin):
        got = merged(tmp_path, r.text)[key]
    deltas = [w.float() - base.float() for w in tuned]
    kept = [int((trim(d, 0.3) != 0).sum()) for d in deltas]
    assert all(n > int(0.3 * 64 * 64) + 2 for n in kept)  # more than int(k·n) + 2: ties with the threshold
    filtered, counts = ties_parts(deltas, 0.3, by_value=False)
    want = base.float() + torch.nan_to_num(filtered.double().sum(0) / counts, nan=0).float()
    assert torch.equal(got, want.half())


@pytest.mark.parametrize("apply_stock, apply_median", [("false", "false"), ("true", "false"), ("false", "true")])
def test_ties_sum_extended(models, apply_stock, apply_median):
    folder, t = models
    r = Recipe("a", "b", "c", "d")
    deltas = [r.add(f'merge "subtract" &{i} &0') for i in (1, 2, 3)]
    hypers = {"k": "0.5", "vote_sgn": "true", "apply_stock": apply_stock, "apply_median": apply_median,
              "cos_eps": "1e-06", "eps": "1e-06", "maxiter": "100", "ftol": "1e-20"}
    words = " ".join(f"{name}={r.value(v)}" for name, v in hypers.items())
    ext = r.add(f'merge "ties_sum_extended" {" ".join(deltas)} {words}')
    r.add(f'merge "add_difference" &0 {ext} {r.value("1.0")}')
    want = {}
    for key in KEYS:
        ds = [t[n][key] - t["a"][key] for n in "bcd"]
        filtered, counts = ties_parts(ds, 0.5, by_value=True)
        if apply_median == "true":
            out = weiszfeld(list(filtered))  # float32, as sd-mecha iterates (100 steps: rounding matters)
        else:
            # sd-mecha 1.1.8 scales by Model Stock's t when apply_stock is FALSE (t = 1 when true)
            t_ = 1.0 if apply_stock == "true" else stock_t([f.double() for f in filtered])
            out = filtered.double().sum(0) * t_ / counts
        want[key] = t["a"][key] + torch.nan_to_num(out, nan=0, posinf=0, neginf=0).float()
    check(merged(folder, r.text), want, atol=1e-5)


def stock_t(deltas: list[torch.Tensor]) -> torch.Tensor:
    n = len(deltas)
    cos = [(x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp(min=1e-6) for x, y in zip(deltas, deltas[1:])]
    c = torch.stack(cos).mean(0)
    return (n * c / (1 + (n - 1) * c)).unsqueeze(-1)


def weiszfeld(points: list[torch.Tensor], eps: float = 1e-6, maxiter: int = 100, ftol: float = 1e-20) -> torch.Tensor:
    """sd-mecha's geometric median: Weiszfeld steps from the mean; stops when the objective (mean
    distance) changes by at most ftol of itself; the result is re-weighted by the last weights."""
    median = sum(points) / len(points)
    weights = torch.ones(len(points), dtype=points[0].dtype)
    objective = torch.stack([torch.dist(p, median) for p in points]).mean()
    for _ in range(maxiter):
        previous = objective
        weights = 1 / torch.stack([torch.dist(p, median) for p in points]).clamp(min=eps)
        median = sum(p * w for p, w in zip(points, weights)) / weights.sum()
        objective = torch.stack([torch.dist(p, median) for p in points]).mean()
        if abs(previous - objective) <= ftol * objective:
            break
    return sum(p * w for p, w in zip(points, weights)) / weights.sum()


@pytest.mark.parametrize("della_eps, seed", [("0.0", "7"), ("0.2", "null")])
def test_ties_sum_with_dropout_draws_sd_mechas_masks(models, della_eps, seed):
    folder, t = models
    r = Recipe("a", "b", "c")
    deltas = [r.add(f'merge "subtract" &{i} &0') for i in (1, 2)]
    hypers = {"probability": "0.3", "della_eps": della_eps, "rescale": "true", "k": "0.6", "vote_sgn": "false",
              "apply_stock": "true", "cos_eps": "1e-06", "apply_median": "false", "eps": "1e-06", "maxiter": "100",
              "ftol": "1e-20", "seed": seed}
    words = " ".join(f"{name}={r.value(v)}" for name, v in hypers.items())
    dropped = r.add(f'merge "ties_sum_with_dropout" {" ".join(deltas)} {words}')
    r.add(f'merge "add_difference" &0 {dropped} {r.value("1.0")}')
    want = {}
    for key in KEYS:
        # one generator per key: seeded with the seed, or left at torch's fixed initial seed for null
        gen = torch.Generator()
        if seed != "null":
            gen.manual_seed(int(seed))
        masked = []
        for n in "bc":
            d = t[n][key] - t["a"][key]
            p = torch.full_like(d, 0.7)
            if della_eps != "0.0":
                order = torch.argsort(d.abs().flatten(), stable=True)
                rank = torch.empty(d.numel(), dtype=torch.float64)
                rank[order] = torch.arange(1, d.numel() + 1, dtype=torch.float64)
                p = p + ((rank / d.numel() - (d.numel() + 1) / (2 * d.numel())) * float(della_eps)).reshape(d.shape)
            masked.append(d * torch.bernoulli(p.clamp(0, 1), generator=gen))
        filtered, counts = ties_parts(masked, 0.6, by_value=False)
        out = torch.nan_to_num(filtered.double().sum(0) / counts, nan=0, posinf=0, neginf=0)
        want[key] = t["a"][key] + (out / 0.7).float()
    check(merged(folder, r.text), want, atol=1e-5)


def test_dropout_draws_numpys_masks_from_the_seed(models):
    folder, t = models
    r = Recipe("a", "b", "c")
    deltas = [r.add(f'merge "subtract" &{i} &0') for i in (1, 2)]
    hypers = {"probability": "0.6", "rescale": "1.0", "overlap": "1.0", "overlap_emphasis": "0.0", "seed": "42"}
    words = " ".join(f"{name}={r.value(v)}" for name, v in hypers.items())
    dropped = r.add(f'merge "dropout" {" ".join(deltas)} {words}')
    r.add(f'merge "add_difference" &0 {dropped} {r.value("0.5")}')
    want = {}
    for key, spec in KEYS.items():
        rng = np.random.default_rng(42)  # a fresh generator per key, as sd-mecha makes one
        masks = [torch.from_numpy(rng.binomial(1, 0.4, size=spec.shape)).bool() for _ in range(2)]
        ds = [t[n][key] - t["a"][key] for n in "bc"]
        total = sum(torch.where(m, d, torch.zeros_like(d)) for m, d in zip(masks, ds))
        count = (masks[0].int() + masks[1].int()).clamp(min=1)
        want[key] = t["a"][key] + 0.5 * (total / count / 0.4)
    check(merged(folder, r.text), want, atol=1e-5)


def test_dropout_without_a_seed_is_refused_naming_the_line(models):
    r = Recipe("a", "b")
    d = r.add('merge "subtract" &1 &0')
    r.add(f'merge "dropout" {d} seed={r.value("null")}')
    with pytest.raises(RecipeError, match=r"^<recipe>:8:7: .*seed=null draws new random masks"):
        load_recipe(r.text)


# -- rotate with a fractional alignment on square, tall and conv keys ----------------------------------
def rotate_reference(a: torch.Tensor, b: torch.Tensor, alignment: float, alpha: float) -> torch.Tensor:
    """sd-mecha's rotate for rows ≥ columns: centre the rows, Q = U·Vᵀ from svd(a_cᵀ·b_c) with the
    reflection cancelled (det Q = 1), Q^t as exp(t·log Q) (its principal logarithm, real skew)."""
    conv = a.dim() == 4 and a.shape[-2:].numel() != 1
    rows = a.shape[:2].numel() if conv else a.shape[0]
    x, y = a.double().reshape(rows, -1), b.double().reshape(rows, -1)
    mx, my = x.mean(0), y.mean(0)
    x, y = x - mx, y - my
    u, _, vh = torch.linalg.svd(x.T @ y)
    if torch.det(u @ vh) < 0:
        u[:, -1] = -u[:, -1]
    q = u @ vh
    values, vectors = torch.linalg.eig(q)
    log_q = (vectors @ torch.diag(values.log()) @ torch.linalg.inv(vectors)).real
    log_q = (log_q - log_q.T) / 2
    x = torch.lerp(x, y @ q.T, alpha)
    out = x @ torch.linalg.matrix_exp(alignment * log_q) + torch.lerp(mx, my, alignment)
    return out.reshape(a.shape).float()


def test_rotate_with_a_fractional_alignment_on_square_tall_and_conv_keys(models):
    folder, t = models
    r = Recipe("a", "b")
    values = [r.value(v) for v in ("0.4", "0.25", "1.0", "1e-08", "100")]
    r.add(f'merge "rotate" &0 &1 {" ".join(values)}')
    assert load_recipe(r.text).method.name == "sdmecha_rotate"
    got = merged(folder, r.text)
    for k in SQUARE_TALL_CONV:
        torch.testing.assert_close(got[k], rotate_reference(t["a"][k], t["b"][k], 0.4, 0.25), atol=1e-4, rtol=1e-4,
                                   msg=k)
    for k in (TE + "layer_norm1.bias", UNET + "out.2.bias"):  # vectors: lerp by alpha
        torch.testing.assert_close(got[k], torch.lerp(t["a"][k], t["b"][k], 0.25))
    # a wide key with alignment 1 (no fractional power) is rotated onto b's row space exactly
    wide = UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_k.weight"
    assert torch.isfinite(got[wide]).all() and not torch.equal(got[wide], t["a"][wide])


@pytest.mark.parametrize("name, reason", [("exchange_ema", "EMA keys"), ("truncate_rank", "SVD truncation"),
                                          ("stack", "shape"), ("rebasin", "permutation graphs")])
def test_methods_mecha_does_not_read_are_refused_with_a_reason(models, name, reason):
    r = Recipe("a", "b")
    r.add(f'merge "{name}" &0 &1')
    with pytest.raises(RecipeError, match=f"<recipe>:4:7: .*'{name}' has no mecha counterpart: .*{reason}"):
        load_recipe(r.text)
