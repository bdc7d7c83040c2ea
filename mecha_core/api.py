"""The Python API behind ``mecha merge``: plan, then write atomically."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from .engine.plan import MergeOptions, Plan, make_plan
from .engine.run import execute
from .engine.safetensors_io import check_float_dtype
# merge_metadata and plugins_used live with the executors; re-exported here for callers
from .executors import MergeJob, find_executor, merge_metadata, plugins_used  # noqa: F401
from .output import OutputFile, Protected, TerminateAsInterrupt
from .output_folder import DEFAULT_SHARD_SIZE, OutputFolder, is_folder_output, parse_shard_size
from .plugins import PluginHost, get_host
from .recipe.nodes import Node, walk
from .work_dtypes import check_work_dtype


def merge(recipe: Node | str | os.PathLike[str], output: str | os.PathLike[str], *,
          threads: int | None = None, memory_budget: int | None = None, work_dtype: str = "float32",
          output_dtype: str | None = None, device: str = "cpu", allow_missing: bool = False,
          allow_nonfinite: bool = False, models_dir: str | os.PathLike[str] | None = None,
          progress: bool = False, host: PluginHost | None = None,
          protect: Protected = (), shard_size: int | str | None = None,
          copy_files_from: str | os.PathLike[str] | None = None, fp8_scaled: bool = False, executor: str = "local",
          executor_settings: Mapping[str, Any] | None = None, **kwargs: Any) -> str:
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

    ``fp8_scaled`` (with ``output_dtype`` ``float8_e4m3fn`` or ``float8_e5m2``): weight matrices are
    written as fp8 with a per-tensor ``scale_weight``, other float keys in bfloat16 (ComfyUI's
    fp8_scaled form, see :mod:`mecha_core.engine.quantized`).
    ``executor``: what runs the merge: ``local`` (this machine's thread pool) or one a plugin
    provides (``ray``, from mecha-ray), with its ``executor_settings`` (``{"address": ...}``).
    """
    run = find_executor(executor, host)
    _check_settings(run, executor_settings)
    if fp8_scaled and run.name != "local":
        from .errors import MechaError

        raise MechaError(f"--fp8-scaled runs on the local executor, not '{run.name}'")
    job = _job(recipe, output, threads=threads, memory_budget=memory_budget, work_dtype=work_dtype,
               output_dtype=output_dtype, device=device, allow_missing=allow_missing,
               allow_nonfinite=allow_nonfinite, models_dir=models_dir, progress=progress, host=host,
               protect=protect, shard_size=shard_size, copy_files_from=copy_files_from,
               settings=executor_settings, fp8_scaled=fp8_scaled, **kwargs)
    if fp8_scaled:  # a per-tensor scale needs the whole float32 result first (see _execute_fp8_scaled)
        with make_plan(job.recipe, job.options, host) as plan, TerminateAsInterrupt():
            return _execute_fp8_scaled(plan, job.output, merge_metadata(plan), progress, job.protect,
                                       str(output_dtype))
    return run.run([job])[0]


def _check_settings(executor: Any, settings: Mapping[str, Any] | None) -> None:
    from .errors import MechaError

    unknown = sorted(set(settings or {}) - set(executor.settings))
    if unknown:
        takes = ", ".join(executor.settings) or "none"
        raise MechaError(f"executor '{executor.name}' has no setting '{unknown[0]}' (its settings: {takes})")


def _job(recipe: Any, output: str | os.PathLike[str], *, threads: int | None, memory_budget: int | None,
         work_dtype: str, output_dtype: str | None, device: str, allow_missing: bool, allow_nonfinite: bool,
         models_dir: Any, progress: bool, host: PluginHost | None, protect: Protected, shard_size: Any,
         copy_files_from: Any, settings: Mapping[str, Any] | None, label: Mapping[str, str] | None = None,
         fp8_scaled: bool = False, **kwargs: Any) -> MergeJob:
    """A checked merge job: every check of :func:`merge` that reads no tensor."""
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
    if fp8_scaled:
        from .engine.quantized import FP8_DTYPES
        from .errors import MechaError

        if output_dtype not in FP8_DTYPES:
            raise MechaError(f"--fp8-scaled writes fp8 weights: give --output-dtype {' or '.join(FP8_DTYPES)} "
                             f"(got {output_dtype or 'none'})")
    _check_count(threads, "threads")
    if models_dir is not None and not os.path.isdir(models_dir):
        # a typo here would silently merge same-named files from the recipe's folder instead
        from .errors import MechaError

        what = "is not a folder" if os.path.exists(models_dir) else "no such folder"
        raise MechaError(f"--models-dir {os.fspath(models_dir)}: {what}")
    options = MergeOptions(  # scaled fp8 is made from the float32 result (see _execute_fp8_scaled)
        threads=threads, work_dtype=work_dtype, output_dtype="float32" if fp8_scaled else output_dtype, device=device,
        allow_missing=allow_missing, allow_nonfinite=allow_nonfinite,
        models_dir=os.fspath(models_dir) if models_dir is not None else None,
        **({"memory_budget": int(memory_budget)} if memory_budget else {}), **kwargs)
    # the output is checked before the inputs are opened: what an existing one is (a device, a
    # FIFO, a file the merge reads: the more specific refusal), then its name
    if folder:
        if fp8_scaled:
            from .errors import MechaError

            raise MechaError("--fp8-scaled writes one file: give an output ending in .safetensors")
        OutputFolder(output, protect=protected)
    else:
        OutputFile(output, protect=protected)
        check_output_name(output)
    return MergeJob(recipe, os.fspath(output), options, folder=folder, max_shard_size=max_shard_size,
                    copy_files_from=os.fspath(copy_files_from) if copy_files_from is not None else None,
                    protect=protected, progress=progress, settings=dict(settings or {}), label=dict(label or {}),
                    host=host)


