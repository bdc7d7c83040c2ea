"""The hooks a mecha plugin may implement.

Every hook is a *collector*: it takes no arguments and returns a list of spec objects. The core
calls each plugin's implementation on its own, so every result and every failure is attributed to
the plugin that produced it. Names are looked up in registries afterwards; two plugins providing
the same name is an error that names both, raised when the name is used.

Implement a hook by decorating a module-level function with :data:`mecha_core.hookimpl` in the
module your ``mecha`` entry point names.
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("mecha")


@hookspec
def mecha_architectures() -> list:
    """Return the architectures (key layouts) this plugin defines.

    Returns:
        A list of :class:`mecha_core.specs.Architecture`: every key with its shape, dtype and
        component, plus blocks and classes for block-wise and class-wise hyperparameters. Files
        are detected as an architecture from their header's key names alone. A
        :class:`mecha_core.specs.LazyArchitecture` in its place is built the first time a merge
        needs it (detection rules out the files it cannot match without building it).

    Example:
        ``return [Architecture(name="sd1-ldm", keys={...}, blocks=("BASE", "IN00", ...))]``
    """


@hookspec
def mecha_architecture_families() -> list:
    """Return the architecture families (layouts computed from a file) this plugin defines.

    Returns:
        A list of :class:`mecha_core.specs.ArchitectureFamily`: a name, and a function that,
        given a file's header and its ``config.json`` (or ``None``), returns the file's concrete
        :class:`mecha_core.specs.Architecture` (blocks and classes computed from the layer count,
        widths, tied embeddings, experts) or ``None`` when the file is not a member. Families are
        tried after the fixed architectures, on files none of those claims.

    Example:
        ``return [ArchitectureFamily("llama", detect=lambda header, config: ...)]``
    """


@hookspec
def mecha_model_types() -> list:
    """Return the model types (ways of storing weights other than a checkpoint) this plugin defines.

    Returns:
        A list of :class:`mecha_core.specs.ModelType`: a name, the merge space its values live in
        once converted (``weight`` or ``delta``), and a detector over a file's key names.

    Example:
        ``return [ModelType("kohya-lora", space="delta", detect=lambda keys: ...)]``
    """


@hookspec
def mecha_converters() -> list:
    """Return the converters (typed edges between architecture/model-type pairs) this plugin defines.

    Returns:
        A list of :class:`mecha_core.specs.Converter`. The engine finds a path through converters
        from what a file is (say, a kohya LoRA for sd1-ldm) to what a recipe needs (a delta on
        sd1-ldm) when the merge is planned.

    Example:
        ``return [Converter("kohya-to-delta", "sd1-ldm", "kohya-lora", "sd1-ldm", "delta", plan)]``
    """


@hookspec
def mecha_merge_methods() -> list:
    """Return the merge methods this plugin defines.

    Returns:
        A list of :class:`mecha_core.method.MergeMethod`, made with the
        :func:`mecha_core.merge_method` decorator. Each becomes callable as
        ``mecha_core.<name>(...)`` and usable in ``.mecha`` recipes.

    Example:
        ``return [weighted_sum, add_difference]``
    """


@hookspec
def mecha_recipe_formats() -> list:
    """Return the recipe formats (other than mecha's own ``.mecha`` text) this plugin reads.

    Returns:
        A list of :class:`mecha_core.specs.RecipeFormat`: a name, a detector over a recipe's
        text and file path, and a reader that builds the recipe's nodes. ``mecha merge``,
        ``mecha_core.load_recipe`` and ``compose`` give a recipe to the format that detects it
        (two formats detecting one text is an error naming both); mecha's own format (first
        line ``mecha 1``) is read by the core.

    Example:
        ``return [RecipeFormat("sd-mecha", detect=lambda text, path: ..., read=load_sd_mecha)]``
    """


@hookspec
def mecha_cli_commands() -> list:
    """Return the commands this plugin adds to the ``mecha`` command line.

    Returns:
        A list of :class:`mecha_core.specs.CliCommand`: a name, a ``typer.Typer`` the core
        mounts as ``mecha NAME ...``, and one line of help. The name may not
        be a core command's (``merge``, ``info`` ...). ``mecha --help`` loads the module that
        builds the app, so it imports heavy things (torch) inside the command functions.

    Example:
        ``return [CliCommand("lora", app=lora_app, help="Extract and merge LoRA files.")]``
    """


@hookspec
def mecha_file_formats() -> list:
    """Return the weight-file formats (other than safetensors) this plugin reads.

    Returns:
        A list of :class:`mecha_core.specs.FileFormat`: a name, the file-name endings it reads,
        and an opener giving the file's key table (shapes and dtypes as read) and a per-key read.
        The engine then treats the file like a safetensors one: architecture detection, aliases,
        converters. Keys are read whole (a format may have to dequantise them).

    Example:
        ``return [FileFormat("gguf", (".gguf",), open=open_gguf)]``
    """


@hookspec
def mecha_executors() -> list:
    """Return the executors (ways of running merges, such as a cluster) this plugin defines.

    Returns:
        A list of :class:`mecha_core.specs.Executor`: a name for ``mecha merge --executor NAME``,
        and a run function given the merges to run (:class:`mecha_core.kit.executors.MergeJob`).
        It plans and writes them through :mod:`mecha_core.kit.executors`, so the output bytes, the
        checks and the atomic commit are the local executor's. The core provides ``local``.

    Example:
        ``return [Executor("ray", run=run_on_ray, settings=("address",))]``
    """
