"""Every expected failure is a MechaError: the CLI prints its message in one line and exits with
its ``exit_code``.

Exit codes (``mecha --help`` and docs/engine.md list them):

- 0: success;
- 1 (:data:`EXIT_FAILED`): a merge failed after it started reading tensors (a NaN found, a
  method raised, the disk filled, an input changed or was truncated during the merge);
- 2 (:data:`EXIT_USAGE`): bad usage, options, recipe or input files, found before any tensor is
  read (nothing was attempted);
- 130 (:data:`EXIT_INTERRUPTED`): Ctrl-C (SIGINT), at any moment, start-up included;
- 143 (:data:`EXIT_TERMINATED`): SIGTERM.
"""

from __future__ import annotations

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class MechaError(Exception):
    """A failure the user can act on; the message says what, where and what to do.

    ``exit_code`` is :data:`EXIT_USAGE` unless the class or :func:`mark_failed` says the
    failure happened while merging."""

    exit_code = EXIT_USAGE


class PluginError(MechaError):
    """A plugin failed to load, or two plugins claim the same name."""


class RecipeError(MechaError):
    """A recipe is malformed, refers to something unknown, or cannot be typed."""

    def __init__(self, message: str, *, source: str | None = None, line: int | None = None, column: int | None = None):
        self.source = source
        self.line = line
        self.column = column
        where = ""
        if source is not None or line is not None:
            parts = [source or "<recipe>"]
            if line is not None:
                parts.append(str(line))
                if column is not None:
                    parts.append(str(column))
            where = ":".join(parts) + ": "
        super().__init__(where + message)


class MergeSpaceError(RecipeError):
    """A method was given an input in the wrong merge space (weight, delta or param)."""


class UnfilledParameterError(RecipeError):
    """A recipe still holds a parameter (a named hole) where a concrete value is needed."""


class SafetensorsError(MechaError):
    """A safetensors file is missing, damaged or not a safetensors file at all."""


class PlanError(MechaError):
    """The inputs of a merge do not fit together (missing keys, shapes that disagree, ...)."""


class MergeError(MechaError):
    """A merge failed while running (a method raised, a value was not finite, the disk filled)."""

    exit_code = EXIT_FAILED


class OutputError(MechaError):
    """The output path cannot be written, or would overwrite one of the inputs."""


def mark_failed(exc: MechaError) -> MechaError:
    """Give ``exc`` exit code :data:`EXIT_FAILED`: it was raised once the merge was running (an
    input truncated mid-merge raises a SafetensorsError, which before the merge means bad input)."""
    exc.exit_code = EXIT_FAILED
    return exc


class PluginCodeError(MechaError):
    """Code from a plugin (a detector, a converter, a merge method) raised while mecha ran it.

    The message names the plugin, the hook or spec, and the file or key, in one line; the original
    exception is the ``__cause__`` (``--debug`` shows its traceback)."""

    def __init__(self, message: str, *, plugin: str | None = None):
        self.plugin = plugin
        super().__init__(message)
