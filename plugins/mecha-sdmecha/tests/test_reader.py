"""sd-mecha recipes (``version 0.1.0`` and the older unversioned form) load and merge to the same
tensors as the equivalent mecha recipe, and to values computed here by hand."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_methods.plugin
import mecha_sd1.plugin
import mecha_sdmecha.plugin
from mecha_core import dump_recipe, get_host, load_recipe  # load_recipe: the plugin host's methods and formats
from mecha_core.errors import RecipeError
from mecha_core.kit import CallNode, Node
from mecha_core.specs import Architecture, KeySpec
from mecha_core.testing import plugin_from_functions, using, write_checkpoint

# A small stand-in for sd1-ldm (named like it, so sd-mecha's sd1 names resolve to it): a text
# encoder and a U-Net, each key with a block and a class.
KEYS = {
    "te.layers.0.norm1.weight": KeySpec((4,), "float32", "te", blocks=("BASE",), klass="layer_norm1"),
    "te.layers.1.fc1.weight": KeySpec((3, 4), "float32", "te", blocks=("BASE",), klass="mlp_fc1"),
    "unet.in.1.conv.weight": KeySpec((2, 3), "float32", "unet", blocks=("IN01",), klass="conv"),
    "unet.in.2.proj_in.weight": KeySpec((2, 2), "float32", "unet", blocks=("IN02",), klass="proj_in"),
    "unet.mid.proj_in.weight": KeySpec((5,), "float32", "unet", blocks=("M00",), klass="proj_in"),
    "unet.out.0.conv.weight": KeySpec((3,), "float32", "unet", blocks=("OUT00",), klass="conv"),
}
FAKE_SD1 = Architecture("sd1-ldm", KEYS, blocks=("BASE", "IN01", "IN02", "M00", "OUT00"),
                        classes=("conv", "layer_norm1", "mlp_fc1", "proj_in"), aliases=("sd1",),
                        component_aliases={"txt": "te", "unet": "unet"})
FAKE_PLUGIN = plugin_from_functions("fake_sd1", mecha_architectures=lambda: [FAKE_SD1])


def parameters(root: Node) -> list:
    """The template's parameter nodes, first use first (each once)."""
    found: dict = {}

    def visit(node: Node) -> None:
        if isinstance(node, CallNode):
            for child in [*node.args, *(v for _, v in node.kwargs)]:
                visit(child)
        elif type(node).__name__ == "ParameterNode":
            found.setdefault(node.name, node)

    visit(root)
    return list(found.values())


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(spec.shape, generator=g) for k, spec in KEYS.items()}


@pytest.fixture
def models(tmp_path):
    t = {name: tensors(i) for i, name in enumerate("abc")}
    for name, sd in t.items():
        write_checkpoint(tmp_path / f"{name}.safetensors", sd)
    with using(mecha_methods.plugin, mecha_sdmecha.plugin, FAKE_PLUGIN):
        yield tmp_path, t


def run(folder, recipe, name="out") -> dict[str, torch.Tensor]:
    out = folder / f"{name}.safetensors"
    mecha.merge(recipe, out, models_dir=folder)
    return load_file(out)


def same(x: dict, y: dict) -> None:
    assert set(x) == set(y)
    for k in x:
        assert torch.equal(x[k], y[k]), k


def singleton(index: int, value: str) -> str:
    """The three lines sd-mecha 1.x writes for one scalar (taking indices index..index+2)."""
    return (f"dict key={value}\n"
            f'literal &{index} model_config="singleton-mecha" merge_space="param"\n'
            f'merge "convert_singleton" &{index + 1}\n')


