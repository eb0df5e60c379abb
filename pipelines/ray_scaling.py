"""Measure extraction throughput on 1 and 2 Ray workers, side by side, and the store's write rate.

In one run, on the same images (DATA, or ``--n`` generated 500x375 JPEGs):

(a) ``local``: :func:`featx.extract` in this process (all cores: torch threads + decoding workers);
(b) ``ray xW``: the Ray engine with W actors of one CPU each, for every ``--workers`` value, on one
    local Ray cluster started before the clock (actor start and backbone load are counted);
(c) ``store writes``: :meth:`featx.store.FeatureStore.write` of ``--batch-size`` rows of a
    ``pre_logits``-sized vector, committed durably, on its own: the rate one driver can absorb.

Every extraction goes into a fresh store and is timed from listing to consolidated store. Nothing
is asserted: the figures are printed for people, with the ratios measured in this one run.

Example::

    python pipelines/ray_scaling.py --n 384 --workers 1,2 --json
    python pipelines/ray_scaling.py --n 384 --rates     # one core: hashing, decoding, merging

Uses featx's public API only (and Ray, ``pip install "featx[ray]"``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import featx
from featx.cli import format_table
from featx.distributed import RayEngine, ray_session
from featx.images import open_source
from featx.store import FeatureStore


def _extract(source, cache, *, model, layers, batch_size, engine="local") -> dict:
    start = time.perf_counter()
    result = featx.extract(source, backbone=model, layers=layers, store=cache, batch_size=batch_size,
                           progress=False, engine=engine)
    seconds = time.perf_counter() - start
    return {"n": result.n_computed, "seconds": seconds, "images_per_s": result.n_computed / seconds}


def store_write_rate(folder, *, dim: int = 1280, batch_size: int = 32, batches: int = 200) -> dict:
    """Rows per second that :meth:`FeatureStore.write` commits (fsynced segments), then consolidation."""
    store = FeatureStore.open({"backbone": "write-rate", "dim": dim}, cache_dir=folder)
    rng = np.random.default_rng(0)
    values = rng.random((batch_size, dim), dtype=np.float32)
    start = time.perf_counter()
    with store.writer():
        for b in range(batches):
            keys = [f"{b * batch_size + i:032x}" for i in range(batch_size)]
            store.write(keys, {("pre_logits", "avg"): values})
        written = time.perf_counter() - start
        store.consolidate()
    total = time.perf_counter() - start
    rows = batches * batch_size
    return {"rows": rows, "batch_rows": batch_size, "dim": dim, "rows_per_s": rows / written,
            "ms_per_batch": 1000 * written / batches,
            "rows_per_s_with_consolidation": rows / total, "bytes_per_row": 4 * dim}


def per_core_rates(folder, *, model: str = "efficientnet_lite0", merge_rows: int = 20000, dim: int = 1280) -> dict:
    """One core's rates for the stages the cost model needs: content keys, decoding, merging.

    ``hash``: :func:`featx.images.content_key` over the files (MB/s and files/s, page cache warm);
    ``decode``: decode + resize + crop to the backbone's input, as a decoding worker does;
    ``merge``: :func:`featx.shards.merge_stores` of two shard stores of ``merge_rows`` rows of ``dim``.
    """
    from featx.backbones import load_backbone
    from featx.images import content_key, load_image
    from featx.shards import merge_stores, shard_path

    paths = sorted(str(p) for p in Path(folder).rglob("*.jpg"))
    size = sum(os.path.getsize(p) for p in paths)
    start = time.perf_counter()
    for path in paths:
        content_key(path)
    hashing = time.perf_counter() - start
    preprocess = load_backbone(model, lazy=True).preprocess
    start = time.perf_counter()
    for path in paths:
        preprocess.crop_array(load_image(path, draft_size=preprocess.draft_size))
    decoding = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        config = {"backbone": "merge-rate", "dim": dim}
        main = Path(tmp) / "merge-rate-000000000000.h5"
        rng = np.random.default_rng(0)
        for part in range(2):
            shard = FeatureStore.open(config, path=shard_path(main, (part, 2)))
            with shard.writer():
                for start_row in range(0, merge_rows // 2, 2048):
                    keys = [f"{part:02x}{i:030x}" for i in range(start_row, min(start_row + 2048, merge_rows // 2))]
                    shard.write(keys, {("pre_logits", "avg"): rng.random((len(keys), dim), dtype=np.float32)})
                shard.consolidate()
        start = time.perf_counter()
        merge_stores([shard_path(main, (0, 2)), shard_path(main, (1, 2))], main)
        merging = time.perf_counter() - start
    return {"files": len(paths), "mean_file_kb": size / len(paths) / 1024,
            "hash_files_per_s": len(paths) / hashing, "hash_mb_per_s": size / hashing / 1e6,
            "decode_images_per_s": len(paths) / decoding, "merge_rows": merge_rows, "merge_dim": dim,
            "merge_rows_per_s": merge_rows / merging, "merge_mb_per_s": merge_rows * 4 * dim / merging / 1e6}


def ray_scaling(data=None, *, n: int = 384, per_class=None, workers=(1, 2), model: str = "efficientnet_lite0",
                layers: str = "pre_logits", batch_size: int = 32, cache=None, out=print) -> dict:
    """Run (a), (b) and (c) of the module docstring; return the figures."""
    from featx.bench import make_jpegs

    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        tmp = Path(tmp)
        if data is None:
            out(f"generating {n} JPEGs of 500x375 …")
            data = make_jpegs(tmp / "images", n)
        source = open_source(str(data), per_class=per_class)
        featx.load_backbone(model)  # weights into the OS cache before any clock starts
        rows = []
        out(f"(a) local, one process, {os.cpu_count()} cores …")
        rows.append({"run": "local", "workers": "-", **_extract(source, tmp / "local", model=model, layers=layers,
                                                                   batch_size=batch_size)})
        out(f"    {rows[-1]['images_per_s']:.1f} images/s")
        start = time.perf_counter()
        with ray_session(num_cpus=max(workers)) as ray:
            cluster_start = time.perf_counter() - start
            out(f"    local Ray cluster started in {cluster_start:.1f} s (not counted below)")
            for w in workers:
                out(f"(b) Ray engine, {w} worker(s) …")
                engine = RayEngine(workers=w)
                rows.append({"run": f"ray x{w}", "workers": w, **_extract(source, tmp / f"ray{w}", model=model,
                                                                           layers=layers, batch_size=batch_size,
                                                                           engine=engine)})
                out(f"    {rows[-1]['images_per_s']:.1f} images/s")
            resources = ray.cluster_resources()
        out("(c) store write rate …")
        writes = [store_write_rate(tmp / f"writes{rows}", batch_size=rows, batches=max(20, 6400 // rows))
                  for rows in (batch_size, 8 * batch_size)]
        for w in writes:
            out(f"    {w['rows_per_s']:.0f} rows/s ({w['ms_per_batch']:.2f} ms per write of {w['batch_rows']} rows)")
    first = next((r for r in rows if r["workers"] == workers[0]), None)
    for row in rows:
        row["vs_first_ray"] = row["images_per_s"] / first["images_per_s"] if first else float("nan")
    return {"model": model, "layers": layers, "n_images": rows[0]["n"], "batch_size": batch_size,
            "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "ray_cluster_start_s": cluster_start,
            "ray_resources": resources, "runs": rows, "store_writes": writes}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Example: python "
                                     "pipelines/ray_scaling.py --n 384 --workers 1,2")
    parser.add_argument("data", nargs="?", default=None, help="a folder, CSV or built-in (default: generated JPEGs)")
    parser.add_argument("--n", type=int, default=384, help="JPEGs to generate without DATA (default: %(default)s)")
    parser.add_argument("--per-class", type=int, default=None, help="keep N images per class of DATA")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to measure (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--layers", default="pre_logits")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cache", default=None, help="folder for the temporary stores (default: system temp)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--rates", action="store_true",
                        help="only measure one core's hashing, decoding and merge rates on --n generated JPEGs")
    args = parser.parse_args(argv)
    if args.rates:
        from featx.bench import make_jpegs

        with tempfile.TemporaryDirectory(dir=args.cache) as tmp:
            rates = per_core_rates(make_jpegs(Path(tmp) / "images", args.n), model=args.model)
        print(json.dumps(rates, indent=2) if args.json else format_table([rates]))
        return 0
    try:
        report = ray_scaling(args.data, n=args.n, per_class=args.per_class,
                             workers=tuple(int(w) for w in args.workers.split(",")), model=args.model,
                             layers=args.layers, batch_size=args.batch_size, cache=args.cache,
                             out=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    except featx.FeatxError as exc:
        print(f"ray_scaling: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=float)
        print()
        return 0
    print(f"\n{report['n_images']} images, {report['model']} {report['layers']}, {report['cpu_count']} cores "
          f"(load average {report['load_average'][0]:.1f}):")
    print(format_table(report["runs"], ["run", "workers", "n", "seconds", "images_per_s", "vs_first_ray"]))
    for w in report["store_writes"]:
        print(f"store writes of {w['batch_rows']} rows: {w['rows_per_s']:.0f} rows/s of {w['bytes_per_row']} bytes "
              f"({w['ms_per_batch']:.2f} ms per write), {w['rows_per_s_with_consolidation']:.0f} rows/s with "
              "consolidation")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
