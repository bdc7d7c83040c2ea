"""sd-mecha's whole-key methods declare what they hold besides their inputs and result, and the
declaration is not below what one call really holds; tensor_sum runs in slices of whole rows."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mecha_core as mecha
import mecha_sdmecha.methods as methods
import mecha_sdmecha.plugin
import mecha_sdmecha.rotate as rotate
from mecha_core.specs import TensorInfo
from mecha_core.testing import using, write_checkpoint


def _tensor_sum_reference(a: torch.Tensor, b: torch.Tensor, width: float, offset: float) -> torch.Tensor:
    """sd-mecha's tensor_sum written out: rows [start, end) of b in a (or of a in b, wrapped)."""
    if a.dim() == 0:
        return b if width > 0.5 else a
    start, end, inverted = methods.ratio_to_region(width, offset, a.shape[0])
    out = (b if inverted else a).clone()
    out[start:end] = (a if inverted else b)[start:end]
    return out


@pytest.mark.parametrize("width,offset", [(0.5, 0.0), (0.3, 0.6), (0.6, 0.7), (-0.25, 0.1)])
def test_tensor_sum_in_slices_of_rows_equals_sd_mechas_definition(tmp_path, width, offset):
    gen = torch.Generator().manual_seed(0)
    shapes = {"tall": (37, 5), "conv": (6, 4, 3, 3), "vec": (12,), "scalar": ()}
    a = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    b = {k: torch.randn(s, generator=gen) for k, s in shapes.items()}
    write_checkpoint(tmp_path / "a.safetensors", a)
    write_checkpoint(tmp_path / "b.safetensors", b)
    with using(mecha_sdmecha.plugin):
        for chunk in (10, 1 << 20):  # a couple of rows a slice, and whole keys
            out = tmp_path / f"o{chunk}.safetensors"
            mecha.merge(mecha.sdmecha_tensor_sum(mecha.model(str(tmp_path / "a.safetensors")),
                                                 mecha.model(str(tmp_path / "b.safetensors")),
                                                 width=width, offset=offset), out, chunk_elements=chunk)
            got = load_file(out)
            for k in shapes:
                assert torch.equal(got[k], _tensor_sum_reference(a[k], b[k], width, offset)), (k, chunk)


SHAPE = (2048, 1024)  # 8 MiB a float32 copy

#: (method, inputs, hyperparameters) of the whole-key methods
CASES = [
    ("methods", "sdmecha_perpendicular_component", 2, {}),
    ("methods", "sdmecha_model_stock", 3, {}),
    ("methods", "sdmecha_ties_sum_extended", 3, {}),
    ("methods", "sdmecha_ties_sum_with_dropout", 3, {"seed": 1}),
    ("methods", "sdmecha_ties_sum_with_dropout", 3, {"della_eps": 0.1, "seed": 1}),
    ("methods", "sdmecha_dropout", 3, {}),
    ("methods", "sdmecha_crossover", 2, {"alpha": 0.4}),
    ("methods", "sdmecha_top_k_tensor_sum", 2, {"width": 0.5}),
    ("rotate", "sdmecha_rotate", 2, {}),
    ("rotate", "sdmecha_rotate", 2, {"alignment": 0.5, "alpha": 0.3}),
]

# Run in a fresh process with glibc's mmap threshold fixed at 128 KiB: every temporary of 8 MiB
# is then its own mapping, made and unmapped when torch allocates and frees it, so the peak of
# private memory sees each one (a process that already freed large blocks reuses its heap instead)
MEASURE = """
import ctypes, gc, json, sys
ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
import torch
torch.set_num_threads(1)
import mecha_sdmecha.methods, mecha_sdmecha.rotate
from mecha_core.method import MergeContext
from mecha_core.specs import TensorInfo
from mecha_core.testing import PeakPrivateMemory
shape = tuple(json.loads(sys.argv[1]))
results = []
for module, name, inputs, hyper in json.loads(sys.argv[2]):
    method = getattr(getattr(mecha_sdmecha, module), name)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(shape, generator=gen) * 0.01 for _ in range(inputs)]
    kwargs = dict(hyper)
    if method.wants_context:
        kwargs["ctx"] = MergeContext("k", TensorInfo(shape, "float32"))
    gc.collect()
    with PeakPrivateMemory(0.001) as memory:
        out = method.function(*xs, **kwargs)
    results.append(memory.peak - memory.start - out.numel() * out.element_size())
    del out, xs
print(json.dumps(results))
"""


def test_declared_working_sets_cover_what_one_call_holds():
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(SHAPE), json.dumps(CASES)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held_all = json.loads(proc.stdout.strip().splitlines()[-1])
    copy = SHAPE[0] * SHAPE[1] * 4
    info = TensorInfo(SHAPE, "float32")
    ratios = []
    for (module, name, inputs, hyper), held in zip(CASES, held_all, strict=True):
        method = getattr(rotate if module == "rotate" else methods, name)
        declared = method.working_set(info, inputs, 4, **hyper)
        ratios.append((name, hyper, round(declared / copy, 2), round(held / copy, 2)))
        assert held > copy / 2, ratios[-1]  # the measurement sees the method's temporaries at all
    # not below what a call holds, and not far above
    assert all(held <= declared <= held + 3 for *_, declared, held in ratios), ratios
