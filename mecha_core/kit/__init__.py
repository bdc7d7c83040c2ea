"""The plugin kit: the public helpers the builtin plugins are built on, for any plugin.

A plugin may import ``mecha_core`` (top level), ``mecha_core.specs``, ``mecha_core.errors`` and
this package (its tests also ``mecha_core.testing``); nothing else of the core is a promise.
One module per job (see docs/plugins.md, "The plugin kit"):

- :mod:`mecha_core.kit.layouts` — packed layout tables shipped in a plugin's ``data`` folder:
  ``pack_layout``, ``write_packed``, ``load_packed``, ``packed_keys``, ``packed_architecture``,
  ``no_gc`` (``python -m mecha_core.kit.layouts`` packs a layout JSON).
- :mod:`mecha_core.kit.diffusers` — diffusers names of ldm/sgm U-Net and VAE keys:
  ``unet_name``, ``vae_name``, ``is_vae_linear``, ``text_encoder_aliases``.
- :mod:`mecha_core.kit.unet_only` — a diffusers U-Net saved alone, derived from a full diffusers
  layout and its converter: ``unet_only_architecture``, ``unet_only_plan``.
- :mod:`mecha_core.kit.safetensors` — the engine's safetensors reader and writer helpers:
  ``SafetensorsFile``, ``read_header``, ``save``, ``FLOAT_DTYPES``, ``is_float``,
  ``check_float_dtype``, ``torch_dtype``, ``dtype_name``, ``open_weights`` (a file or a
  Hugging Face folder as one key table).
- :mod:`mecha_core.kit.synthetic` — synthetic checkpoints of any architecture for tests:
  ``key_table``, ``write_layout``, ``write_header_only``, ``layout_values``.
- :mod:`mecha_core.kit.output` — the one output writer every file mecha writes goes through:
  ``OutputFile``, ``write_text_atomically`` (see docs/engine.md, "Files").
- :mod:`mecha_core.kit.executors` — for an executor plugin (a cluster): ``MergeJob``,
  ``open_plan``, ``plan_fingerprint``, ``work_units``, ``unit_writer``, ``write_shard_file``,
  ``write_file``, ``write_folder``, ``progress_line`` (imported as a module: see
  docs/distributed.md).
- :mod:`mecha_core.kit.untrusted` — JSON found inside files, parsed with bounded size and depth:
  ``loads_bounded``, ``JSONLimitError``.
- :mod:`mecha_core.kit.recipes` — recipe nodes for readers of other recipe formats (the
  ``mecha_recipe_formats`` hook): ``Node``, ``ModelNode``, ``LayerView``, ``CallNode``, ``Location``, ``call``,
  ``parameter``, ``WeightMap``, ``blocks``, ``classes``, ``CoreOnly``, ``RecipeHost``.
- :mod:`mecha_core.kit.native` — small C kernels compiled on first use, cached per machine and
  loaded with ctypes, ``None`` where no compiler builds them: ``load``, ``why_not``,
  ``cache_folder`` (imported as a module: a plugin keeps an eager path with the same bytes).
- :mod:`mecha_core.kit.reductions` — whole-tensor sums, dot products and norms accumulated in
  float64 in bounded memory: ``sum64``, ``dot64``, ``abs_sum64``, ``norm64``.

Names are imported on first use, so ``from mecha_core.kit import load_packed`` in a plugin's
start-up path does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

#: public name -> (module of this package, name there)
_EXPORTS: dict[str, tuple[str, str]] = {
    **{name: ("layouts", name) for name in ("pack_layout", "write_packed", "load_packed", "packed_keys",
                                            "packed_architecture", "no_gc")},
    **{name: ("diffusers", name) for name in ("unet_name", "vae_name", "is_vae_linear", "text_encoder_aliases")},
    "unet_only_architecture": ("unet_only", "architecture"),
    "unet_only_plan": ("unet_only", "plan"),
    **{name: ("safetensors", name) for name in ("SafetensorsFile", "read_header", "save", "FLOAT_DTYPES",
                                                "is_float", "check_float_dtype", "torch_dtype", "dtype_name",
                                                "open_weights")},
    **{name: ("synthetic", name) for name in ("key_table", "write_layout", "write_header_only", "layout_values")},
    **{name: ("output", name) for name in ("OutputFile", "write_text_atomically")},
    **{name: ("untrusted", name) for name in ("loads_bounded", "JSONLimitError")},
    **{name: ("recipes", name) for name in ("CallNode", "CoreOnly", "LayerView", "Location", "ModelNode", "Node",
                                            "RecipeHost", "WeightMap", "blocks", "call", "classes", "parameter")},
    **{name: ("reductions", name) for name in ("sum64", "dot64", "abs_sum64", "norm64")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mecha_core.kit' has no attribute '{name}'")
    module, attribute = _EXPORTS[name]
    value = getattr(importlib.import_module(f"{__name__}.{module}"), attribute)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
