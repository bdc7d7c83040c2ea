"""A :class:`~mecha_core.difference.result.DiffResult` as aligned text for the terminal: one
section per pair, one row per group (blocks in architecture order), then the total."""

from __future__ import annotations

from .result import DiffResult, Measures


def _number(value: float | None, digits: str) -> str:
    return "-" if value is None else format(value, digits)


def _row(name: str, m: Measures, with_base: bool) -> list[str]:
    cells = [name, str(m.keys), _number(m.cosine, ".6f"), _number(m.relative_l2, ".4g"),
             _number(m.max_abs_change, ".4g")]
    if with_base:
        cells += [_number(m.task_cosine, ".6f"), _number(m.sign_agreement, ".4f")]
    return cells


def render(result: DiffResult) -> str:
    """The text ``mecha diff`` prints (names come from files: the caller escapes them)."""
    with_base = result.base is not None
    header = [result.grouping, "keys", "cosine", "rel_l2", "max_abs"]
    if with_base:
        header += ["task_cos", "sign_agree"]
    lines = [f"architecture: {result.architecture or 'none detected'}"
             + (f"; task vectors against {result.base}" if with_base else "")]
    for pair in result.pairs:
        rows = [header] + [_row(name, m, with_base) for name, m in zip(result.groups, pair.groups) if m.keys]
        rows.append(_row("total", pair.total, with_base))
        widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
        lines.append("")
        lines.append(f"{result.models[pair.first]} (A) vs {result.models[pair.second]} (B)"
                     + (f"; {pair.unmatched_keys} key(s) not compared (in one only, or of different shapes)"
                        if pair.unmatched_keys else ""))
        for n, r in enumerate(rows):
            if n == len(rows) - 1:
                lines.append("  ".join("-" * w for w in widths))
            lines.append("  ".join(r[0].ljust(widths[0]) if c == 0 else r[c].rjust(widths[c])
                                   for c in range(len(r))).rstrip())
    return "\n".join(lines) + "\n"
