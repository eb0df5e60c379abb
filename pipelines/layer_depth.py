"""The layer-depth study: which layer of a frozen ImageNet CNN serves digits and Fashion-MNIST best.

For every dataset, :func:`featx.compare_layers` cross-validates a logistic-regression head on
every layer (``stem`` … ``stage7``, ``pre_logits``) of each backbone, the table, CSV, JSON and
plot are written with :func:`featx.compare.write_comparison`, and the transfer-learning advisor
(:func:`featx.advise.advise`) says which quadrant of the decision table the data falls in and
whether the measured best layer agrees with it.

Example (about 5 minutes on 2 CPU cores the first time, seconds after: features and reports are
read back from the feature store)::

    python pipelines/layer_depth.py --datasets digits,fashion-mnist --per-class 100 \\
        --models efficientnet_lite0 --pool avg --cv 5 --out results/layer_depth

writes ``results/layer_depth/<dataset>/compare.{csv,json,png}`` and ``advice.json``. Fashion-MNIST
comes from Debian's ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``); without
it that dataset is skipped with a message on stderr.

Uses featx's public API only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import featx
from featx.advise import advise
from featx.cli import format_table
from featx.compare import best_row, write_comparison
from featx.images import open_source

DATASETS = ("digits", "fashion-mnist")
INSTALL_HINT = {"fashion-mnist": "apt-get install dataset-fashion-mnist"}
TABLE_COLUMNS = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std",
                 "fit_time"]  # fmt: skip


def layer_depth_study(
    source,
    *,
    models=("efficientnet_lite0",),
    poolings=("avg",),
    cv: int = 5,
    out=None,
    advice: bool = True,
    device: str = "auto",
    random_state: int = 0,
) -> dict:
    """Compare every layer of ``models`` on one dataset, write the results, ask the advisor.

    Parameters
    ----------
    source : ImageSource
        Labelled images, e.g. ``open_source("digits", per_class=100)``.
    models, poolings : sequence of str
        Backbones and poolings compared (every layer of each).
    cv : int
        Outer folds of the cross-validation.
    out : str or path, optional
        Folder for ``compare.csv``, ``compare.json``, ``compare.png`` and ``advice.json``;
        nothing is written when ``None``.
    advice : bool
        Also run :func:`featx.advise.advise` (it measures the shift from ImageNet on up to 200
        images with ``efficientnet_lite0``).

    Returns
    -------
    dict
        ``dataset`` (the source's name), ``n_images``, ``rows`` (of :func:`featx.compare_layers`),
        ``best`` (the best row), ``advice`` (the advisor's report or ``None``), ``paths`` and ``seconds``.
    """
    start = time.perf_counter()
    rows = featx.compare_layers(source, backbones=list(models), layers="all", poolings=list(poolings),
                                heads="logreg", cv=cv, random_state=random_state, device=device)  # fmt: skip
    best = best_row(rows)
    report = advise(source, backbone=best["model"], device=device, comparison=rows) if advice else None
    paths = {}
    if out is not None:
        paths = write_comparison(rows, out, title=source.name)
        if report is not None:
            paths["advice"] = Path(out) / "advice.json"
            paths["advice"].write_text(json.dumps(report, indent=2))
    return {
        "dataset": source.name,
        "n_images": len(source),
        "rows": rows,
        "best": best,
        "advice": report,
        "paths": paths,
        "seconds": time.perf_counter() - start,
    }


def _names(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names; got {text!r}")
    return names


def _datasets(text: str) -> list[str]:
    names = _names(text)
    unknown = [n for n in names if n not in DATASETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dataset {unknown[0]!r}; expected some of {', '.join(DATASETS)}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer; got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="layer_depth.py",
        description="Cross-validate a linear head on every layer of frozen ImageNet backbones, on digits and "
        "Fashion-MNIST; write the table, CSV, JSON and plot, and the advisor's verdict.",
        epilog="Example: python pipelines/layer_depth.py --datasets digits,fashion-mnist --per-class 100 "
        "--out results/layer_depth",
    )
    parser.add_argument("--datasets", type=_datasets, default=list(DATASETS),
                        help="comma-separated: digits, fashion-mnist (default: both)")
    parser.add_argument("--per-class", type=_positive, default=100, help="images per class (default: %(default)s)")
    parser.add_argument("--models", type=_names, default=["efficientnet_lite0"],
                        help="comma-separated backbones (default: efficientnet_lite0; see 'featx models')")
    parser.add_argument("--pool", type=_names, default=["avg"], help="comma-separated poolings (default: avg)")
    parser.add_argument("--cv", type=_positive, default=5, help="outer cross-validation folds (default: %(default)s)")
    parser.add_argument("--out", default="results/layer_depth", metavar="DIR",
                        help="results go to DIR/<dataset>/ (default: %(default)s)")
    parser.add_argument("--no-advice", dest="advice", action="store_false",
                        help="skip the advisor (it runs efficientnet_lite0 on up to 200 images)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the per-class subset and of the folds")
    return parser


def _print_study(study: dict) -> None:
    best, report = study["best"], study["advice"]
    print(f"\n== {study['dataset']}: {study['n_images']} images ==")
    print(format_table(study["rows"], TABLE_COLUMNS))
    print(f"best layer: {best['model']} {best['layer']} / {best['pooling']} / {best['head']}: "
          f"accuracy {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f}")  # fmt: skip
    if report is not None:
        print(f"advisor: {report['quadrant']} (shift from ImageNet {report['similarity_score']:.3f}, "
              f"threshold {report['threshold']})")  # fmt: skip
        print(f"recommendation: {report['recommendation']}")
        print(f"agrees with the table: {'yes' if report['agrees'] else 'no'} ({report['measurement']})")
    if study["paths"]:
        print("wrote " + ", ".join(str(p) for p in study["paths"].values()))
    print(f"time: {study['seconds']:.1f} s")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    studies = []
    for dataset in args.datasets:
        try:
            source = open_source(dataset, per_class=args.per_class, random_state=args.seed)
        except featx.FeatxError as exc:
            hint = INSTALL_HINT.get(dataset)
            hint = f" Install it with `{hint}`." if hint and hint not in str(exc) else ""
            print(f"skipped {dataset}: {exc}{hint}", file=sys.stderr)
            continue
        try:
            study = layer_depth_study(
                source, models=args.models, poolings=args.pool, cv=args.cv, out=Path(args.out) / dataset,
                advice=args.advice, device=args.device, random_state=args.seed,
            )  # fmt: skip
        except featx.FeatxError as exc:
            print(f"error: {dataset}: {exc}", file=sys.stderr)
            return 1
        _print_study(study)
        studies.append(study)
    if not studies:
        print("error: no dataset could be studied", file=sys.stderr)
        return 1
    if len(studies) > 1:
        print("\n== summary ==")
        print(format_table([
            {"dataset": s["dataset"], "n_images": s["n_images"], "best_layer": s["best"]["layer"],
             "accuracy": s["best"]["accuracy_mean"],
             "shift": s["advice"]["similarity_score"] if s["advice"] else "",
             "agrees": s["advice"]["agrees"] if s["advice"] else "", "seconds": s["seconds"]}
            for s in studies
        ]))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
