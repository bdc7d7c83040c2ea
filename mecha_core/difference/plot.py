"""A :class:`~mecha_core.difference.result.DiffResult` as a figure (PNG or SVG): a heat map of
cosine similarity (of the task vectors when there is a base), groups x pairs, and a bar chart of
each group's relative change ``‖B − A‖ / ‖A‖``, one bar per pair.

matplotlib is optional (``pip install 'mecha-core[plot]'``); it is imported only here, with the
Agg backend (no display needed). SVG text stays text (``svg.fonttype = none``), so block names
can be searched for and edited.
"""

from __future__ import annotations

import io
import os

import attrs

from ..errors import MechaError
from .result import DiffResult

#: The file types a plot can be written as, by extension.
PLOT_FORMATS = {".png": "png", ".svg": "svg"}
INSTALL_HINT = "pip install 'mecha-core[plot]'"
DPI = 100


@attrs.frozen
class Figure:
    """What was drawn: the encoded image and the labels on its axes (tests read them)."""

    data: bytes
    """The image file's bytes."""
    format: str
    """``png`` or ``svg``."""
    group_labels: tuple[str, ...]
    """The group (block) names along the x axes, left to right."""
    pair_labels: tuple[str, ...]
    """The pair names along the heat map's y axis, top to bottom."""
    size_pixels: tuple[int, int]
    """Width and height the figure was drawn at (in pixels at :data:`DPI`)."""


def plot_format(path: str | os.PathLike[str], option: str = "--plot") -> str:
    """The format ``path``'s extension asks for; refuses other extensions (one line)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if ext not in PLOT_FORMATS:
        raise MechaError(f"{option} {os.fspath(path)}: a plot is written as "
                         f"{' or '.join(PLOT_FORMATS)}; end the file name with one of them")
    return PLOT_FORMATS[ext]


def require_matplotlib(option: str = "--plot") -> None:
    """Fail in one line, naming what to install, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MechaError(f"{option} needs matplotlib, which is not installed: {INSTALL_HINT}") from None


def draw(result: DiffResult, fmt: str) -> Figure:
    """Draw ``result``; returns the encoded image and its labels."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure as MplFigure

    groups = [g for n, g in enumerate(result.groups) if any(p.groups[n].keys for p in result.pairs)]
    index = [result.groups.index(g) for g in groups]
    pairs = [f"{os.path.basename(result.models[p.first])} vs {os.path.basename(result.models[p.second])}"
             for p in result.pairs]
    with_base = result.base is not None
    width = min(200.0, max(8.0, 0.32 * len(groups) + 2.5))
    height = 4.5 + 0.35 * len(pairs)
    fig = MplFigure(figsize=(width, height), dpi=DPI)
    heat_ax, bar_ax = fig.subplots(2, 1, gridspec_kw={"height_ratios": [max(1.0, 0.35 * len(pairs)), 3.0]})

    def value(m, attr):  # a missing value is drawn as a gap (NaN)
        v = getattr(m, attr)
        return float("nan") if v is None else v

    cos_attr = "task_cosine" if with_base else "cosine"
    grid = [[value(p.groups[i], cos_attr) for i in index] for p in result.pairs]
    image = heat_ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    heat_ax.set_yticks(range(len(pairs)), pairs, fontsize=8)
    heat_ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    heat_ax.set_title(("task-vector cosine similarity" if with_base else "cosine similarity")
                      + f" per {result.grouping}", fontsize=10)
    fig.colorbar(image, ax=heat_ax, fraction=0.03, pad=0.01)

    bar_width = 0.8 / max(1, len(pairs))
    for n, p in enumerate(result.pairs):
        bar_ax.bar([i + (n - (len(pairs) - 1) / 2) * bar_width for i in range(len(groups))],
                   [value(p.groups[i], "relative_l2") for i in index], width=bar_width, label=pairs[n])
    bar_ax.set_xticks(range(len(groups)), groups, rotation=90, fontsize=7)
    bar_ax.set_xlim(-0.5, len(groups) - 0.5)
    bar_ax.set_ylabel("‖B − A‖ / ‖A‖")
    bar_ax.set_title("relative change per " + result.grouping, fontsize=10)
    if len(pairs) > 1:
        bar_ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "mecha"}):
        # no date in the file: the same result gives the same bytes
        fig.savefig(buffer, format=fmt, dpi=DPI, metadata={"Software": None} if fmt == "png" else {"Date": None})
    return Figure(
        data=buffer.getvalue(), format=fmt,
        group_labels=tuple(t.get_text() for t in bar_ax.get_xticklabels()),
        pair_labels=tuple(t.get_text() for t in heat_ax.get_yticklabels()),
        size_pixels=(round(width * DPI), round(height * DPI)))


def write_plot(result: DiffResult, path: str | os.PathLike[str], protect: dict[str, str] | None = None) -> Figure:
    """Draw ``result`` and write it atomically to ``path`` (format from the extension)."""
    from ..errors import OutputError
    from ..files import os_error_text
    from ..output import OutputFile

    fmt = plot_format(path)
    figure = draw(result, fmt)
    out = OutputFile(path, protect=protect or {}, what="plot")
    with out:
        view = memoryview(figure.data)
        try:
            while view:
                view = view[os.write(out.fd, view):]
        except OSError as exc:
            raise OutputError(f"{out.given}: writing failed: {os_error_text(exc)}") from None
        out.commit()
    return figure
