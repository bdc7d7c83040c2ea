"""``mecha lora extract|merge``: the LoRA writers on the command line.

Mounted into ``mecha`` through the ``mecha_cli_commands`` hook; ``python -m mecha_lora`` runs the
same commands. ``mecha --help`` imports this module, so it imports only typer: the writers (and
torch) are imported inside the commands.
"""

from __future__ import annotations

import sys
from typing import Annotated, List, Optional

import typer

from mecha_core.errors import MechaError

HELP = "Extract a LoRA from two checkpoints, or merge LoRA files into one."
FALLBACK_RANK = 32  # mecha_lora.write.FALLBACK_RANK, repeated here so --help needs no torch

# plain help like the core's commands: no boxes, no <bool> metavars, no rich import
app = typer.Typer(no_args_is_help=True, add_completion=False, help=HELP, rich_markup_mode=None,
                  pretty_exceptions_enable=False, context_settings={"help_option_names": ["-h", "--help"]})


@app.command("extract")
def extract_command(
    tuned: Annotated[str, typer.Argument(metavar="TUNED", help="The fine-tuned checkpoint.")],
    base: Annotated[str, typer.Argument(metavar="BASE", help="The checkpoint it was tuned from.")],
    output: Annotated[str, typer.Argument(metavar="OUTPUT",
                                          help="The LoRA file (a folder for a language model) to write.")],
    rank: Annotated[int, typer.Option(help="Rank of every layer.")] = 16,
    ratio: Annotated[Optional[float],
                     typer.Option(help="Fraction of each layer's full rank (overrides --rank).")] = None,
    conv_rank: Annotated[Optional[int],
                         typer.Option(help="Rank of 3x3 convs (default: --rank or --ratio; 0: none).")] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype (default: the tuned model's).")] = None,
    embeddings: Annotated[str, typer.Option(
        help="Language models: embeddings and LM head saved whole (save), as LoRA modules (lora) or left "
             "out (skip).")] = "save",
) -> None:
    """Write a LoRA approximating TUNED - BASE: a kohya file for an image model, a PEFT adapter
    folder for a language model (files or Hugging Face folders)."""
    from .write import extract_lora

    typer.echo(extract_lora(tuned, base, output, rank=rank, ratio=ratio, conv_rank=conv_rank, dtype=dtype,
                            embeddings=embeddings))


def _weights(values: Optional[List[str]]) -> Optional[List[float]]:
    if not values:
        return None
    out = []
    for part in (p for v in values for p in v.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise MechaError(f"--weights: '{part}' is not a number") from None
    return out


@app.command("merge")
def merge_command(
    output: Annotated[str, typer.Argument(metavar="OUTPUT", help="The LoRA file to write.")],
    loras: Annotated[List[str], typer.Argument(metavar="LORAS", help="The LoRA files to merge.")],
    weights: Annotated[Optional[List[str]], typer.Option(
        help="One weight per LoRA, comma-separated (--weights 1,0.5) or repeated (default: all 1).")] = None,
    rank: Annotated[Optional[int], typer.Option(
        help="Re-factorise every module to this rank (default: exact concatenation where possible).")] = None,
    fallback_rank: Annotated[int, typer.Option(
        help="Rank for modules that cannot be concatenated.")] = FALLBACK_RANK,
    dtype: Annotated[Optional[str], typer.Option(help="Output dtype (default: the first LoRA's).")] = None,
) -> None:
    """Write one kohya LoRA whose delta is the weighted sum of the inputs'."""
    from .write import merge_loras

    typer.echo(merge_loras(loras, output, weights=_weights(weights), rank=rank, fallback_rank=fallback_rank,
                           dtype=dtype))


def main(argv: list[str] | None = None, prog_name: str = "python -m mecha_lora") -> int:
    """Run the commands outside ``mecha`` (``python -m mecha_lora``); returns the exit status.
    Errors print one line and return 2."""
    command = typer.main.get_command(app)
    try:
        command.main(args=argv, prog_name=prog_name, standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except MechaError as exc:
        print(f"error: {' '.join(str(exc).splitlines())}", file=sys.stderr)
        return exc.exit_code
    return 0
