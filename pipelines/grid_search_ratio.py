"""The README's GridSearchCV example against one extraction of the same images, alone and under load.

The acceptance measurement of the thread plan (:mod:`featx.threads`): 300 of scikit-learn's
digits, scaled to [0, 1] and passed as images, and, exactly as a user writes it with nothing
pinned (no thread setting, no ``cache`` argument: ``CNNFeatures()`` caches to the default store)::

    GridSearchCV(make_pipeline(CNNFeatures(), LogisticRegression(max_iter=2000)),
                 {"cnnfeatures__layer": ["stage3", "stage4", "pre_logits"],
                  "logisticregression__C": [0.1, 1]}, cv=3)

Two conditions, side by side in one run, each with fresh stores (``$FEATX_CACHE`` points at a
new temporary folder for the grid):

- ``alone``: one ``featx.extract`` of the three layers into a fresh store, timed, then the grid
  search, timed, then the extraction again into another fresh store (the ratio divides the grid
  by the mean of the two extractions, so a machine whose load drifts charges both alike).
- ``busy``: the same two, while a second ``featx extract`` of other images (generated JPEGs,
  restarted on a fresh store whenever it finishes) runs beside them in a subprocess.

Each condition starts as a fresh process would: the BLAS thread count ``CNNFeatures`` leaves
behind is restored in between. The output is one line per figure and one per ratio
(targets: below 1.5 alone, below 2 busy). Uses featx's public API and scikit-learn only.

Example::

    python pipelines/grid_search_ratio.py            # both conditions, about 2 minutes idle on 2 cores
    python pipelines/grid_search_ratio.py --only alone --json
    FEATX_THREADS=none python pipelines/grid_search_ratio.py --threads none   # no thread plan: the old behaviour
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import featx  # first: featx sets the OpenMP wait policy before torch loads its runtime
import featx.threads
import numpy as np
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline

from featx.bench import busy_neighbour, make_jpegs

LAYERS = ("stage3", "stage4", "pre_logits")
CS = (0.1, 1)
TARGETS = {"alone": 1.5, "busy": 2.0}

def digits_images(n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` digits as (n, 8, 8) float images in [0, 1], and their labels."""
    digits = load_digits()
    return digits.images[:n] / 16.0, digits.target[:n]


def _threads_value(text: str):
    if text == "auto":
        return "auto"
    if text.lower() == "none":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, none or a whole number; got {text!r}") from None


def _extract_s(images, *, model: str, layers, threads, store: Path) -> float:
    start = time.perf_counter()
    featx.extract(images, backbone=model, layers=list(layers), store=store, threads=threads)
    return time.perf_counter() - start


def measure(images, labels, *, model: str, layers=LAYERS, threads, parent: Path) -> dict:
    """Time one extraction of ``images`` (fresh store) before and after the grid search (fresh default
    store); the ratio divides by their mean, so that a load that drifts during the run is shared."""
    with tempfile.TemporaryDirectory(dir=parent) as stores:
        load = os.getloadavg()[0]
        before_s = _extract_s(images, model=model, layers=layers, threads=threads, store=Path(stores, "extract-before"))
        os.environ["FEATX_CACHE"] = str(Path(stores, "grid"))  # CNNFeatures() caches to the default store
        params = {} if threads == "auto" else {"threads": threads}
        search = GridSearchCV(make_pipeline(featx.CNNFeatures(model, **params), LogisticRegression(max_iter=2000)),
                              {"cnnfeatures__layer": list(layers), "logisticregression__C": list(CS)}, cv=3)
        start = time.perf_counter()
        search.fit(images, labels)
        grid_s = time.perf_counter() - start
        restored = featx.threads.restore_blas()  # the extraction after it starts as the one before did
        after_s = _extract_s(images, model=model, layers=layers, threads=threads, store=Path(stores, "extract-after"))
        if restored:
            featx.threads.leave_blas_at_one()
    extract_s = (before_s + after_s) / 2
    return {"extract_s": extract_s, "extract_before_s": before_s, "extract_after_s": after_s, "grid_s": grid_s,
            "ratio": grid_s / extract_s, "load_at_start": load,
            "best_params": search.best_params_, "best_score": float(search.best_score_)}


