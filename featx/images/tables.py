"""Table sources: a CSV or TSV file with ``path`` and optionally ``label`` columns.

The header names the columns, in any order and any case (``Path``, ``LABEL``); other columns
are ignored. Paths are read relative to the table's folder and, unless the caller trusts the
table (``allow_outside_root=True``), must stay inside it.
"""

from __future__ import annotations

import csv
import difflib
import os

import numpy as np

from featx.exceptions import FeatxError
from featx.images.source import ImageSource

__all__ = ["TABLE_DELIMITERS", "open_table"]


TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t"}
"""Delimiter of each table file ending."""


COLUMN_LOOKALIKES = {
    "path": ("file", "filename", "filepath", "file_name", "image", "images", "img", "image_path", "paths"),
    "label": ("class", "classes", "category", "target", "labels", "y"),
}
"""Common other names of each expected column: suggested (never accepted) when it is missing."""


def _looks_like(expected: str, found: list[str]) -> str | None:
    """The found column that looks most like the `expected` one: a known other name or a close spelling."""
    for name in found:
        if name in COLUMN_LOOKALIKES[expected]:
            return name
    close = difflib.get_close_matches(expected, found, n=1, cutoff=0.6)
    return close[0] if close else None


def _rename_hint(missing: list[str], header: list[str]) -> str:
    """``"column 'labl' looks like 'label': rename it"`` for the missing columns that have a look-alike, or ``""``."""
    unused = [name for name in header if name and name not in ("path", "label")]
    pairs = []
    for expected in missing:
        lookalike = _looks_like(expected, unused)
        if lookalike is not None:
            pairs.append(f"column {lookalike!r} looks like {expected!r}")
            unused.remove(lookalike)
    if not pairs:
        return ""
    return f"{' and '.join(pairs)}: rename {'them' if len(pairs) > 1 else 'it'} in the header"


def _escapes(path: str) -> bool:
    if os.path.isabs(path) or os.path.splitdrive(path)[0]:
        return True
    return os.path.normpath(path).split(os.sep)[0] == os.pardir


def open_table(table: str, delimiter: str, allow_outside_root: bool) -> ImageSource:
    """The source of a CSV/TSV file with a header holding a ``path`` and optionally a ``label`` column."""
    kind = "TSV" if delimiter == "\t" else "CSV"
    try:
        with open(table, newline="", encoding="utf-8-sig") as handle:
            rows = [(number, row) for number, row in enumerate(csv.reader(handle, delimiter=delimiter), 1)
                    if any(cell.strip() for cell in row)]  # fmt: skip
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise FeatxError(f"cannot read the {kind} file {table!r}: {exc}; save it as UTF-8 text") from exc
    if not rows:
        raise FeatxError(f"the {kind} file {table!r} is empty; expected a header with 'path' and 'label' columns")
    header = [cell.strip().lower() for cell in rows[0][1]]
    if "path" not in header:
        separator = "tab" if delimiter == "\t" else "comma"
        missing = ["path"] + ([] if "label" in header else ["label"])
        hint = _rename_hint(missing, header)
        fix = f"{hint[0].upper()}{hint[1:]}" if hint else "Name the column of image paths 'path' in the header"
        raise FeatxError(
            f"the {kind} file {table!r} has no 'path' column: expected a header with 'path' and, for labelled "
            f"data, 'label'; found {header} (read as {separator}-separated). {fix}"
        )
    path_col = header.index("path")
    label_col = header.index("label") if "label" in header else None
    unlabelled_reason = ""
    if label_col is None:
        hint = _rename_hint(["label"], header)
        unlabelled_reason = (f"Its header has the columns {header} and no 'label' column"
                             + (f"; {hint}" if hint else ": add one with the class of each image") + ".")
    base = os.path.dirname(table) or "."
    items: list[str] = []
    labels: list[str] = []
    outside: list[str] = []
    blank: list[int] = []
    for number, row in rows[1:]:
        cells = row + [""] * (len(header) - len(row))
        relative = cells[path_col].strip()
        if not relative:
            blank.append(number)
            continue
        if _escapes(relative):
            outside.append(relative)
        items.append(os.path.normpath(os.path.join(base, relative)))
        if label_col is not None:
            label = cells[label_col].strip()
            if not label:
                blank.append(number)
            labels.append(label)
    if blank:
        raise FeatxError(
            f"the {kind} file {table!r} has an empty path or label on line(s) {blank[:10]}; "
            "fill them in or delete those lines"
        )
    if not items:
        raise FeatxError(f"the {kind} file {table!r} has a header but no rows; add one line per image")
    if outside and not allow_outside_root:
        raise FeatxError(
            f"the {kind} file {table!r} lists {len(outside)} path(s) outside its folder {base!r}, "
            f"e.g. {outside[0]!r}: paths must be relative to the table's folder and stay inside it. "
            "Move the images, or pass allow_outside_root=True (--allow-outside-root on the command line) if "
            "you trust the table"
        )
    if not any(os.path.exists(path) for path in items[:1000]):
        raise FeatxError(
            f"none of the paths in the {kind} file {table!r} exists (e.g. {items[0]!r}); "
            f"paths are read relative to the table's folder {base!r}"
        )
    return ImageSource(
        items=items, labels=np.asarray(labels, dtype=str) if label_col is not None else None,
        classes=None, name=table, root=base, unlabelled_reason=unlabelled_reason,
    )  # fmt: skip
