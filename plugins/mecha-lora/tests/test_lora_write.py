"""Extracting a LoRA from two checkpoints and merging LoRA files, checked against SVD optima and
sums of deltas computed here; the written files are read back through mecha."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core
import mecha_lora
from mecha_core.errors import PlanError
from mecha_core.testing import write_checkpoint

from .conftest import SHARED, module_lora_pair, rnd

SD1 = "sd1-ldm"
NAMES = ["lora_te_text_model_encoder_layers_0_self_attn_q_proj",            # 768 x 768
         "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",  # 320 x 768
         "lora_unet_down_blocks_0_resnets_0_conv1"]                       # 320 x 320 x 3 x 3


def spectrum_delta(gen, out, inp, n=48, decay=0.9):
    """U·diag(s)·Vᵀ with orthonormal U, V: a difference with a decaying spectrum whose singular
    values are known exactly, so the best rank-r error is closed-form (see optimum_error)."""
    u = torch.linalg.qr(torch.randn(out, n, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(inp, n, generator=gen)).Q
    return u @ torch.diag(SPECTRUM(n, decay)) @ v.T


def SPECTRUM(n=48, decay=0.9):
    return 0.5 * decay ** torch.arange(n, dtype=torch.float32)


def optimum_error(delta, rank):
    """Eckart–Young: the best rank-r error is the norm of the discarded singular values."""
    s = torch.linalg.svdvals(delta) if delta is not None else SPECTRUM()
    return float(s[rank:].square().sum().sqrt())


def factors(lora, name):
    down, up = lora[f"{name}.lora_down.weight"].float(), lora[f"{name}.lora_up.weight"].float()
    r = down.shape[0]
    alpha = float(lora[f"{name}.alpha"]) if f"{name}.alpha" in lora else r
    return alpha / r * (up.reshape(up.shape[0], r) @ down.reshape(r, -1)), r


def test_extract_lora_is_near_the_svd_optimum_and_loads_back(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(21)
    mods = [kit.module(SD1, n) for n in NAMES]
    same = kit.module(SD1, "lora_unet_down_blocks_0_resnets_1_conv2")  # identical in both files
    base_path, base = kit.make_base(tmp_path, mods + [same])
    tuned, deltas = dict(base), {}
    for m in mods:
        deltas[m.key] = spectrum_delta(gen, m.shape[0], m.in_flat)
        tuned[m.key] = base[m.key] + deltas[m.key].reshape(m.key_shape)
    tuned_path = tmp_path / "tuned.safetensors"
    write_checkpoint(tuned_path, tuned)

    rank, conv_rank = 8, 5
    out_path = mecha_lora.extract_lora(tuned_path, base_path, tmp_path / "extracted.safetensors",
                                       rank=rank, conv_rank=conv_rank)
    lora = load_file(out_path)
    assert {k.split(".")[0] for k in lora} == {m.kohya_name for m in mods}  # nothing for the unchanged layer
    for m in mods:
        approx, r = factors(lora, m.kohya_name)
        assert r == (conv_rank if m.shape[-1] == 3 else rank)
        delta = tuned[m.key].reshape(m.shape[0], -1) - base[m.key].reshape(m.shape[0], -1)
        best = optimum_error(None, r)
        assert float((delta - approx).norm()) <= 1.01 * best, m.kohya_name
        assert lora[f"{m.kohya_name}.lora_up.weight"].dtype == torch.float32  # the inputs' dtype

    # read back through mecha: base + LoRA is as close to tuned as the best rank-r approximation
    merged = kit.merge(mecha_core.apply_lora(mecha_core.model(str(base_path)), mecha_core.model(str(out_path))),
                       tmp_path)
    for m in mods:
        r = conv_rank if m.shape[-1] == 3 else rank
        error = float((merged[m.key] - tuned[m.key]).norm())
        assert error <= 1.01 * optimum_error(None, r)
    assert torch.equal(merged[same.key], base[same.key])


def test_extract_ratio_and_sdxl_fused_rows(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(22)
    q = kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj")
    k = kit.module("sdxl-sgm", "lora_te2_text_model_encoder_layers_0_self_attn_k_proj")
    to_k = kit.module("sdxl-sgm", "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k")  # 640 x 2048
    base_path, base = kit.make_base(tmp_path, [q, to_k])
    tuned = dict(base)
    dq = spectrum_delta(gen, 1280, 1280)
    dto = spectrum_delta(gen, 640, 2048)
    tuned[q.key] = base[q.key].clone()
    tuned[q.key][:1280] += dq  # only the q rows change
    tuned[to_k.key] = base[to_k.key] + dto
    tuned_path = tmp_path / "tuned.safetensors"
    write_checkpoint(tuned_path, tuned)
    out_path = mecha_lora.extract_lora(tuned_path, base_path, tmp_path / "x.safetensors", ratio=0.02)
    lora = load_file(out_path)
    assert {n.split(".")[0] for n in lora} == {q.kohya_name, to_k.kohya_name}
    assert k.kohya_name + ".lora_up.weight" not in lora
    approx, r = factors(lora, q.kohya_name)
    assert r == round(0.02 * 1280)
    assert float((dq - approx).norm()) <= 1.01 * optimum_error(None, r)
    approx, r = factors(lora, to_k.kohya_name)
    assert r == round(0.02 * 640)
    assert float((dto - approx).norm()) <= 1.01 * optimum_error(None, r)


def lora_file(path, gen, mods, rank, alpha):
    t = {}
    for m in mods:
        conv = len(m.shape) == 4
        t[f"{m.kohya_name}.lora_down.weight"] = torch.randn(rank, *m.shape[1:], generator=gen) * 0.1
        t[f"{m.kohya_name}.lora_up.weight"] = torch.randn(m.shape[0], rank, *([1, 1] if conv else []),
                                                          generator=gen) * 0.1
        t[f"{m.kohya_name}.alpha"] = torch.tensor(float(alpha))
    write_checkpoint(path, t)
    return t


def test_merge_loras_concatenates_exactly(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(23)
    a_mods = [kit.module(SD1, n) for n in NAMES]
    b_mods = [kit.module(SD1, n) for n in NAMES[1:]] + [kit.module(SD1, "lora_unet_down_blocks_0_attentions_0_proj_in")]
    a = lora_file(tmp_path / "a.safetensors", gen, a_mods, 4, 2.0)
    b = lora_file(tmp_path / "b.safetensors", gen, b_mods, 8, 8.0)
    out_path = mecha_lora.merge_loras([tmp_path / "a.safetensors", tmp_path / "b.safetensors"],
                                      tmp_path / "ab.safetensors", weights=[0.7, -0.3])
    merged = load_file(out_path)
    for m in set(a_mods) | set(b_mods):
        expected = torch.zeros(m.shape[0], m.in_flat)
        if m in a_mods:
            expected += 0.7 * factors(a, m.kohya_name)[0]
        if m in b_mods:
            expected += -0.3 * factors(b, m.kohya_name)[0]
        got, r = factors(merged, m.kohya_name)
        assert r == (4 if m in a_mods else 0) + (8 if m in b_mods else 0)  # ranks add up: exact
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
        assert merged[f"{m.kohya_name}.lora_down.weight"].shape[1:] == m.shape[1:]


def test_merge_loras_refactorises_loha_and_refuses_oft(host, kit, tmp_path):
    gen = torch.Generator().manual_seed(24)
    m = kit.module(SD1, NAMES[1])  # 320 x 768
    a = lora_file(tmp_path / "a.safetensors", gen, [m], 4, 4.0)
    n, r = m.kohya_name, 6
    loha = {f"{n}.hada_w1_a": torch.randn(320, r, generator=gen), f"{n}.hada_w1_b": torch.randn(r, 768, generator=gen),
            f"{n}.hada_w2_a": torch.randn(320, r, generator=gen), f"{n}.hada_w2_b": torch.randn(r, 768, generator=gen),
            f"{n}.alpha": torch.tensor(3.0)}
    write_checkpoint(tmp_path / "loha.safetensors", loha)
    out_path = mecha_lora.merge_loras([tmp_path / "a.safetensors", tmp_path / "loha.safetensors"],
                                      tmp_path / "merged.safetensors", weights=[1.0, 0.01], fallback_rank=12)
    merged = load_file(out_path)
    total = factors(a, n)[0] + 0.01 * 0.5 * (loha[f"{n}.hada_w1_a"] @ loha[f"{n}.hada_w1_b"]) * (
        loha[f"{n}.hada_w2_a"] @ loha[f"{n}.hada_w2_b"])
    got, rank = factors(merged, n)
    assert rank == 12
    assert float((total - got).norm()) <= 1.01 * optimum_error(total, 12)

    write_checkpoint(tmp_path / "oft.safetensors", {f"{n}.oft_blocks": torch.zeros(4, 80, 80),
                                                    f"{n}.alpha": torch.tensor(0.0)})
    with pytest.raises(PlanError, match="OFT.*apply_lora"):
        mecha_lora.merge_loras([tmp_path / "a.safetensors", tmp_path / "oft.safetensors"], tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_command_line_writes_and_fails_in_one_line(host, kit, tmp_path, capsys):
    from mecha_lora.__main__ import main

    gen = torch.Generator().manual_seed(25)
    m = kit.module(SD1, NAMES[1])
    a = lora_file(tmp_path / "a.safetensors", gen, [m], 4, 4.0)
    assert main(["merge", str(tmp_path / "m.safetensors"), str(tmp_path / "a.safetensors"), "--weights", "2"]) == 0
    got, r = factors(load_file(str(tmp_path / "m.safetensors")), m.kohya_name)
    torch.testing.assert_close(got, 2 * factors(a, m.kohya_name)[0], rtol=1e-5, atol=1e-7)
    capsys.readouterr()
    write_checkpoint(tmp_path / "plain.safetensors", {"some.weight": torch.zeros(2, 2)})
    code = main(["extract", str(tmp_path / "plain.safetensors"), str(tmp_path / "plain.safetensors"),
                 str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "share no layer" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_mecha_lora_merge_and_extract_through_the_mecha_command(host, kit, tmp_path):
    """The same writers mounted as ``mecha lora ...`` by the mecha_cli_commands hook."""
    from typer.testing import CliRunner

    from mecha_core.cli import app

    runner = CliRunner()
    gen = torch.Generator().manual_seed(26)
    m = kit.module(SD1, NAMES[1])
    a = lora_file(tmp_path / "a.safetensors", gen, [m], 4, 4.0)
    b = lora_file(tmp_path / "b.safetensors", gen, [m], 4, 4.0)
    merged = runner.invoke(app, ["lora", "merge", str(tmp_path / "m.safetensors"), str(tmp_path / "a.safetensors"),
                                 str(tmp_path / "b.safetensors"), "--weights", "2,-1"])
    assert merged.exit_code == 0, merged.output
    assert merged.stdout == f"{tmp_path / 'm.safetensors'}\n"
    got, _ = factors(load_file(str(tmp_path / "m.safetensors")), m.kohya_name)
    expected = 2 * factors(a, m.kohya_name)[0] - factors(b, m.kohya_name)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    write_checkpoint(tmp_path / "plain.safetensors", {"some.weight": torch.zeros(2, 2)})
    failed = runner.invoke(app, ["lora", "extract", str(tmp_path / "plain.safetensors"),
                                 str(tmp_path / "plain.safetensors"), str(tmp_path / "x.safetensors")])
    assert failed.exit_code == 2 and failed.stderr.count("\n") == 1 and "share no layer" in failed.stderr
    assert not (tmp_path / "x.safetensors").exists()
    bad_weight = runner.invoke(app, ["lora", "merge", str(tmp_path / "n.safetensors"), str(tmp_path / "a.safetensors"),
                                     "--weights", "two"])
    assert (bad_weight.exit_code, bad_weight.stderr) == (2, "error: --weights: 'two' is not a number\n")


def test_the_command_module_imports_no_writer():
    """``mecha --help`` imports mecha_lora.cli: the writers (and torch) load only when a command runs."""
    import subprocess
    import sys

    script = ("import sys, mecha_core.errors\n"
              "before = set(sys.modules)\n"
              "import mecha_lora.cli\n"
              "print(sorted(m for m in set(sys.modules) - before if m.startswith(('mecha_lora', 'torch'))))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['mecha_lora', 'mecha_lora.cli']"


def test_the_help_default_fallback_rank_is_the_writers():
    from mecha_lora import cli, write

    assert cli.FALLBACK_RANK == write.FALLBACK_RANK


# -- options of merge and extract


@pytest.mark.parametrize("dtype", ["int8", "bogus"])
def test_a_dtype_that_is_not_a_float_is_a_one_line_error(host, kit, tmp_path, capsys, dtype):
    # int8 rounded every factor to 0 (a LoRA that does nothing); an unknown name gave a traceback
    from mecha_lora.__main__ import main

    gen = torch.Generator().manual_seed(7)
    kit.write(tmp_path / "a.safetensors", module_lora_pair(gen, kit.module("sd1-ldm", SHARED.replace(
        "input_blocks_4_1", "down_blocks_1_attentions_0"))))
    code = main(["merge", str(tmp_path / "m.safetensors"), str(tmp_path / "a.safetensors"), "--dtype", dtype])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and f"got '{dtype}'" in err, err
    assert not (tmp_path / "m.safetensors").exists()
    code = main(["extract", str(tmp_path / "a.safetensors"), str(tmp_path / "a.safetensors"),
                 str(tmp_path / "x.safetensors"), "--dtype", dtype])
    assert code == 2 and f"got '{dtype}'" in capsys.readouterr().err


def test_conv_rank_zero_leaves_convs_out_with_a_ratio_too(host, kit, tmp_path):
    import mecha_lora

    gen = torch.Generator().manual_seed(8)
    conv = kit.module("sd1-ldm", "lora_unet_down_blocks_0_resnets_0_conv1")  # 320 x 320 x 3 x 3
    lin = kit.module("sd1-ldm", "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k")
    base_path, base = kit.make_base(tmp_path, [conv, lin])
    tuned = {k: v + rnd(gen, *v.shape) if k in (conv.key, lin.key) else v for k, v in base.items()}
    kit.write(tmp_path / "tuned.safetensors", tuned)
    out = mecha_lora.extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "x.safetensors",
                                  ratio=0.05, conv_rank=0)
    from safetensors.torch import load_file

    names = {k.split(".")[0] for k in load_file(out)}
    assert names == {lin.kohya_name}
    assert load_file(out)[f"{lin.kohya_name}.lora_down.weight"].shape[0] == round(0.05 * 320)
    with pytest.raises(mecha_core.errors.MechaError, match="conv_rank must be 0"):
        mecha_lora.extract_lora(tmp_path / "tuned.safetensors", base_path, tmp_path / "y.safetensors", conv_rank=-1)
