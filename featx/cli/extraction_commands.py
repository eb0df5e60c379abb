"""``featx extract`` and ``featx cache``: features into the feature store, and the stores themselves.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
"""

from __future__ import annotations

import argparse

from featx.cli.arguments import (
    add_data_options,
    add_engine_options,
    add_extraction_options,
    add_json,
    extract_options,
    open_data,
)
from featx.cli.interrupts import interrupted, interruptible
from featx.cli.output import format_table, print_json
from featx.exceptions import FeatxError
from featx.extraction import extract
from featx.paths import default_cache_dir
from featx.shards import merge_stores, parse_shard
from featx.store import FeatureStore, list_stores, remove_store

__all__ = ["COMMANDS"]


def cmd_extract(args) -> int:
    """extract features into the feature store

    Extract pooled features of DATA into the feature store of this configuration. Only images and
    layers the store lacks are computed; an interrupted run keeps every completed batch and
    resumes where it stopped.

    Examples: featx extract digits --model efficientnet_lite0 --layers stage3,pre_logits; featx
    extract data/train --shard 0/4 (then 1/4, 2/4, 3/4 anywhere, and 'featx cache merge cache -o
    cache'); featx extract data/train --engine ray --address auto --gpus-per-worker 1
    """
    shard = None if args.shard is None else parse_shard(args.shard)
    options = extract_options(args)
    source = open_data(args)
    with interruptible() as stop:
        try:
            result = extract(source, options, stop=stop, shard=shard)
        except KeyboardInterrupt:
            return interrupted("every completed batch is kept in the store")
    if args.json:
        print_json(
            {
                "store": str(result.store.path),
                "n_images": len(result.keys),
                "n_computed": result.n_computed,
                "n_kept": len(result.kept),
                "shard": list(result.shard) if result.shard else None,
                "skipped": [{"image": name, "reason": reason} for name, reason in result.skipped],
                "seconds": result.seconds,
                "images_per_s": result.images_per_s,
                "features": {key: [len(result.kept), result.store.dim(*key.split("/"))] for key in result},
            }
        )
    else:
        print(result.summary())
    return 0


def extract_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    add_extraction_options(p)
    add_extraction_options(p, ("decoder", "compile", "runtime"), title=None)
    add_engine_options(p)
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="extract only part I of N (numbered from 0: 0/N ... N-1/N), chosen by content key, into a shard "
        "store beside the main store; skips what the main store or any shard holds. Merge with 'featx cache merge'",
    )
    add_json(p, "print JSON instead of a summary")


def cmd_cache(args) -> int:
    """list, inspect, verify, merge or remove feature stores

    Manage the feature stores in the cache folder. 'merge' copies shard stores (of one
    configuration; others are refused) into one ordinary store.

    Example: featx cache list; featx cache verify cache/efficientnet_lite0-0123456789ab.h5; featx
    cache merge cache/*.shard-*.h5 -o cache
    """
    if args.action == "list":
        rows = list_stores(args.cache)
        if args.json:
            print_json(rows)
        else:
            print(f"Feature stores in {args.cache or default_cache_dir()}:")
            print(format_table(rows))
        return 0
    if args.action == "merge":
        return _cache_merge(args)
    if len(args.store) != 1:
        raise FeatxError(
            f"'featx cache {args.action}' needs a STORE path (exactly one, got {len(args.store)}); "
            "run 'featx cache list' to see them."
        )
    path = args.store[0]
    if args.action == "rm":
        remove_store(path)
        print(f"removed {path}")
        return 0
    with FeatureStore(path) as store:
        report = store.info() if args.action == "info" else store.verify()
    if args.json or args.action == "info":
        print_json(report)
    else:
        print(f"{path}: {'ok' if report['ok'] else 'PROBLEMS'}")
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if args.action != "verify" or report["ok"] else 1


def _cache_merge(args) -> int:
    if not args.store:
        raise FeatxError("'featx cache merge' needs the shard stores (files, or their folder) and -o OUT")
    if args.output is None:
        raise FeatxError("'featx cache merge' needs -o OUT: a folder (the store gets its canonical name) or a .h5 file")
    report = merge_stores(args.store, args.output)
    if args.json:
        print_json(report)
    else:
        print(f"merged {len(report['shards'])} stores into {report['output']}: {report['n_keys']} images, "
              f"{report['rows_copied']} rows copied ({', '.join(report['entries'])})")
    return 0


def cache_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=("list", "info", "verify", "rm", "merge"))
    p.add_argument("store", nargs="*", metavar="STORE",
                   help="a store file (info, verify, rm); shard store files or their folder (merge)")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="merge: a folder (the store gets its canonical name, found by --cache) or a .h5 file")
    p.add_argument("--cache", default=None, metavar="DIR", help="folder to list (default: $FEATX_CACHE or ./cache)")
    add_json(p, "print JSON")


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {"extract": (cmd_extract, extract_arguments), "cache": (cmd_cache, cache_arguments)}
