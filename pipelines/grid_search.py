"""Grid-search layers and C of ``CNNFeatures → StandardScaler → LogisticRegression``, timed.

The script first times ONE plain extraction of the images (every layer of the grid, into a fresh
feature store), then times ``GridSearchCV`` over layers × C × folds through a second fresh store,
and prints the ratio: with the store, the grid runs the network once per image, so it should cost
little more than the extraction itself.

Example::

    python pipelines/grid_search.py digits --per-class 30 --model efficientnet_lite0 \\
        --layers stage3,stage4,stage5 --C 0.1,1 --cv 3

Uses featx's public API and scikit-learn only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

import featx
from featx.cli import format_table
from featx.images import open_source
from featx.store import default_cache_dir

TARGET_RATIO = 3.0


def grid_search(
    data,
    *,
    model: str = "efficientnet_lite0",
    layers=("stage3", "stage4", "stage5"),
    Cs=(0.1, 1.0),
    cv: int = 3,
    per_class: int | None = None,
    cache=None,
    device: str = "auto",
    max_iter: int = 2000,
    random_state: int = 0,
    blas_threads: int | None = 1,
) -> dict:
    """Time one extraction and a grid search over ``layers`` × ``Cs`` × ``cv`` folds.

    Parameters
    ----------
    data : str or path
        What :func:`featx.images.open_source` opens: a folder of class sub-folders, a CSV file,
        ``'digits'`` or ``'fashion-mnist'``.
    cache : str or path, optional
        Folder in which the two fresh stores are made (and removed at the end); by default
        ``$FEATX_CACHE`` or ``./cache``.
    blas_threads : int or None, default=1
        BLAS threads during both timed phases (None: the library default). The heads are small
        (a few hundred rows): waking BLAS threads costs more than it saves, badly so on a busy
        machine with few cores. The network's threads are torch's own and are not limited.

    Returns
    -------
    dict
        ``n_images``, ``warmup_s`` (the untimed one-image run), ``extract_s``, ``grid_s``,
        ``ratio``, ``best_params``, ``best_score`` and ``results`` (one dict per grid point).
    """
    source = open_source(data, per_class=per_class, random_state=random_state)
    if source.labels is None:
        raise featx.FeatxError(f"{source.name!r} has no labels: use a folder of class sub-folders or a labelled CSV")
    layers, Cs = list(layers), [float(c) for c in Cs]
    parent = Path(cache) if cache is not None else default_cache_dir()
    parent.mkdir(parents=True, exist_ok=True)
    # Warm-up, not timed: imports, the layer probe and the first torch kernels would otherwise be
    # charged to whichever phase runs first (the extraction), flattering the ratio.
    start = time.perf_counter()
    featx.extract(source.subset([0]), backbone=model, layers=layers, device=device)
    warmup_s = time.perf_counter() - start
    limits = contextlib.nullcontext() if blas_threads is None else threadpool_limits(blas_threads, user_api="blas")
    with limits, tempfile.TemporaryDirectory(prefix="grid-search-", dir=parent) as fresh:
        start = time.perf_counter()
        extraction = featx.extract(
            source, backbone=model, layers=layers, store=Path(fresh, "extract"), device=device, on_error="raise"
        )
        extract_s = time.perf_counter() - start

        pipe = make_pipeline(
            featx.CNNFeatures(model, layer=layers[0], device=device, cache=Path(fresh, "grid")),
            StandardScaler(),
            LogisticRegression(max_iter=max_iter),
        )
        # n_jobs stays 1: the feature store has one writer, and after the first fold every
        # fit reads the store, so there is little left to parallelise.
        search = GridSearchCV(
            pipe,
            {"cnnfeatures__layer": layers, "logisticregression__C": Cs},
            cv=StratifiedKFold(cv, shuffle=True, random_state=random_state),
            error_score="raise",
        )
        start = time.perf_counter()
        search.fit(source, source.labels)
        grid_s = time.perf_counter() - start

    res = search.cv_results_
    results = [
        {
            "layer": params["cnnfeatures__layer"],
            "C": params["logisticregression__C"],
            "mean_score": float(res["mean_test_score"][i]),
            "std_score": float(res["std_test_score"][i]),
            "fit_s": float(res["mean_fit_time"][i]),
            "score_s": float(res["mean_score_time"][i]),
            "rank": int(res["rank_test_score"][i]),
        }
        for i, params in enumerate(res["params"])
    ]
    return {
        "data": source.name,
        "model": model,
        "n_images": len(source),
        "n_classes": source.n_classes,
        "n_computed": extraction.n_computed,
        "n_fits": len(results) * cv + 1,
        "blas_threads": blas_threads,
        "warmup_s": warmup_s,
        "extract_s": extract_s,
        "grid_s": grid_s,
        "ratio": grid_s / extract_s,
        "best_params": {
            "layer": search.best_params_["cnnfeatures__layer"],
            "C": search.best_params_["logisticregression__C"],
        },
        "best_score": float(search.best_score_),
        "results": results,
    }


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.1,1; got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grid_search.py",
        description="Time one feature extraction, then a GridSearchCV over layers × C through the feature store.",
        epilog="Example: python pipelines/grid_search.py digits --per-class 30 --layers stage3,stage4,stage5 --C 0.1,1",
    )
    parser.add_argument("data", help="folder of class sub-folders, CSV file, 'digits' or 'fashion-mnist'")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone (see 'featx models')")
    parser.add_argument("--layers", default="stage3,stage4,stage5", help="comma-separated layers to search")
    parser.add_argument("--C", dest="Cs", type=_floats, default=[0.1, 1.0], help="comma-separated values of C")
    parser.add_argument("--cv", type=int, default=3, help="number of stratified folds")
    parser.add_argument("--per-class", type=int, default=None, help="keep at most N images per class")
    parser.add_argument(
        "--cache", default=None, help="folder for the two fresh stores (default: $FEATX_CACHE or ./cache)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--max-iter", type=int, default=2000, help="LogisticRegression max_iter")
    parser.add_argument(
        "--blas-threads", type=int, default=1, help="BLAS threads for the heads (default: 1; 0: the library default)"
    )
    parser.add_argument("--random-state", type=int, default=0, help="seed of the subsample and of the folds")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        report = grid_search(
            args.data, model=args.model, layers=[v for v in args.layers.split(",") if v], Cs=args.Cs, cv=args.cv,
            per_class=args.per_class, cache=args.cache, device=args.device, max_iter=args.max_iter,
            random_state=args.random_state, blas_threads=args.blas_threads or None,
        )  # fmt: skip
    except featx.FeatxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    n_points = len(report["results"])
    print(f"{report['n_images']} images of {report['data']!r} ({report['n_classes']} classes), model {report['model']}")
    print(f"warm-up (imports, layer probe, 1 image; not counted): {report['warmup_s']:.2f} s")
    print(f"extraction (one pass, {len(args.layers.split(','))} layers, fresh store): {report['extract_s']:.2f} s")
    threads = "library default" if report["blas_threads"] is None else report["blas_threads"]
    print(f"grid search ({n_points} points × {args.cv} folds + refit = {report['n_fits']} fits, fresh store, "
          f"BLAS threads: {threads}): {report['grid_s']:.2f} s")  # fmt: skip
    verdict = "below" if report["ratio"] < TARGET_RATIO else "NOT below"
    print(f"ratio grid / extraction: {report['ratio']:.2f} ({verdict} the {TARGET_RATIO:g}× target)")
    best = report["best_params"]
    print(f"best params: layer={best['layer']} C={best['C']:g}  best score: {report['best_score']:.4f}")
    print()
    print(format_table(sorted(report["results"], key=lambda r: r["rank"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
