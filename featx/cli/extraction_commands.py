"""``featx extract`` and ``featx cache``: features into the feature store, and the stores themselves.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
"""

from __future__ import annotations

import argparse
import pathlib

from featx.cli.arguments import (
    add_data_options,
    add_engine_options,
    add_extraction_options,
    add_json,
    extract_options,
    open_data,
)
from featx.cli.interrupts import interrupted, interruptible
from featx.cli.output import format_size, format_table, print_json
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
    resumes where it stopped. Runs at once on one store share the work: each computes the images
    no other has claimed and takes the others' rows from the store.

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
                "n_from_store": result.n_from_store,
                "n_from_other_processes": result.n_shared,
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
            readable = [row for row in rows if "error" not in row]
            if readable or not rows:
                print(format_table([_store_row(row) for row in readable]))
            for row in rows:
                if "error" in row:
                    print(f"cannot read {pathlib.Path(row['path']).name}: {row['error']}")
            if readable:
                print("(all the details: 'featx cache info STORE', or 'featx cache list --json')")
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
    if args.json:
        print_json(report)
    elif args.action == "info":
        print(_info_text(report))
    else:
        print(f"{path}: {'ok' if report['ok'] else 'PROBLEMS'}")
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if args.action != "verify" or report["ok"] else 1


def _store_row(row: dict) -> dict:
    """One row of 'featx cache list': what tells the stores apart, short enough for a terminal."""
    entries = row["entries"]
    features = entries[0] + (f" +{len(entries) - 1} more" if len(entries) > 1 else "") if entries else "-"
    return {"store": pathlib.Path(row["path"]).name, "backbone": row["backbone"], "images": row["n_keys"],
            "features": features, "size": format_size(row["size_bytes"]), "updated (UTC)": _minutes(row["updated"])}


def _minutes(timestamp: str) -> str:
    """``2026-12-01T18:59:10+00:00`` as ``2026-12-01 18:59``."""
    return timestamp[:16].replace("T", " ")


def _info_text(info: dict) -> str:
    """'featx cache info' for people: key: value lines, the configuration and provenance indented."""
    lines = [
        f"store: {info['path']}",
        f"backbone: {info['config'].get('backbone', '?')}",
        f"weights: {info['config'].get('weights', '?')}",
        f"config hash: {info['config_hash']}",
        f"dtype: {info['dtype']}",
        f"images: {info['n_keys']}",
        f"size: {format_size(info['size_bytes'])} ({info['size_bytes']} bytes)",
        f"created: {info['created']}",
        f"updated: {info['updated']}",
        f"journal segments: {info['journal_segments']} (batches not yet consolidated into the main file)",
        f"format version: {info['format_version']}",
        f"features ({len(info['entries'])}):",
    ]
    lines += [f"  {e['layer']}/{e['pooling']}: {e['n']} rows × {e['dim']}" for e in info["entries"]] or ["  (none)"]
    for title in ("config", "provenance"):
        lines.append(f"{title}:")
        lines += [f"  {key}: {_flat(value)}" for key, value in sorted((info[title] or {}).items())] or ["  (none)"]
    return "\n".join(lines)


def _flat(value) -> str:
    """A config value on one line: dicts as ``key=value`` pairs, lists comma-separated."""
    if isinstance(value, dict):
        return ", ".join(f"{key}={_flat(v)}" for key, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_flat(v) for v in value) + "]"
    return str(value)


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
    add_json(p, "print JSON (list: every field of every store; info: the full description)")


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {"extract": (cmd_extract, extract_arguments), "cache": (cmd_cache, cache_arguments)}
