"""The ``featx`` command: thin verbs over the public API.

Each command parses its options, calls one importable function that returns data, and prints
that data as a table (or JSON with ``--json``). A :class:`~featx.exceptions.FeatxError` becomes
one line on stderr and exit code 1; anything else keeps its traceback, because it is a bug.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

from featx.exceptions import FeatxError

__all__ = ["main"]


# --------------------------------------------------------------------------- output helpers


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


def _print_json(data) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


# --------------------------------------------------------------------------- commands


def layer_rows(model: str, *, all_nodes: bool = False) -> list[dict]:
    """Rows of ``featx layers``: alias, node, shape and pooled dimension per pooling."""
    from featx.backbones import list_layers
    from featx.pooling import POOLINGS

    rows = []
    for layer in list_layers(model, all_nodes=all_nodes):
        row = {
            "alias": layer.alias or "",
            "node": layer.node,
            "channels": layer.channels,
            "spatial": layer.spatial or "-",
        }
        row.update({p: layer.dims.get(p, "-") for p in POOLINGS})
        rows.append(row)
    return rows


def cmd_models(args) -> int:
    from featx.backbones import list_backbones

    rows = list_backbones()
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows, ["name", "family", "offline", "input_size", "description"]))
        print("\nAny timm model works too, as timm:<name> (weights are downloaded by timm).")
    return 0


def cmd_layers(args) -> int:
    rows = layer_rows(args.model, all_nodes=args.all)
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows))
    return 0


def demo(*, model: str = "efficientnet_lite0", per_class: int = 30, out=print) -> dict:
    """The main job until heads land: layers of the default backbone and digits features."""
    from featx.extraction import extract
    from featx.images import open_source

    out(f"Layers of {model}:")
    out(format_table(layer_rows(model)))
    source = open_source("digits", per_class=per_class)
    out(f"\nExtracting every stage of {len(source)} digits images ({per_class} per class) …")
    start = time.perf_counter()
    features = extract(source, backbone=model, layers="all", pooling="avg")
    seconds = time.perf_counter() - start
    rows = [{"features": key, "shape": value.shape} for key, value in features.items()]
    out(format_table(rows))
    out(f"{len(source)} images in {seconds:.1f} s ({len(source) / seconds:.1f} images/s)")
    return {"n_images": len(source), "seconds": seconds, "shapes": {k: v.shape for k, v in features.items()}}


def cmd_demo(args) -> int:
    demo(model=args.model, per_class=args.per_class)
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featx",
        description="Small-data image classification with frozen, pretrained CNN features.",
        epilog="Example: featx layers efficientnet_lite0",
    )
    parser.add_argument("--version", action="version", version=f"featx {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "demo",
        help="the main job: digits through efficientnet_lite0",
        description="List the default backbone's layers and extract features of scikit-learn's digits.",
        epilog="Example: featx demo",
    )
    p.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=30, help="digits per class (default: %(default)s)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "models",
        help="list the backbones",
        description="List the registered backbones, marking which work offline.",
        epilog="Example: featx models --json",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "layers",
        help="list a backbone's layers and dimensions",
        description="List a backbone's layer aliases with their node, shape and pooled dimension "
        "per pooling, without downloading anything.",
        epilog="Example: featx layers efficientnet_lite0 --all",
    )
    p.add_argument("model", nargs="?", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="also list every raw node of the network")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_layers)
    return parser


def _version() -> str:
    from featx import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featx`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FeatxError as exc:
        print(f"featx: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
