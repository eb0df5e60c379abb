"""The ``featx`` command: thin verbs over the public API.

Each command parses its options, calls one importable function that returns data, and prints
that data as a table (or JSON with ``--json``). A :class:`~featx.exceptions.FeatxError` becomes
one line on stderr and exit code 1; anything else keeps its traceback, because it is a bug.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
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


@contextlib.contextmanager
def _sigterm_interrupts():
    """Turn SIGTERM into KeyboardInterrupt for the duration, so both stop a run the same way."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _open_data(args):
    from featx.images import open_source

    return open_source(
        args.data,
        per_class=args.per_class,
        split=args.split,
        random_state=args.seed,
        allow_outside_root=args.allow_outside_root,
    )


def _weights(value: str):
    return None if value.lower() == "none" else value


def _extraction_kwargs(args) -> dict:
    return {
        "backbone": args.model,
        "weights": _weights(args.weights),
        "batch_size": args.batch_size,
        "device": args.device,
        "precision": args.precision,
        "num_workers": args.workers if args.workers is not None else "auto",
        "on_error": args.on_error,
        "store": args.cache if args.cache else True,
        "dtype": args.dtype,
    }


def cmd_extract(args) -> int:
    from featx.extraction import extract

    source = _open_data(args)
    for path, reason in source.problems:
        print(f"featx: warning: {path}: {reason}", file=sys.stderr)
    with _sigterm_interrupts():
        try:
            result = extract(source, layers=args.layers, pooling=args.pool, **_extraction_kwargs(args))
        except KeyboardInterrupt:
            print(
                "featx: interrupted: every completed batch is kept in the store; run the same command "
                "again to resume.",
                file=sys.stderr,
            )
            return 130
    if args.json:
        _print_json(
            {
                "store": str(result.store.path),
                "n_images": len(result.keys),
                "n_computed": result.n_computed,
                "n_kept": len(result.kept),
                "skipped": [{"image": name, "reason": reason} for name, reason in result.skipped],
                "seconds": result.seconds,
                "images_per_s": result.images_per_s,
                "features": {key: [len(result.kept), result.store.dim(*key.split("/"))] for key in result},
            }
        )
    else:
        print(result.summary())
    return 0


def cmd_cache(args) -> int:
    from featx.store import FeatureStore, default_cache_dir, list_stores, remove_store

    if args.action == "list":
        rows = list_stores(args.cache)
        if args.json:
            _print_json(rows)
        else:
            print(f"Feature stores in {args.cache or default_cache_dir()}:")
            print(format_table(rows))
        return 0
    if args.store is None:
        raise FeatxError(f"'featx cache {args.action}' needs a STORE path; run 'featx cache list' to see them.")
    if args.action == "rm":
        remove_store(args.store)
        print(f"removed {args.store}")
        return 0
    with FeatureStore(args.store) as store:
        report = store.info() if args.action == "info" else store.verify()
    if args.json or args.action == "info":
        _print_json(report)
    else:
        print(f"{args.store}: {'ok' if report['ok'] else 'PROBLEMS'}")
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if args.action != "verify" or report["ok"] else 1


# --------------------------------------------------------------------------- parser


def _add_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "data",
        metavar="DATA",
        help="a folder of class sub-folders, a CSV/TSV (path,label), an image file, 'digits' or 'fashion-mnist'",
    )
    g.add_argument("--per-class", type=int, default=None, metavar="N", help="keep N images per class (seeded)")
    g.add_argument("--split", default="train", help="built-in datasets: train, test (or all for digits)")
    g.add_argument("--seed", type=int, default=0, help="seed of --per-class and of splits (default: %(default)s)")
    g.add_argument(
        "--allow-outside-root", action="store_true", help="accept CSV paths outside the CSV's folder"
    )


def _add_extraction_options(p: argparse.ArgumentParser, *, layers_default: str = "pre_logits") -> None:
    g = p.add_argument_group("extraction")
    g.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s; see 'featx models')")
    g.add_argument("--weights", default="DEFAULT", help="DEFAULT, a weights name, a state-dict path, or none")
    g.add_argument(
        "--layers", default=layers_default, help="comma-separated aliases or nodes, or all (default: %(default)s)"
    )
    g.add_argument("--pool", default="avg", help="comma-separated: avg, max, avgmax, spp (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    g.add_argument(
        "--on-error", choices=("skip", "raise"), default="skip", help="bad images: skip and report, or stop"
    )
    g.add_argument("--cache", default=None, metavar="DIR", help="feature store folder (default: $FEATX_CACHE or ./cache)")
    g.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision of a new store")




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

    p = sub.add_parser(
        "extract",
        help="extract features into the feature store",
        description="Extract pooled features of DATA into the feature store of this configuration. "
        "Only images and layers the store lacks are computed; an interrupted run keeps every "
        "completed batch and resumes where it stopped.",
        epilog="Example: featx extract digits --model efficientnet_lite0 --layers stage3,pre_logits",
    )
    _add_data_options(p)
    _add_extraction_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "cache",
        help="list, inspect, verify or remove feature stores",
        description="Manage the feature stores in the cache folder.",
        epilog="Example: featx cache list; featx cache verify cache/efficientnet_lite0-0123456789ab.h5",
    )
    p.add_argument("action", choices=("list", "info", "verify", "rm"))
    p.add_argument("store", nargs="?", default=None, help="a store file (info, verify, rm)")
    p.add_argument("--cache", default=None, metavar="DIR", help="folder to list (default: $FEATX_CACHE or ./cache)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache)
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