# -- version 0.1.0 ----------------------------------------------------------------------------
def test_v010_weighted_sum_matches_mecha_and_the_formula(models):
    folder, t = models
    text = ('version 0.1.0\n'
            'model "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            + singleton(2, "0.3") +
            'merge "weighted_sum" &0 &1 &4')  # no final newline, as sd-mecha writes
    recipe = load_recipe(text)
    a, b = mecha.model("a.safetensors", arch="sd1-ldm", type="base"), mecha.model("b.safetensors", arch="sd1-ldm",
                                                                                   type="base")
    assert recipe == mecha.weighted_sum(a, b, alpha=0.3)
    got = run(folder, text)
    same(got, run(folder, mecha.weighted_sum(a, b, alpha=0.3), "mecha"))
    for k in KEYS:
        torch.testing.assert_close(got[k], 0.7 * t["a"][k] + 0.3 * t["b"][k])


def test_v010_block_dict_becomes_a_block_map(models):
    folder, t = models
    text = ('version 0.1.0\n'
            'model "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            'dict BASE=0.1 IN01=0.2 IN02=0.3 M00=0.4 OUT00=1.0\n'
            'literal &2 model_config="sd1-supermerger_blocks" merge_space="param"\n'
            'merge "convert_sd1_blocks_to_ldm" &3\n'
            'merge "weighted_sum" &0 &1 &4\n')
    recipe = load_recipe(text)
    assert recipe.kwargs[0][1].value == mecha.blocks("sd1-ldm", BASE=0.1, IN01=0.2, IN02=0.3, M00=0.4, OUT00=1.0)
    got = run(folder, text)
    alpha = {"BASE": 0.1, "IN01": 0.2, "IN02": 0.3, "M00": 0.4, "OUT00": 1.0}
    for k, spec in KEYS.items():
        x = alpha[spec.blocks[0]]
        torch.testing.assert_close(got[k], (1 - x) * t["a"][k] + x * t["b"][k])


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """sd-mecha's filter_top_k, by sorting: the threshold is the (max(int((1 - k)·n), 1))-th
    smallest magnitude, and every entry at least that large is kept (ties included)."""
    magnitudes = delta.flatten().abs().float().sort().values
    threshold = magnitudes[max(int((1 - density) * delta.numel()), 1) - 1]
    return torch.where(delta.abs() >= threshold, delta, torch.zeros_like(delta))


def ties_delta(deltas: list[torch.Tensor], density: float, by_value: bool) -> torch.Tensor:
    trimmed = [trim(d, density) for d in deltas]
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0) if by_value else torch.sign(stacked).sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    return (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)


HAND_WRITTEN = (
    'version 0.1.0\n'
    '# hand-written: comments are skipped and do not take an index\n'
    'model "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
    'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
    'model "c.safetensors"\n'
    'merge "subtract" &1 &0\n'
    'merge "subtract" &2 &0\n'
    + singleton(5, "0.5") + singleton(8, "VOTE") +
    'merge "ties_sum" &3 &4 k=&7 vote_sgn=&10\n'
    + singleton(12, "0.8") +
    'merge "add_difference" &0 &11 &14\n'
    + singleton(16, "null") + singleton(19, '"bfloat16"') +
    'merge "cast" &15 &18 &21\n')


@pytest.mark.parametrize("vote_sgn", [True, False])
def test_v010_ties_sum_and_cast_map_to_ties_and_cast(models, vote_sgn):
    folder, t = models
    text = HAND_WRITTEN.replace("VOTE", "true" if vote_sgn else "false")
    recipe = load_recipe(text)
    a, b = (mecha.model(f"{n}.safetensors", arch="sd1-ldm", type="base") for n in "ab")
    c = mecha.model("c.safetensors")
    ties = mecha.ties(a, b, c, density=0.5, vote="sum" if vote_sgn else "count", alpha=1.0, trim="sd_mecha")
    equivalent = mecha.cast(mecha.add_difference(a, ties - a, alpha=0.8), dtype="bfloat16")
    assert recipe == equivalent
    got = run(folder, text)
    same(got, run(folder, equivalent, "mecha"))
    for k in KEYS:
        merged = ties_delta([t["b"][k] - t["a"][k], t["c"][k] - t["a"][k]], 0.5, by_value=vote_sgn)
        want = (t["a"][k] + 0.8 * merged).to(torch.bfloat16).float()
        torch.testing.assert_close(got[k], want, rtol=1e-2, atol=1e-2)
        # the bfloat16 rounding happened: every value has at most 8 significant bits
        assert torch.equal(got[k], got[k].to(torch.bfloat16).float())


