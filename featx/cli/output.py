"""How ``featx`` prints: aligned tables for people, JSON for scripts, problems on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

__all__ = ["format_size", "format_table", "print_json", "report_skipped", "warn_problems"]


def format_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Render dicts as a plain aligned table.

    Examples
    --------
    >>> print(format_table([{"a": 1, "b": "xy"}, {"a": 10, "b": "z"}]))
    a   b
    --  --
    1   xy
    10  z
    """
    if not rows:
        return "(nothing)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (tuple, list)):
        return "×".join(str(v) for v in value)
    return str(value)


def format_size(n_bytes: int) -> str:
    """A size in bytes for people: B, KiB, MiB, GiB or TiB with one decimal.

    Examples
    --------
    >>> format_size(812), format_size(19672), format_size(3 * 2**30)
    ('812 B', '19.2 KiB', '3.0 GiB')
    """
    size = float(n_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def print_json(data) -> None:
    """Print ``data`` as indented JSON on stdout (what is not JSON, e.g. a path, as its ``str``)."""
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def warn_problems(source) -> None:
    """One warning line on stderr per problem an ImageSource met while listing its images."""
    for path, reason in source.problems:
        print(f"featx: warning: {path}: {reason}", file=sys.stderr)


def report_skipped(skipped) -> None:
    """List the ``(image, reason)`` pairs that were skipped on stderr (nothing when none were)."""
    if skipped:
        print(f"featx: skipped {len(skipped)} images:", file=sys.stderr)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=sys.stderr)