def run(*, n: int = 300, model: str = "efficientnet_lite0", layers=LAYERS, threads="auto", only: str | None = None,
        busy_images: int = 256, out=print) -> dict:
    """Both conditions (or ``only`` one), side by side; returns their figures."""
    images, labels = digits_images(n)
    report = {"n_images": len(images), "model": model, "threads": threads, "cores": featx.threads.available_cores(),
              "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    saved = os.environ.get("FEATX_CACHE")
    with tempfile.TemporaryDirectory(prefix="grid-ratio-") as tmp:
        tmp = Path(tmp)
        # Warm-up, not timed: imports, weights, the layer probe and the kernels of a full batch
        # (oneDNN prepares them per input shape; charged to the first extraction otherwise).
        featx.extract(images[:32], backbone=model, layers=list(layers), threads=threads)
        LogisticRegression(max_iter=50).fit(np.random.default_rng(0).normal(size=(20, 4)), np.arange(20) % 2)
        try:
            for condition in ("alone", "busy"):
                if only not in (None, condition):
                    continue
                featx.threads.restore_blas()  # as a fresh process would start
                if condition == "busy":
                    folder = make_jpegs(tmp / "neighbour", busy_images, seed=1)
                    with busy_neighbour(folder, model=model):
                        figures = measure(images, labels, model=model, layers=layers, threads=threads, parent=tmp)
                else:
                    figures = measure(images, labels, model=model, layers=layers, threads=threads, parent=tmp)
                report[condition] = figures
                beside = "alone" if condition == "alone" else "beside a second 'featx extract'"
                out(f"[{condition}] load average at start:        {figures['load_at_start']:.1f}")
                out(f"[{condition}] one extraction ({beside}):   {figures['extract_s']:.2f} s (mean of "
                    f"{figures['extract_before_s']:.2f} s before the grid and {figures['extract_after_s']:.2f} s after)")
                out(f"[{condition}] GridSearchCV ({beside}):     {figures['grid_s']:.2f} s")
                verdict = "below" if figures["ratio"] < TARGETS[condition] else "NOT below"
                out(f"[{condition}] ratio grid / extraction:      {figures['ratio']:.2f}x "
                    f"({verdict} the {TARGETS[condition]:g}x target)")
        finally:
            featx.threads.restore_blas()
            if saved is None:
                os.environ.pop("FEATX_CACHE", None)
            else:
                os.environ["FEATX_CACHE"] = saved
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grid_search_ratio.py",
        description="Time the README's GridSearchCV example against one extraction, alone and beside a second "
                    "'featx extract'.",
        epilog="Example: python pipelines/grid_search_ratio.py --only alone",
    )
    parser.add_argument("--n", type=int, default=300, help="digit images (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    parser.add_argument("--layers", default=",".join(LAYERS), help="the grid's layers (default: %(default)s)")
    parser.add_argument("--threads", type=_threads_value, default="auto",
                        help="featx's thread plan: auto (default, what a user gets), none (featx changes no thread "
                             "setting) or N torch threads")
    parser.add_argument("--only", choices=("alone", "busy"), default=None, help="measure one condition only")
    parser.add_argument("--busy-images", type=int, default=256,
                        help="JPEGs the neighbouring extraction works through (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    layers = [v for v in args.layers.split(",") if v]
    print(f"{args.n} digits (8x8, [0, 1]) through {args.model}; grid {layers} x C {list(CS)} x 3 folds; "
          f"threads={args.threads!r}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"{featx.threads.available_cores()} cores", flush=True)
    try:
        report = run(n=args.n, model=args.model, layers=layers, threads=args.threads, only=args.only,
                     busy_images=args.busy_images,
                     out=lambda line: print(line, flush=True))
    except featx.FeatxError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