def test_v010_escaped_strings_and_relative_model_paths(tmp_path):
    (tmp_path / 'we"ird').mkdir()
    t = tensors(3)
    write_checkpoint(tmp_path / 'we"ird' / "a b.safetensors", t)
    recipe_file = tmp_path / "r.mecha"
    recipe_file.write_text('version 0.1.0\nmodel "we\\"ird/a b.safetensors"\n' + singleton(1, "2.0")
                           + 'merge "weighted_sum" &0 &0 &3\n')
    with using(mecha_methods.plugin, mecha_sdmecha.plugin, FAKE_PLUGIN):
        recipe = load_recipe(recipe_file)
        assert recipe.args[0].path == 'we"ird/a b.safetensors'
        out = tmp_path / "o.safetensors"
        mecha.merge(recipe, out)  # found beside the recipe file
        got = load_file(out)
    for k in KEYS:
        torch.testing.assert_close(got[k], t[k])


# -- unversioned (sd-mecha 0.0.x) ---------------------------------------------------------------
def test_unversioned_dict_hyperparameter_maps_through_the_architecture(models):
    folder, t = models
    text = ('model "a.safetensors" "sd1" "base"\n'
            'model "b.safetensors" "sd1" "base"\n'
            'dict sd1_txt_default=0.33 sd1_unet_default=0.33 sd1_unet_block_in2=0.75 sd1_unet_block_mid=0.9 '
            'sd1_unet_class_conv=0.1 sd1_txt_class_mlp_fc1=0.6\n'
            'merge "weighted_sum" &0 &1 alpha=&2\n')
    recipe = load_recipe(text)
    alpha = recipe.kwargs[0][1].value
    assert alpha == (mecha.blocks("sd1-ldm", 0.33, IN02=0.75, M00=0.9)
                     | mecha.classes("sd1-ldm", conv=0.1, mlp_fc1=0.6))
    assert recipe.args[0] == mecha.model("a.safetensors", arch="sd1-ldm", type="base")
    got = run(folder, text)
    # sd-mecha's rule: the mean of the matching block and class entries, else the component's default
    want_alpha = {"te.layers.0.norm1.weight": 0.33, "te.layers.1.fc1.weight": 0.6, "unet.in.1.conv.weight": 0.1,
                  "unet.in.2.proj_in.weight": 0.75, "unet.mid.proj_in.weight": 0.9, "unet.out.0.conv.weight": 0.1}
    assert set(want_alpha) == set(KEYS)
    for k, x in want_alpha.items():
        torch.testing.assert_close(got[k], (1 - x) * t["a"][k] + x * t["b"][k])


