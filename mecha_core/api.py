"""The Python API behind ``mecha merge``: plan, then write atomically."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

from .engine.plan import MergeOptions, Plan, make_plan
from .engine.run import execute
from .engine.run_folder import copy_source, execute_folder
from .engine.safetensors_io import check_float_dtype
from .output import OutputFile, Protected, TerminateAsInterrupt
from .output_folder import DEFAULT_SHARD_SIZE, OutputFolder, is_folder_output, parse_shard_size
from .plugins import PluginHost, get_host
from .recipe import dump_recipe
from .recipe.nodes import Node, walk
from .work_dtypes import check_work_dtype


def _version() -> str:
    from .about import version

    return version()


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
          progress: bool = False, host: PluginHost | None = None,
          protect: Protected = (), shard_size: int | str | None = None,
          copy_files_from: str | os.PathLike[str] | None = None, **kwargs: Any) -> str:
    """Merge ``recipe`` (a node, .mecha text or a .mecha path) into ``output``; returns its path.

    An ``output`` that ends with a slash (a ``str``: a ``Path`` drops it) or is an existing
    folder gets a Hugging Face folder: shards of at most ``shard_size`` bytes (``"5GB"``,
    ``"500MB"`` or a number; default as ``save_pretrained``), their index, ``recipe.mecha``, and
    the non-weight files (config, tokenizer ...) of the model ``copy_files_from`` (as the recipe
    names it; default: the first model that is a folder or sits beside a config.json).

    The output is written to a temporary file beside it and renamed into place on success; on
    any failure (or Ctrl-C) no file is left and an existing ``output`` is untouched. The output
    may not be any file the merge reads: a model, the recipe file, a recipe composed into it
    (found from the nodes' locations), or a path in ``protect`` (paths, or {path: how the
    message names it}). These are checked, with the
    output path itself (see :class:`~mecha_core.output.OutputFile`), before any work.
    """
    from .recipe import load_recipe

    folder = is_folder_output(output)
    if not folder and (shard_size is not None or copy_files_from is not None):
        from .errors import OutputError

        raise OutputError(f"{os.fspath(output)}: shard_size and copy_files_from are for folder outputs; "
                          f"end the output's name with / to write a folder")
    max_shard_size = parse_shard_size(shard_size) if shard_size is not None else DEFAULT_SHARD_SIZE
    if not folder and not os.path.lexists(output):  # a new name: refused before the recipe is even read
        check_output_name(output)
    _check_device(device)
    check_work_dtype(work_dtype, device)
    host = host or get_host()
    protected = dict(protect) if isinstance(protect, Mapping) else {p: None for p in protect}
    if not isinstance(recipe, Node):
        if _is_recipe_path(recipe):
            protected.setdefault(recipe, f"the recipe {os.fspath(recipe)}")
        recipe = load_recipe(recipe, host=host)
    for file in recipe_files(recipe):
        protected.setdefault(file, f"the recipe {file}")
    if output_dtype is not None:
        check_float_dtype(output_dtype, "output_dtype")
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
    # the output is checked before the inputs are opened: what an existing one is (a device, a
    # FIFO, a file the merge reads: the more specific refusal), then its name
    if folder:
        OutputFolder(output, protect=protected)
        with make_plan(recipe, options, host) as plan, TerminateAsInterrupt():
            return execute_folder(plan, output, merge_metadata(plan), max_shard_size=max_shard_size,
                                  copy_from=copy_source(plan, copy_files_from), progress=progress,
                                  protect=protected)
    OutputFile(output, protect=protected)
    check_output_name(output)
    with make_plan(recipe, options, host) as plan, TerminateAsInterrupt():
        return execute(plan, output, merge_metadata(plan), progress=progress, protect=protected)


#: the output formats merge writes, by file extension
OUTPUT_FORMATS = {".safetensors": "safetensors"}


def check_output_name(output: str | os.PathLike[str]) -> None:
    """Refuse an output whose extension is not one merge writes (``-o merged.ckpt`` would get
    safetensors bytes under a pickle name, which other tools then fail to load)."""
    from .errors import OutputError

    ext = os.path.splitext(os.fspath(output))[1]
    if ext.lower() not in OUTPUT_FORMATS:
        formats = " or ".join(f"{fmt} ({e})" for e, fmt in OUTPUT_FORMATS.items())
        raise OutputError(f"{os.fspath(output)}: mecha writes {formats} files only; "
                          f"end the output's name with {' or '.join(OUTPUT_FORMATS)}, or with / for a "
                          f"Hugging Face folder")


def _is_recipe_path(recipe: str | os.PathLike[str]) -> bool:
    """Whether ``recipe`` names a file (rather than holding .mecha text)."""
    if isinstance(recipe, os.PathLike):
        return True
    try:
        return "\n" not in recipe and os.path.lexists(recipe)
    except (OSError, ValueError):  # recipe text, not a path
        return False


def recipe_files(root: Node) -> list[str]:
    """The recipe files ``root`` was parsed from (its own, and those composed into it), as far
    as its nodes' locations tell: each once, in the order found. A location names the file as
    it was given when read; a model node also knows that file's folder (``base_dir``), which
    stays right when the working directory has changed since."""
    files = []
    for node in walk(root):
        where = node.where
        if where is None or where.file is None:
            continue
        base_dir = getattr(node, "base_dir", None)
        if base_dir and not os.path.isabs(where.file):
            files.append(os.path.join(base_dir, os.path.basename(where.file)))
        else:
            files.append(os.path.abspath(where.file))
    return list(dict.fromkeys(files))


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
