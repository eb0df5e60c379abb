"""``featx audit``: duplicates, near-duplicates, leaks into another set and likely label errors of DATA.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
"""

from __future__ import annotations

import argparse

from featx.audit import NEAR_DUPLICATE_THRESHOLD, audit, relative_name, write_audit_page
from featx.cli.arguments import (add_data_options, add_extraction_options, add_json, check_output_file, extract_options,
                                 open_data)
from featx.cli.interrupts import interrupted, interruptible
from featx.cli.output import format_table, print_json, report_skipped, warn_problems
from featx.images import open_source
from featx.options import CACHED

__all__ = ["COMMANDS", "audit_text"]

_THRESHOLD_HELP = "cosine similarity from which two distinct images are near-duplicates (default: %(default)s, " \
                  "calibrated for pre_logits/avg of efficientnet_lite0; see docs/guide.md)"


def cmd_audit(args) -> int:
    """find duplicates, near-duplicates, train/val leaks and likely label errors

    Audit DATA from its cached content keys and features (extracting only what the store lacks;
    after 'featx cv' on the same data nothing): byte-identical images and whether their labels
    conflict; near-duplicates (resized, re-encoded copies) by cosine similarity of one layer's
    features; with --against OTHER, images of DATA also in OTHER (leaks between splits); images
    whose given label has a low out-of-fold probability while another class's is high, ranked;
    and the class balance. Prints tables, or JSON with --json; --html writes a page with thumbnails.

    Example: featx audit data/train --against data/val --html audit.html
    """
    if args.html:
        check_output_file(args.html, "--html")
    options = extract_options(args, CACHED)
    source = open_data(args)
    other = None
    if args.against is not None:
        other = open_source(args.against, allow_outside_root=args.allow_outside_root)
        warn_problems(other)
    with interruptible() as stop:
        try:
            result = audit(source, options, against=other, threshold=args.threshold, cv=args.cv,
                           random_state=args.seed, stop=stop)
        except KeyboardInterrupt:
            return interrupted("every completed batch is kept in the store")
    report_skipped(result.skipped, result.n_images + result.n_against, data=args.data)
    if args.html:
        write_audit_page(result, args.html)
    if args.json:
        print_json(result.to_dict())
    else:
        print(audit_text(result, limit=args.limit))
        if args.html:
            print(f"\nwrote {args.html}")
    return 0


def audit_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    p.add_argument("--against", default=None, metavar="OTHER",
                   help="another set (e.g. the validation split): its images found in DATA are leaks")
    add_extraction_options(p, changes={"layers": {"help": "the one layer compared (default: %(default)s)"},
                                       "pooling": {"help": "its pooling (default: %(default)s)"}})
    g = p.add_argument_group("audit")
    g.add_argument("--threshold", type=float, default=NEAR_DUPLICATE_THRESHOLD, help=_THRESHOLD_HELP)
    g.add_argument("--cv", type=int, default=5, help="folds of the out-of-fold probabilities (default: %(default)s)")
    g.add_argument("--limit", type=int, default=20,
                   help="rows shown per table on the terminal, 0 for all (--json and --html have all; "
                   "default: %(default)s)")
    g.add_argument("--html", default=None, metavar="PATH", help="also write a self-contained HTML page with thumbnails")
    add_json(p, "print the audit as JSON")


# --------------------------------------------------------------------------- the text


def _limited(rows, limit: int) -> tuple[list, str]:
    if not limit or len(rows) <= limit:
        return rows, ""
    return rows[:limit], f"... and {len(rows) - limit} more (--limit 0 lists them all; --json has them all)"


def audit_text(result, *, limit: int = 20) -> str:
    """The audit's tables as text, each under a heading that counts what it found."""
    root = result.source.root if result.source is not None else None
    other_root = result.against_source.root if result.against_source is not None else None
    computed = (f"{result.n_computed} computed" if result.n_computed
                else "nothing computed: every feature came from the store")
    lines = [f"audit of {result.data}: {result.n_images} images"
             + (f" against {result.against}: {result.n_against} images" if result.against else "")
             + f"; features {result.features} of {result.backbone} ({computed})"]

    groups = result.exact_duplicates
    conflicting = sum(row["conflicting"] for row in groups)
    lines += ["", f"exact duplicates (same content key): {len(groups)} group{'s' * (len(groups) != 1)}, "
              f"{conflicting} with conflicting labels"]
    shown, more = _limited(groups, limit)
    if shown:
        table = []
        for row in shown:
            for i, image in enumerate(row["images"]):
                table.append({"group": row["group"] if i == 0 else "",
                              "labels": ("conflicting" if row["conflicting"] else "equal") if i == 0 else "",
                              "label": row["labels"][i] if row["labels"] else "", "image": relative_name(image, root)})
        lines += [format_table(table, ["group", "labels", "label", "image"])] + ([more] if more else [])

    pairs = result.near_duplicates
    different = sum(row["same_label"] is False for row in pairs)
    lines += ["", f"near-duplicates (cosine similarity >= {result.threshold:g}): {len(pairs)} "
              f"pair{'s' * (len(pairs) != 1)}, {different} with different labels"]
    shown, more = _limited(pairs, limit)
    if shown:
        lines += [format_table([{**row, "image_a": relative_name(row["image_a"], root),
                                 "image_b": relative_name(row["image_b"], root)} for row in shown],
                               ["similarity", "label_a", "label_b", "image_a", "image_b"])] + ([more] if more else [])

    if result.against:
        leaks = result.leaks
        exact = sum(row["kind"] == "exact" for row in leaks)
        lines += ["", f"leaks into {result.against}: {len(leaks)} ({exact} exact, {len(leaks) - exact} near)"]
        shown, more = _limited(leaks, limit)
        if shown:
            lines += [format_table([{**row, "image": relative_name(row["image"], root),
                                     "other_image": relative_name(row["other_image"], other_root)} for row in shown],
                                   ["kind", "similarity", "label", "other_label", "image", "other_image"])]
            lines += [more] if more else []

    if result.class_balance:
        issues = result.label_issues
        lines += ["", f"likely label errors (out-of-fold): {len(issues)}"]
        shown, more = _limited(issues, limit)
        if shown:
            lines += [format_table([{**row, "image": relative_name(row["image"], root)} for row in shown],
                                   ["rank", "label", "label_probability", "suggested", "suggested_probability",
                                    "image"])] + ([more] if more else [])
        lines += ["", "class balance"]
        columns = ["class", "n_images", "fraction", "ratio_to_largest"]
        if result.against:
            columns += ["n_against", "fraction_against"]
        lines += [format_table(result.class_balance, columns)]
    lines += [""] + result.notes if result.notes else []
    return "\n".join(lines)


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {"audit": (cmd_audit, audit_arguments)}
