"""Value objects that plugins return from their hooks.

Every object here is an ``attrs`` frozen class: plugins build them, the core reads them and never
mutates them. Merge methods are built with :func:`mecha_core.merge_method` rather than by hand.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import attrs

#: Merge spaces. A checkpoint's weights live in ``weight`` space, the difference of two checkpoints
#: (and a LoRA) in ``delta`` space, hyperparameter-like tensors in ``param`` space.
WEIGHT = "weight"
DELTA = "delta"
PARAM = "param"
MERGE_SPACES = (WEIGHT, DELTA, PARAM)


@attrs.frozen
class TensorInfo:
    """What a safetensors header says about one tensor, before any data is read."""

    shape: tuple[int, ...]
    """The tensor's shape."""
    dtype: str
    """The torch dtype name, e.g. ``float16`` (not the safetensors code ``F16``)."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@attrs.frozen
class KeySpec:
    """One tensor of an architecture's layout."""

    shape: tuple[int, ...]
    """The expected shape."""
    dtype: str
    """The dtype a typical release stores (a hint, not a requirement)."""
    component: str
    """The component the key belongs to (``clip_l``, ``vae``, ``diffuser``, ...)."""
    optional: bool = False
    """A valid checkpoint may omit this key (EMA copies, scheduler buffers, position ids)."""
    aliases: tuple[str, ...] = ()
    """Older spellings of the same tensor, accepted in inputs and renamed to the key."""
    blocks: tuple[str, ...] = ()
    """The blocks (for block-wise hyperparameters) the key belongs to; empty when none."""
    klass: str | None = None
    """The key's class (layer type, e.g. ``attn1_to_k``) for class-wise hyperparameters."""