def sweep(recipe: Node | str | os.PathLike[str], output: str, params: Mapping[str, Sequence[Any]], *,
          executor: str = "local", executor_settings: Mapping[str, Any] | None = None,
          **options: Any) -> list[tuple[dict[str, Any], str]]:
    """One merge per combination of ``params`` values (``{"alpha": [0.2, 0.4], "beta": [1, 2]}``):
    the recipe's parameters filled with them, written to ``output`` with each ``{name}`` replaced
    by the value (``"out-{alpha}-{beta}.safetensors"``). Returns ``(values, path)`` per output in
    the sweep's order (see :func:`mecha_core.sweeps.sweep_points`). ``options`` are
    :func:`merge`'s. Every output name is checked (each swept ``{name}`` in it, no two alike)
    and every job is checked before any tensor is read; ``local`` runs them one after another,
    another executor may run them at once."""
    from . import recipe as recipes
    from .plugins import get_host
    from .sweeps import sweep_outputs, sweep_points

    host = options.get("host") or get_host()
    run = find_executor(executor, host)
    _check_settings(run, executor_settings)
    points = sweep_points(params)
    names = sweep_outputs(output, points)
    protect = dict(options.pop("protect", ()) or {})
    if not isinstance(recipe, Node):
        if _is_recipe_path(recipe):
            protect.setdefault(recipe, f"the recipe {os.fspath(recipe)}")
        recipe = recipes.load_recipe(recipe, host=host)
    jobs = []
    for point, name in zip(points, names):
        filled = recipes.compose(recipe, dict(point.values), host=host)
        jobs.append(_job(filled, name, protect=protect, settings=executor_settings, label=point.labels,
                         **_merge_defaults(options)))
    return [(dict(point.values), path) for point, path in zip(points, run.run(jobs))]


def _merge_defaults(options: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`merge`'s keyword defaults, overridden by ``options``."""
    defaults = {"threads": None, "memory_budget": None, "work_dtype": "float32", "output_dtype": None,
                "device": "cpu", "allow_missing": False, "allow_nonfinite": False, "models_dir": None,
                "progress": False, "host": None, "shard_size": None, "copy_files_from": None}
    return {**defaults, **options}


def _execute_fp8_scaled(plan: Plan, output: str | os.PathLike[str], metadata: dict[str, str], progress: bool,
                        protected: Mapping[Any, Any], fp8: str) -> str:
    """The merge in float32 to a hidden file beside the output, then rewritten as scaled fp8 into
    the output (a per-tensor scale needs the whole tensor, which the merge may write in slices)."""
    import secrets

    from .engine.quantized import write_fp8_scaled
    from .errors import MechaError, OutputError, mark_failed
    from .output import resolve_output, temp_prefix

    target = resolve_output(output)
    middle = os.path.join(os.path.dirname(target),
                          f"{temp_prefix(target)}mecha-{os.getpid()}-{secrets.token_hex(4)}.tmp")
    out = OutputFile(output, protect={**protected, **{p: f"the input {p}" for p in plan.input_paths}})
    try:
        execute(plan, middle, metadata, progress=progress, protect=protected)
        with out:
            try:
                write_fp8_scaled(middle, out.fd, fp8)
            except OSError as exc:
                raise mark_failed(OutputError(f"{output}: writing failed: {exc.strerror or exc}")) from None
            except MechaError as exc:
                raise mark_failed(exc)  # noqa: B904 (the same exception, re-raised with its traceback)
            return out.commit()
    finally:
        if os.path.lexists(middle):
            os.unlink(middle)


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
    from .errors import MechaError
    from .lazy import torch  # the merge's first use of torch: imported without collections (lazy.py)

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda"):  # meta, mps, xpu...: the engine is written and tested for these two
        raise MechaError(f"unsupported device '{device}'; use cpu or cuda (cuda:N)")
    if kind == "cuda" and not torch.cuda.is_available():
        raise MechaError(f"device '{device}' was asked for but CUDA is not available; use --device cpu")
