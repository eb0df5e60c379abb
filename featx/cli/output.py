"""How ``featx`` prints: aligned tables for people, JSON for scripts, problems on stderr."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Sequence

from featx.extraction import skipped_lines

__all__ = ["format_selection", "format_size", "format_table", "print_json", "report_skipped", "warn_problems"]


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


#: How many skipped images a command lists on stderr; 'featx extract DATA' lists them all.
SKIPPED_SHOWN = 5


def report_skipped(skipped, n_images: int | None = None, *, data: str | None = None) -> None:
    """Report the images a command skipped, on stderr, in the one wording every command uses.

    Every command that extracts calls this (``featx extract`` lists every skipped image in its
    summary instead, in the same wording): the count, the first :data:`SKIPPED_SHOWN` images with
    their reasons, and how to see them all. Nothing is printed when nothing was skipped.

    Parameters
    ----------
    skipped : sequence of (image, reason) pairs or of dicts with ``image`` and ``reason``
    n_images : int, optional
        How many images the command was given.
    data : str, optional
        The command's DATA argument, for the command that lists every skipped image.
    """
    target = shlex.quote(data) if data else "DATA"
    lines = skipped_lines(skipped, n_images, limit=SKIPPED_SHOWN,
                          see_all=f"'featx extract {target}' lists them all (with --json: its \"skipped\" field)")
    if lines:
        print(f"featx: warning: {lines[0]}", file=sys.stderr)
        for line in lines[1:]:
            print(line, file=sys.stderr)


def format_selection(selection, *, what: str = "feature set") -> str:
    """The table a choice was made from (:class:`featx.selection.Selection`) and one line on why.

    Examples
    --------
    >>> from featx.selection import one_standard_error
    >>> print(format_selection(one_standard_error({"pre_logits/avg": [0.8, 0.9], "stage4/avg": [0.9, 0.85]})))
    feature set     accuracy  std     gap     se      within 1 se  chosen
    --------------  --------  ------  ------  ------  -----------  ------
    pre_logits/avg  0.8500    0.0500  0.0250  0.0750  yes          *
    stage4/avg      0.8750    0.0250  0.0000  0.0000  yes
    chose pre_logits/avg: the simplest candidate within one standard error of the best (stage4/avg 0.875)
    estimate of choosing by this rule: 0.850 (a bootstrap over the folds; the chosen one's own mean 0.850)
    """
    rows = [{what: row["name"], "accuracy": row["mean"], "std": row["std"], "gap": row["gap"], "se": row["se"],
             "within 1 se": "yes" if row["within"] else "no", "chosen": "*" if row["chosen"] else ""}
            for row in selection.table]
    chosen = next(row for row in selection.table if row["chosen"])
    best = next(row for row in selection.table if row["name"] == selection.best)
    why = ("the best by mean" if selection.chosen == selection.best else
           f"the simplest candidate within one standard error of the best ({best['name']} {best['mean']:.3f})")
    return (format_table(rows) + f"\nchose {selection.chosen}: {why}\nestimate of choosing by this rule: "
            f"{selection.estimate:.3f} (a bootstrap over the folds; the chosen one's own mean {chosen['mean']:.3f})")