@attrs.frozen
class Architecture:
    """A named key layout (``sd1-ldm``, ``sdxl-sgm``, ...) with its components, blocks and classes."""

    name: str
    """The architecture's unique name, used in recipes (``model("x", arch="sd1-ldm")``)."""
    keys: Mapping[str, KeySpec] = attrs.field(repr=False)
    """Every key of the layout, in the order a checkpoint stores them."""
    blocks: tuple[str, ...] = ()
    """Block names, in order, for block-wise hyperparameters."""
    classes: tuple[str, ...] = ()
    """Class names (layer types) for class-wise hyperparameters."""
    description: str = ""
    """One line shown by ``mecha info``."""
    aliases: tuple[str, ...] = ()
    """Other names recipes may use for this architecture (sd-mecha's ``sd1`` for ``sd1-ldm``)."""
    component_aliases: Mapping[str, str] = attrs.field(factory=dict)
    """Other names for components (sd-mecha's ``txt`` for ``clip_l``)."""
    min_match: float = 0.9
    """Fraction of the required keys a file must hold to be detected as this architecture."""
    layers: tuple[str, ...] = ()
    """The blocks that are the model's repeated layers, first to last (a subset of ``blocks``):
    a layer gradient (``layers("llama", [0, 1])``) spreads its anchors over them. Empty when the
    architecture has no such stack."""
    vocab_keys: tuple[str, ...] = ()
    """The keys whose first dimension is the vocabulary (token embeddings, the LM head): inputs
    whose vocabularies differ are refused on these keys unless the recipe names the model whose
    vocabulary the output keeps (``model(..., keep_vocab=true)``)."""

    @property
    def components(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for spec in self.keys.values():
            seen.setdefault(spec.component, None)
        return tuple(seen)

    @property
    def required_keys(self) -> frozenset[str]:
        return frozenset(k for k, s in self.keys.items() if not s.optional)


@attrs.frozen
class LazyArchitecture:
    """An :class:`Architecture` whose key table is built on first use, not when plugins load.

    A merge uses the tables of its inputs' architectures only; building every installed table
    (thousands of :class:`KeySpec` each) on every start costs more than planning the merge.
    Detection stays exact without building: it counts a file's keys that start with one of
    ``key_prefixes``; every key that can count towards this architecture's match does, so a file
    with fewer than ``min_match * required_keys`` of them cannot be detected as it and its table
    is never built. When the table is built the core checks it against these fields (same name,
    aliases and ``min_match``; ``required_keys`` equal to the table's count; every required key
    and each of its aliases under a prefix) and refuses a table that breaks them."""

    name: str
    """The architecture's name (its table's ``name``)."""
    build: Callable[[], Architecture] = attrs.field(repr=False)
    """Returns the :class:`Architecture`; called once, the first time the table is needed."""
    key_prefixes: tuple[str, ...]
    """Every required key of the table and every alias of one starts with one of these."""
    required_keys: int
    """How many of the table's keys are required (not optional)."""
    min_match: float = 0.9
    """The table's ``min_match``."""
    aliases: tuple[str, ...] = ()
    """The table's ``aliases`` (recipes may name the architecture by them before it is built)."""


@attrs.frozen
class ArchitectureFamily:
    """Architectures computed from a file rather than listed: a transformer family (llama,
    mixtral ...) whose members differ in layer count, widths, tied embeddings or experts.

    Files are matched against the fixed architectures first; only a file none of them claims is
    offered to the families. Two families claiming one file is an ambiguity error."""

    name: str
    """The family's unique name; recipes write it in maps (``blocks("llama", ...)``,
    ``layers("llama", [0, 1])``) and ``model(..., arch="llama")``."""
    detect: Callable[[Mapping[str, TensorInfo], dict | None], Architecture | None] = attrs.field(repr=False)
    """Given a file's header (key -> :class:`TensorInfo`) and its ``config.json`` (a dict, or
    ``None`` when the model's folder has none), the concrete :class:`Architecture` of this file
    (its keys, blocks and classes computed from the header), or ``None`` when the file is not a
    member. The architecture's name must depend only on its key names (the family name and the
    layer count, say ``llama-32l``): files of one name merge as one layout, and different widths
    are reported as shape mismatches. Put what ``mecha inspect`` should show (family, layers,
    hidden size, experts) in its ``description``."""
    description: str = ""
    """One line shown by ``mecha plugins list -v`` and ``mecha info``."""


@attrs.frozen
class ModelType:
    """A way of storing weights other than a plain checkpoint (a LoRA, a LoKr, ...)."""

    name: str
    """The type's unique name (``base`` is the plain checkpoint, built in)."""
    space: str
    """The merge space its converted values live in: ``weight`` or ``delta``."""
    detect: Callable[[frozenset[str]], bool] = attrs.field(repr=False)
    """Given a file's key names, whether the file is of this type."""
    description: str = ""
    """One line shown by ``mecha plugins list -v``."""


@attrs.frozen
class ConvertedKey:
    """How a converter computes one output key from keys of its input."""

    info: TensorInfo
    """Shape and dtype of the converted tensor."""
    sources: tuple[str, ...]
    """The input keys the computation reads."""
    compute: Callable[[Mapping[str, Any]], Any] = attrs.field(repr=False)
    """Called with ``{source_key: tensor}``; returns the converted tensor."""


@attrs.frozen
class Converter:
    """A typed edge from one (architecture, model type) to another, e.g. kohya LoRA -> delta."""

    name: str
    """The converter's unique name."""
    source_arch: str | None
    """The architecture the input is in (``None``: any)."""
    source_type: str
    """The model type of the input."""
    target_arch: str | None
    """The architecture the output is in (``None``: the same as the input)."""
    target_type: str
    """The model type of the output (``base`` for weights, ``delta`` for differences)."""
    plan: Callable[[Mapping[str, TensorInfo]], Mapping[str, ConvertedKey]] = attrs.field(repr=False)
    """Given the input header, the output keys and how to compute each. A plan function that
    takes a ``metadata`` keyword also receives the file's ``__metadata__`` (string to string);
    one that takes ``allow_missing`` receives the merge's ``--allow-missing`` (skip what cannot
    be mapped instead of failing); one that takes ``path`` receives the model's path (its file,
    or its folder for a folder model), to read a file beside the weights (a PEFT adapter's
    ``adapter_config.json``). Raise ``ValueError`` when the converter does not apply to the
    file."""
    description: str = ""
    """One line shown by ``mecha plugins list -v``."""


@attrs.frozen
class Hyperparameter:
    """A keyword parameter of a merge method, with its documented default."""

    name: str
    """The keyword name."""
    default: Any
    """The value used when a recipe does not give one."""
    kind: type | None = None
    """``float``, ``int``, ``bool`` or ``str`` when annotated; ``None`` accepts any scalar."""
    choices: tuple | None = None
    """The only values accepted, when annotated ``typing.Literal["a", "b"]`` (checked when the
    recipe is built, so a wrong one names its recipe line); ``None``: any value of ``kind``."""


@attrs.frozen
class MethodInput:
    """A positional (tensor) parameter of a merge method."""

    name: str
    """The parameter name."""
    space: str | None = None
    """The merge space it must be in; ``None`` means 'the same as the method's other generic inputs'."""
    optional: bool = False
    """The parameter has a ``None`` default and may be left out."""
    variadic: bool = False
    """The parameter is ``*models``: any number of inputs."""


@attrs.frozen
class CliCommand:
    """A command a plugin adds to the ``mecha`` command line, mounted as ``mecha NAME ...``."""

    name: str
    """The command name (lower-case letters, digits and ``-``); it may not be a core command's."""
    app: Any = attrs.field(repr=False)
    """A ``typer.Typer``: its commands become ``mecha NAME SUBCOMMAND`` (one command: ``mecha NAME``).
    Build it in a light module: import heavy things (torch) inside the command functions, since
    ``mecha --help`` loads it."""
    help: str = ""
    """One line shown by ``mecha --help`` (default: the app's own help)."""


@attrs.frozen
class FileFormat:
    """A weight-file format other than safetensors (GGUF, ...), read as a key table plus reads."""

    name: str
    """The format's unique name (``gguf``)."""
    suffixes: tuple[str, ...]
    """The file-name endings it reads, lower case with the dot (``(".gguf",)``); a model path
    ending in one of them is opened with :attr:`open`."""
    open: Callable[[str], Any] = attrs.field(repr=False)
    """Given a path, the opened file: an object with ``keys`` (key -> :class:`TensorInfo`, the
    dtype being what a read returns), ``metadata`` (string -> string), ``read(key)`` (a torch
    tensor of that shape and dtype, computed in bounded memory, e.g. from a memory map) and
    ``close()``. Raise :class:`mecha_core.errors.MechaError` (or ``ValueError``) naming the file
    when it cannot be read. Optionally ``stored_dtype(key)`` (the type as stored, e.g. ``Q4_K``) and
    ``nbytes(key)`` (its stored bytes), which ``mecha inspect`` shows."""
    description: str = ""
    """One line shown by ``mecha plugins list -v``."""


@attrs.frozen
class RecipeFormat:
    """A recipe text format other than mecha's own ``.mecha`` (sd-mecha's, mergekit's YAML ...),
    read into mecha recipe nodes by a plugin."""

    name: str
    """The format's unique name (``sd-mecha``), shown by ``mecha plugins list -v`` and in errors."""
    detect: Callable[[str, str | None], bool] = attrs.field(repr=False)
    """Given a recipe's text (without a byte-order mark) and its file path (``None`` for text
    given directly), whether this format reads it. Runs on every recipe loaded, so it looks at
    little (the first instruction, a file name ending) and never raises; mecha's own format
    (a first line ``mecha 1``) is never offered to it."""
    read: Callable[..., Any] = attrs.field(repr=False)
    """Called as ``read(text, source=..., base_dir=..., host=...)``: ``source`` is the file path
    (or ``"<recipe>"``), ``base_dir`` the file's folder (``None`` for text), ``host`` the plugin
    host that resolves method and architecture names (``host.method(name)``,
    ``host.architecture(name)``). Returns the recipe's root node, built with the public
    constructors (``mecha_core.kit.recipes``); bad input raises a one-line
    :class:`~mecha_core.errors.RecipeError` naming the line."""
    description: str = ""
    """One line shown by ``mecha plugins list -v``."""


@attrs.frozen
class Executor:
    """A way of running merges: the core's ``local`` thread pool, or one a plugin adds (a cluster)."""

    name: str
    """What ``mecha merge --executor NAME`` and ``merge(..., executor=NAME)`` call it."""
    run: Callable[[Sequence[Any]], list[str]] = attrs.field(repr=False)
    """Given the merges to run (:class:`mecha_core.kit.executors.MergeJob`, one per output; a sweep
    gives several, which the executor may run at once), writes every output through the kit
    (:func:`mecha_core.kit.executors.write_file` / ``write_folder``) and returns their absolute
    paths in the jobs' order. A failure raises a :class:`~mecha_core.errors.MechaError` and
    leaves no partial output."""
    settings: tuple[str, ...] = ()
    """The names of the settings it takes (``address`` for ``--ray-address``); a job carries them
    in ``MergeJob.settings``, and an unknown one is refused before any work."""
    description: str = ""
    """One line shown by ``mecha plugins list -v``."""
