"""The Python API behind ``mecha merge``: plan, then write atomically."""

from __future__ import annotations

import json
import os
from typing import Any

from .engine.plan import MergeOptions, Plan, make_plan
from .engine.run import TerminateAsInterrupt, execute
from .engine.safetensors_io import check_float_dtype
from .plugins import PluginHost, get_host
from .recipe import dump_recipe
from .recipe.nodes import Node


def _version() -> str:
    try:
        from importlib_metadata import version

        return version("mecha-core")
    except Exception:
        return "0.0.0+unknown"


def plugins_used(plan: Plan) -> dict[str, str]:
    """Plugin name -> distribution version, for every plugin the merge relied on (recorded by
    the plan as it was made)."""
    return plan.plugins_used()


def merge_metadata(plan: Plan) -> dict[str, str]:
    """What a merged file records: the recipe, and the versions of mecha and its plugins."""
    return {
        "mecha_recipe": dump_recipe(plan.root),
        "mecha_version": _version(),
        "mecha_plugins": json.dumps(plugins_used(plan), sort_keys=True),
    }


def merge(recipe: Node | str | os.PathLike[str], output: str | os.PathLike[str], *,
          threads: int | None = None, memory_budget: int | None = None, work_dtype: str = "float32",
          output_dtype: str | None = None, device: str = "cpu", allow_missing: bool = False,
          allow_nonfinite: bool = False, models_dir: str | os.PathLike[str] | None = None,
          progress: bool = False, host: PluginHost | None = None, **kwargs: Any) -> str:
    """Merge ``recipe`` (a node, .mecha text or a .mecha path) into ``output``; returns its path.

    The output is written to a temporary file beside it and renamed into place on success; on
    any failure (or Ctrl-C) no file is left and an existing ``output`` is untouched.
    """
    from .recipe import load_recipe

    host = host or get_host()
    if not isinstance(recipe, Node):
        _not_over_recipe(recipe, output)
        recipe = load_recipe(recipe, host=host)
    check_float_dtype(work_dtype, "work_dtype")
    if output_dtype is not None:
        check_float_dtype(output_dtype, "output_dtype")
    _check_device(device)
    _check_count(threads, "threads")
    if models_dir is not None and not os.path.isdir(models_dir):
        # a typo here would silently merge same-named files from the recipe's folder instead
        from .errors import MechaError

        what = "is not a folder" if os.path.exists(models_dir) else "no such folder"
        raise MechaError(f"--models-dir {os.fspath(models_dir)}: {what}")
    options = MergeOptions(
        threads=threads, work_dtype=work_dtype, output_dtype=output_dtype, device=device,
        allow_missing=allow_missing, allow_nonfinite=allow_nonfinite,
        models_dir=os.fspath(models_dir) if models_dir is not None else None,
        **({"memory_budget": int(memory_budget)} if memory_budget else {}), **kwargs)
    with make_plan(recipe, options, host) as plan, TerminateAsInterrupt():
        return execute(plan, output, merge_metadata(plan), progress=progress)


def _not_over_recipe(recipe: str | os.PathLike[str], output: str | os.PathLike[str]) -> None:
    """The output must not replace the recipe file being merged (the CLI checks the same)."""
    from .errors import OutputError

    try:
        same = os.path.isfile(recipe) and os.path.exists(output) and os.path.samefile(recipe, output)
    except (OSError, ValueError):  # recipe text, not a path
        same = False
    if same:
        raise OutputError(f"{output}: the output would overwrite the recipe {recipe}; choose another path")


def _check_count(value: int | None, what: str) -> None:
    from .errors import MechaError

    # 0 or a negative count would silently mean "all cores" (max(1, ...)); say so instead
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise MechaError(f"{what} must be a whole number of at least 1; got {value!r}")


def _check_device(device: str) -> None:
    import torch

    from .errors import MechaError

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):  # meta, mps, xpu...: the engine is written and tested for these two
        raise MechaError(f"unsupported device '{device}'; use cpu or cuda (cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MechaError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