def test_unversioned_key_matching_block_and_class_entries_is_refused_naming_the_dict_line(models):
    text = ('model "a.safetensors" "sd1" "base"\n'
            'model "b.safetensors" "sd1" "base"\n'
            'dict sd1_unet_default=0.5 sd1_txt_default=0.5 sd1_unet_block_in1=0.75 sd1_unet_class_conv=0.1\n'
            'merge "weighted_sum" &0 &1 alpha=&2\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    err = info.value
    assert err.line == 3 and "unet.in.1.conv.weight" in str(err) and "0.425" in str(err)


def test_unversioned_template_with_clamp_composes_and_merges(models):
    folder, t = models
    template = ('parameter "a" "BASE" "sd1"\n'
                'parameter "b" "BASE" "sd1"\n'
                'parameter "c" "BASE" "sd1"\n'
                'merge "subtract" &1 &2\n'
                'merge "add_difference" &0 &3 alpha=0.5\n'
                'merge "clamp" &4 &0 &1 stiffness=0.0\n')
    recipe = load_recipe(template)
    assert [p.name for p in parameters(recipe)] == ["a", "b", "c"]
    filled = mecha.compose(recipe, a="a.safetensors", b="b.safetensors", c="c.safetensors")
    got = run(folder, filled)
    for k in KEYS:
        raw = t["a"][k] + 0.5 * (t["b"][k] - t["c"][k])
        lo, hi = torch.minimum(t["a"][k], t["b"][k]), torch.maximum(t["a"][k], t["b"][k])
        torch.testing.assert_close(got[k], torch.minimum(torch.maximum(raw, lo), hi))
    # the same recipe written in mecha's own format gives the same bytes
    pa, pb, pc = (mecha.model(f"{n}.safetensors") for n in "abc")
    same(got, run(folder, mecha.clamp(mecha.add_difference(pa, pb - pc, alpha=0.5), pa, pb, stiffness=0.0), "m"))
    assert "clamp(" in dump_recipe(filled)


def test_unversioned_defaults_are_sd_mechas(models):
    folder, t = models
    # sd-mecha 0.0.x add_difference defaults alpha to 0.5 (mecha's default is 1.0)
    text = ('model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\n'
            'model "c.safetensors" "sd1" "base"\nmerge "subtract" &1 &2\nmerge "add_difference" &0 &3\n')
    got = run(folder, text)
    for k in KEYS:
        torch.testing.assert_close(got[k], t["a"][k] + 0.5 * (t["b"][k] - t["c"][k]))


def test_unversioned_dict_with_the_real_sd1_architecture():
    with using(mecha_methods.plugin, mecha_sdmecha.plugin, mecha_sd1.plugin):
        text = ('model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\n'
                'dict sd1_txt_default=0.3 sd1_unet_default=0.3 sd1_unet_block_in2=0.75 sd1_unet_block_mid=0.5 '
                'sd1_unet_block_out11=0.2\n'
                'merge "weighted_sum" &0 &1 alpha=&2\n')
        recipe = load_recipe(text)
        # sd-mecha lists time_embed under every U-Net block: the mean of the block entries given,
        # carried by its classes (mecha's layout puts it in BASE, which no U-Net entry names)
        mean = (0.75 + 0.5 + 0.2) / 3
        assert recipe.kwargs[0][1].value == (mecha.blocks("sd1-ldm", 0.3, IN02=0.75, M00=0.5, OUT11=0.2)
                                             | mecha.classes("sd1-ldm", time_embed_0=mean, time_embed_2=mean))
        assert recipe.args[0].arch == "sd1-ldm"
        # sd-mecha's text-encoder layer blocks have no counterpart in the MBW blocks (BASE is the
        # whole text encoder): refused, naming the dict line and the entry
        with pytest.raises(RecipeError, match=r"^<recipe>:3:1: sd-mecha recipe: sd-mecha block 'txt_block_in2'"):
            load_recipe(text.replace("sd1_unet_block_in2", "sd1_txt_block_in2"))
        # a component without a default is 0 in sd-mecha: the U-Net's keys (most keys) take the
        # map's default 0, the text encoder's 0.3 through the classes only it has
        per_component = load_recipe(text.replace("sd1_unet_default=0.3 ", "")).kwargs[0][1].value
        arch = get_host().architecture("sd1-ldm")
        checked = 0
        for key, spec in arch.keys.items():
            if spec.component not in ("clip_l", "diffuser"):
                continue
            want = {"IN02": 0.75, "M00": 0.5, "OUT11": 0.2}.get(spec.blocks[0] if spec.blocks else None,
                                                                 0.3 if spec.component == "clip_l" else 0)
            if ".time_embed." in key:
                want = mean
            assert per_component.resolve(spec.blocks, spec.klass, None) == want, key
            checked += 1
        assert checked == 197 + 686


# -- errors -------------------------------------------------------------------------------------
ERA_A_HEAD = 'model "a.safetensors" "sd1" "base"\nmodel "b.safetensors" "sd1" "base"\n'
V010_HEAD = 'version 0.1.0\nmodel "a.safetensors"\nmodel "b.safetensors"\n'


@pytest.mark.parametrize("text, line, fragments", [
    (ERA_A_HEAD + 'merge "crossover" &0 &1 alpha=0.5\n', 3, ["is read from 1.x recipes only"]),
    (ERA_A_HEAD + 'merge "rebasin" &0 &1\n', 3, ["'rebasin' has no mecha counterpart", "permutation graphs"]),
    (V010_HEAD + 'merge "no_such_method" &0 &1\n', 4, ["'no_such_method' has no mecha counterpart", "(read: "]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0 &5\n', 3, ["&5 refers to instruction 5", "not defined before"]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpah=0.5\n', 3, ["no hyperparameter 'alpah'", "did you mean 'alpha'"]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0\n', 3, ["weighted_sum takes 2 input(s), got 1"]),
    (ERA_A_HEAD + 'dict sd1_unet_block_in9=0.5 sd1_unet_default=0 sd1_txt_default=0\n'
     'merge "weighted_sum" &0 &1 alpha=&2\n', 3, ["block 'unet_block_in9' has no counterpart"]),
    (ERA_A_HEAD + 'dict sd2_unet_default=0.5\nmerge "weighted_sum" &0 &1 alpha=&2\n', 3, ["architecture 'sd2'"]),
    (ERA_A_HEAD + 'dict sd1_vae_default=0.5\nmerge "weighted_sum" &0 &1 alpha=&2\n', 3, ["no component 'vae'"]),
    (ERA_A_HEAD + 'dict alpha=0.5\nmerge "weighted_sum" &0 &1 alpha=&2\n', 3, ["ARCH_COMPONENT_default"]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpha=&0\n', 3, ["cannot be a hyperparameter"]),
    (ERA_A_HEAD + 'lora "x.safetensors"\n', 3, ["0.0.2/0.0.3"]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpha=0.5 alpha=0.2\n', 3, ["alpha= is given twice"]),
    (ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpha=zero\n', 3, ["cannot read 'zero'"]),
    (ERA_A_HEAD + 'merge "weighted_sum &0 &1\n', 3, ["unterminated string"]),
    (ERA_A_HEAD + 'parameter "two words" "BASE"\n', 3, ["parameter name"]),
    (ERA_A_HEAD + 'dict sd1_unet_default=0.5\n', 3, ["last instruction must be a model or a merge"]),
    ("version 0.2.0\nmodel \"a\"\n", 1, ["version 0.2.0 is not supported"]),
    (V010_HEAD + "unknown &0\n", 4, ["unknown instruction 'unknown'"]),
    (V010_HEAD + 'merge "weighted_sum" &0 &1 "x"\n', 4, ["weighted_sum(alpha=...) expects a number"]),
    (V010_HEAD + 'dict key=0.5\nliteral &2 model_config="sd1-ldm" merge_space="param"\n'
     'merge "weighted_sum" &0 &1 &3\n', 6, ["model_config 'sd1-ldm' has no mecha counterpart"]),
    (V010_HEAD + 'model "c" merge_space="param"\n', 4, ["merge_space 'param'"]),
    (V010_HEAD + 'merge "subtract" &1 &0\nmerge "subtract" &0 &1\nmerge "ties_sum" &2 &3\n', 6,
     ["ties_sum maps to mecha only when every delta is taken from the same base"]),
    (V010_HEAD + 'merge "ties_sum" &0 &1\n', 4, ["every input is subtract(model, base)"]),
    (V010_HEAD + 'merge "weighted_sum" &0 &1 1 2\n', 4, ["takes 1 hyperparameter(s) after its inputs, got 2"]),
])
def test_errors_name_the_line(models, text, line, fragments):
    with pytest.raises(RecipeError) as info:
        load_recipe(text)
    err = info.value
    assert err.line == line, str(err)
    for fragment in fragments:
        assert fragment in str(err), str(err)


def test_v010_positional_values_go_to_sd_mechas_parameter_order(models):
    # a fractional alignment is read with sd-mecha's own rotate (issue 19), an integer one with mecha's
    recipe = load_recipe(V010_HEAD + 'merge "rotate" &0 &1 0.5 0.25\n')
    a, b = mecha.model("a.safetensors"), mecha.model("b.safetensors")
    assert recipe == mecha.sdmecha_rotate(a, b, alignment=0.5, alpha=0.25)
    assert load_recipe(V010_HEAD + 'merge "rotate" &0 &1 2 0.25\n') == mecha.rotate(a, b, alignment=2, alpha=0.25)
    recipe = load_recipe(V010_HEAD + 'merge "subtract" &1 &0\nmerge "add_difference" &0 &2\n')
    assert recipe == mecha.add_difference(a, b - a, alpha=1.0)  # sd-mecha 1.x's default, written out


def test_files_are_told_apart_by_their_first_line(models, tmp_path):
    assert load_recipe('# comment first\nversion 0.1.0\nmodel "a.safetensors"\n') == mecha.model("a.safetensors")
    assert load_recipe('model "a.safetensors" "sd1" "base"\n') == mecha.model("a.safetensors", "sd1-ldm", "base")
    assert load_recipe('mecha 1\nx = model("a.safetensors")\n') == mecha.model("a.safetensors")


def test_mecha_merge_cli_runs_sd_mecha_files(models):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    folder, t = models
    recipe_dir = folder / "recipes"
    recipe_dir.mkdir()
    good = recipe_dir / "ws.mecha"
    good.write_text(ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpha=0.25\n')
    out = folder / "cli.safetensors"
    r = CliRunner().invoke(app, ["merge", str(good), "-o", str(out), "-q", "--models-dir", str(folder)])
    assert r.exit_code == 0, r.output
    got = load_file(out)
    for k in KEYS:
        torch.testing.assert_close(got[k], 0.75 * t["a"][k] + 0.25 * t["b"][k])
    bad = recipe_dir / "bad.mecha"
    bad.write_text(ERA_A_HEAD + 'merge "balance_attention" &0 &1\n')
    out.unlink()
    r = CliRunner().invoke(app, ["merge", str(bad), "-o", str(out), "-q", "--models-dir", str(folder)])
    assert r.exit_code == 2
    assert f"{bad}:3:7: sd-mecha recipe: sd-mecha method 'balance_attention' has no mecha counterpart" in r.output
    assert not out.exists()


def test_v010_model_configs_map_to_architectures_and_types(models):
    def one(line):
        return load_recipe("version 0.1.0\n" + line + "\n")

    assert one('model "a.safetensors" model_config="sd1-ldm" merge_space="delta"') == \
        mecha.model("a.safetensors", "sd1-ldm", "delta")
    # a LoRA config: no mecha architecture; the type is detected by a LoRA plugin at merge time
    assert one('model "l.safetensors" model_config="sd1-kohya_kohya_lora" merge_space="delta"') == \
        mecha.model("l.safetensors")
    assert one('model "n.safetensors" merge_space="weight"') == mecha.model("n.safetensors", None, "base")


def test_compose_without_fills_converts_an_sd_mecha_file(models):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    folder, t = models
    old = folder / "old.mecha"
    old.write_text(ERA_A_HEAD + 'merge "weighted_sum" &0 &1 alpha=0.25\n')
    new = folder / "new.mecha"
    r = CliRunner().invoke(app, ["compose", str(old), "-o", str(new)])
    assert r.exit_code == 0, r.output
    assert new.read_text() == ('mecha 1\n'
                               'a = model("a.safetensors", arch="sd1-ldm", type="base")\n'
                               'b = model("b.safetensors", arch="sd1-ldm", type="base")\n'
                               'weighted_sum = weighted_sum(a, b, alpha=0.25)\n')
    same(run(folder, new, "new"), run(folder, old, "old"))


def test_recipe_show_prints_the_recipe_sd_mecha_stored_and_mecha_runs_it(models):
    from typer.testing import CliRunner

    from mecha_core.cli import app

    folder, t = models
    stored = ('version 0.1.0\nmodel "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
              'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
              + singleton(2, "0.5") + 'merge "weighted_sum" &0 &1 &4')
    # sd-mecha writes its recipe under the same metadata key
    write_checkpoint(folder / "sdmecha_out.safetensors", t["a"], metadata={"mecha_recipe": stored})
    shown = CliRunner().invoke(app, ["recipe", "show", str(folder / "sdmecha_out.safetensors")])
    assert shown.exit_code == 0 and shown.output == stored
    got = run(folder, shown.output)
    for k in KEYS:
        torch.testing.assert_close(got[k], 0.5 * t["a"][k] + 0.5 * t["b"][k])


def test_unversioned_per_component_defaults_merge_to_sd_mechas_values(models):
    folder, t = models
    text = (ERA_A_HEAD + 'dict sd1_txt_default=0.2 sd1_unet_block_in2=0.75\n'
            'merge "weighted_sum" &0 &1 alpha=&2\n')
    got = run(folder, text)
    # sd-mecha: the text encoder takes its default 0.2; the U-Net has no default, so 0 except IN02
    want_alpha = {"te.layers.0.norm1.weight": 0.2, "te.layers.1.fc1.weight": 0.2, "unet.in.1.conv.weight": 0.0,
                  "unet.in.2.proj_in.weight": 0.75, "unet.mid.proj_in.weight": 0.0, "unet.out.0.conv.weight": 0.0}
    for k, x in want_alpha.items():
        torch.testing.assert_close(got[k], (1 - x) * t["a"][k] + x * t["b"][k])


def test_sd_mecha_1x_rotate_with_all_five_positionals_and_its_defaults(models):
    # sd-mecha 1.x serialises every hyperparameter positionally; with an integer alignment the
    # Stiefel settings are dropped (mecha's rotate), with a fractional one sd-mecha's rotate keeps them
    recipe = load_recipe(V010_HEAD + 'merge "rotate" &0 &1 0.5 0.25 0.75 1e-08 100\n')
    a, b = mecha.model("a.safetensors"), mecha.model("b.safetensors")
    assert recipe == mecha.sdmecha_rotate(a, b, alignment=0.5, alpha=0.25, centralization=0.75, stiefel_eps=1e-8,
                                          stiefel_max_iters=100)
    assert load_recipe(V010_HEAD + 'merge "rotate" &0 &1 1.0 0.25 0.75 1e-08 100\n') == mecha.rotate(
        a, b, alignment=1.0, alpha=0.25, centralization=0.75)
    assert load_recipe(V010_HEAD + 'merge "rotate" &0 &1\n') == mecha.rotate(a, b, alignment=1.0, alpha=0.0)


@pytest.mark.parametrize("head", ["V010", "ERA_A"])
def test_add_cosine_takes_sd_mechas_default_alpha_of_one(models, head):
    text = (V010_HEAD if head == "V010" else ERA_A_HEAD) + 'merge "add_cosine_a" &0 &1\n'
    a, b = load_recipe(text).args
    assert load_recipe(text) == mecha.add_cosine_a(a, b, alpha=1.0)


def test_sd_mecha_model_stock_is_read_as_sd_mechas_own(models):
    # sd-mecha's model_stock (cosine per row, t unclamped) is not mecha's: the plugin's own method
    text = (V010_HEAD + 'model "c.safetensors"\nmerge "subtract" &1 &0\nmerge "subtract" &2 &0\n'
            'merge "model_stock" &3 &4 cos_eps=1e-06\n')
    recipe = load_recipe(text)
    assert recipe.method.name == "sdmecha_model_stock" and recipe.where.line == 7


def test_unversioned_class_narrower_than_the_architectures_is_refused():
    # sd-mecha's class is a key's whole suffix after its block: transformer_blocks_0_attn1_to_k
    # is only the first transformer block of each SDXL attention; mecha's attn1_to_k is every one
    import mecha_sdxl.plugin

    with using(mecha_methods.plugin, mecha_sdmecha.plugin, mecha_sd1.plugin, mecha_sdxl.plugin):
        text = ('model "a.safetensors" "sdxl" "base"\nmodel "b.safetensors" "sdxl" "base"\n'
                'dict sdxl_unet_class_transformer_blocks_0_attn1_to_k=1.0 sdxl_unet_default=0.0 '
                'sdxl_txt_default=0.0 sdxl_txt2_default=0.0\n'
                'merge "weighted_sum" &0 &1 alpha=&2\n')
        with pytest.raises(RecipeError, match=r"^<recipe>:3:1: "
                                              r".*transformer_blocks\.[1-9]\d*\.attn1\.to_k\.weight' 0\.0, "
                                              r"the closest map gives 1\.0"):
            load_recipe(text)


@pytest.mark.parametrize("method", ["pick_component", "omit_component"])
def test_sd_mecha_pick_then_fallback_becomes_pick_with_a_rest(models, method):
    # sd-mecha 1.x writes `pick_component(a, "clip_l") | b` as a pick on weights and a fallback
    text = ('version 0.1.0\nmodel "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            'dict key="te"\nliteral &1 model_config="singleton-mecha" merge_space=null\n'
            'merge "convert_singleton" &2\n'
            f'merge "{method}" &0 &3\n'
            'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
            'merge "fallback" &4 &5\n')
    a = mecha.model("a.safetensors", arch="sd1-ldm", type="base")
    b = mecha.model("b.safetensors", arch="sd1-ldm", type="base")
    assert load_recipe(text) == getattr(mecha, method)(a, b, component="te")
    # without the fallback, a pick on weights alone is refused at its own line
    alone = text.rsplit("model ", 1)[0]
    with pytest.raises(RecipeError) as info:
        load_recipe(alone)
    assert info.value.line == 6 and "a must be a delta" in str(info.value)


# sd-mecha 0.0.21-0.0.29: torch.sum(deltas if vote_sgn <= 0.0 else signs), default 0.0; 1.x reversed
# the switch (vote_sgn=True sums the values), which the v0.1.0 test above pins
@pytest.mark.parametrize("written,vote", [("", "sum"), (" vote_sgn=0.0", "sum"), (" vote_sgn=-1.0", "sum"),
                                          (" vote_sgn=1.0", "count"), (" vote_sgn=0.5", "count")])
def test_unversioned_ties_sum_reads_its_float_vote_switch(models, written, vote):
    text = (ERA_A_HEAD + 'model "c.safetensors" "sd1" "base"\nmerge "subtract" &1 &0\nmerge "subtract" &2 &0\n'
            f'merge "ties_sum" &3 &4 k=0.5{written}\n')
    a, b, c = (mecha.model(f"{n}.safetensors", arch="sd1-ldm", type="base") for n in "abc")
    assert load_recipe(text) == mecha.subtract(mecha.ties(a, b, c, density=0.5, vote=vote, alpha=1.0, trim="sd_mecha"),
                                               a)


def test_sd_mechas_unet_only_config_names_the_bare_diffusers_unet_layout():
    import mecha_sdxl.plugin

    with using(mecha_methods.plugin, mecha_sdmecha.plugin, mecha_sd1.plugin, mecha_sdxl.plugin):
        recipe = load_recipe('version 0.1.0\nmodel "unet.safetensors" model_config="sdxl-diffusers_unet_only" '
                             'merge_space="weight"\n')
        assert recipe == mecha.model("unet.safetensors", arch="sdxl-diffusers-unet", type="base")


def test_sd_mecha_readers_set_locations():
    r = load_recipe('version 0.1.0\nmodel "a.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
                               'model "b.safetensors" model_config="sd1-ldm" merge_space="weight"\n'
                               'merge "subtract" &0 &1\n')
    assert str(r.where) == "<recipe>:4:7" and str(r.args[0].where) == "<recipe>:2:1"
    assert str(r.args[1].where) == "<recipe>:3:1"
