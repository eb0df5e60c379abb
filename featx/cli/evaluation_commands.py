"""``featx cv`` and ``featx compare``: cross-validated heads on the layers of a labelled data set.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
"""

from __future__ import annotations

import argparse
import contextlib

from featx.cli.arguments import (
    EXTRACTION,
    add_data_options,
    add_engine_options,
    add_extraction_options,
    add_head_options,
    add_json,
    check_output_file,
    extract_options,
    open_data,
)
from featx.cli.output import format_selection, format_table, print_json, report_skipped
from featx.compare import best_row, compare_layers, write_comparison
from featx.selection import auto_poolings, evaluate_auto, feature_sets, select_layer
from featx.distributed import joblib_on_ray
from featx.extraction import extract, kept_labels, require_kept
from featx.options import ExtractOptions, FinetuneOptions
from featx.paths import split_names

__all__ = ["COMMANDS", "CV_COLUMNS", "auto_candidates", "compare_rows", "extraction_line"]

CV_COLUMNS = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std", "balanced_accuracy", "fit_time"]


def auto_candidates(source, options: ExtractOptions, data: str | None = None):
    """Every (layer, pooling) feature set of DATA for --layers auto, from one extraction."""
    result = extract(source, options.replace(layers="all", pooling=auto_poolings(options.pooling)))
    report_skipped(result.skipped, len(result.keys), data=data)
    require_kept(result, "cross-validate")
    backbone = options.backbone if isinstance(options.backbone, str) else options.backbone.name
    candidates = feature_sets(result, backbone)
    return candidates, kept_labels(result), result


def compare_rows(args, source, options: ExtractOptions, backbones, *, on_extraction=None, **finetune) -> list[dict]:
    """compare_layers with the options that 'featx cv' and 'featx compare' share."""
    return compare_layers(source, options, backbones=backbones, layers=args.layers, poolings=args.pool,
                          heads=args.head, cv=args.cv, repeats=args.repeats, random_state=args.seed, n_jobs=args.jobs,
                          on_skipped=lambda skipped, n: report_skipped(skipped, n, data=args.data),
                          on_extraction=on_extraction, **finetune)


def extraction_line(extractions: list[dict]) -> str:
    """What 'featx compare' says of its extractions: each backbone's time once, not on every row.

    Examples
    --------
    >>> extraction_line([{"model": "a", "features": "pooled", "seconds": 12.3, "n_computed": 40, "n_images": 50},
    ...                  {"model": "b", "features": "pooled", "seconds": 0.2, "n_computed": 0, "n_images": 50}])
    'extraction (all layers of a backbone in one pass): a 12.3 s (40 of 50 images computed), b 0.2 s (all 50 from the store)'
    """
    parts = []
    for e in extractions:
        what = e["model"] + ("" if e["features"] == "pooled" else f" {e['features']}")
        done = (f"all {e['n_images']} from the store" if not e["n_computed"]
                else f"{e['n_computed']} of {e['n_images']} images computed")
        parts.append(f"{what} {e['seconds']:.1f} s ({done})")
    return "extraction (all layers of a backbone in one pass): " + ", ".join(parts)


def cmd_cv_auto(args, source, options: ExtractOptions) -> int:
    candidates, y, result = auto_candidates(source, options, args.data)
    rows, selections = [], []
    for head in split_names(args.head):
        selection = select_layer(candidates, y, head=head, cv=args.cv, random_state=args.seed)
        report = evaluate_auto(candidates, y, head=head, cv=args.cv, random_state=args.seed,
                               progress=options.progress)
        layer, pooling = selection.chosen.split("/")
        selections.append(selection)
        rows.append({"model": args.model, "layer": "auto", "chosen_layer": layer, "pooling": pooling, "head": head,
                     "accuracy_mean": report["accuracy_mean"], "accuracy_std": report["accuracy_std"],
                     "balanced_accuracy": report["balanced_accuracy"], "chosen_per_fold": report["chosen_per_fold"],
                     "n_images": report["n_samples"], "cv": report["cv"], "fit_time": report["fit_time"],
                     "selection": selection.to_dict()})
    if args.json:
        print_json(rows)
        return 0
    for row, selection in zip(rows, selections):
        print(f"{row['head']}: {selection.scored_by()}, on all {row['n_images']} images:")
        print(format_selection(selection))
        print()
    print(format_table(rows, ["model", "layer", "chosen_layer", "pooling", "head", "accuracy_mean", "accuracy_std"]))
    for row in rows:
        print(f"{row['head']}: accuracy_mean is the nested {row['cv']}-fold estimate of the whole procedure (choose "
              f"the feature set by the same rule on each training part, tune and fit the head, score the held-out "
              f"part); chosen per fold: {', '.join(row['chosen_per_fold'])}. --layers all shows every layer's own row.")
    return 0


def cmd_cv(args) -> int:
    """cross-validate heads on layers of a labelled data set

    Extract what the store lacks, then evaluate each (layer, pooling, head) by nested, stratified
    cross-validation and print a table.

    Example: featx cv fashion-mnist --per-class 100 --layers all --pool avg --head logreg --json;
    with --engine ray, extraction runs on Ray actors and the folds and grid searches on Ray's
    joblib backend
    """
    options = extract_options(args)
    source = open_data(args, cv=args.cv)
    with contextlib.ExitStack() as stack:
        if options.engine != "local":
            # One Ray session: the extraction's actors, then every CV fold and grid search as Ray
            # tasks (joblib's n_jobs default becomes -1, all the cluster's CPUs, unless --jobs says).
            stack.enter_context(joblib_on_ray(args.address))
        if args.layers == "auto":
            return cmd_cv_auto(args, source, options)
        rows = compare_rows(args, source, options, args.model)
    if args.json:
        print_json(rows)
        return 0
    print(format_table(rows, CV_COLUMNS))
    best = best_row(rows)
    print(
        f"\nbest: {best['layer']} / {best['pooling']} / {best['head']}: accuracy {best['accuracy_mean']:.3f} "
        f"± {best['accuracy_std']:.3f} ({best['n_images']} images, {best['cv']}-fold)"
    )
    return 0


def cv_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    add_extraction_options(p, layers="auto")
    add_engine_options(p)
    add_head_options(p, several=True)
    add_json(p, "print a JSON list of rows")


def cmd_compare(args) -> int:
    """compare layers, poolings and backbones: table, CSV, JSON and plot

    Cross-validate a head on every layer (and pooling, head, backbone) of DATA; each image goes
    through each backbone once (its time is said once, under the table; with --json: the
    "extractions" beside the "rows"). Writes DIR/compare.csv, compare.json and compare.png
    (accuracy against depth with error bars).

    Example: featx compare fashion-mnist --per-class 100 --models
    efficientnet_lite0,efficientnet_lite2 --layers all --pool avg,spp --out results
    """
    if args.report:
        check_output_file(args.report, "--report")
    source = open_data(args, cv=args.cv)
    training = FinetuneOptions(epochs=args.finetune_epochs) if args.finetune_from else None
    extractions: list[dict] = []
    rows = compare_rows(args, source, extract_options(args), args.models, finetune_from=args.finetune_from,
                        finetune_options=training, on_extraction=extractions.append)
    paths = write_comparison(rows, args.out, title=source.name)
    columns = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std", "fit_time"]
    if args.json:
        print_json({"rows": rows, "extractions": extractions})
    else:
        print(format_table(rows, columns))
        print(extraction_line(extractions))
        best = best_row(rows)
        print(f"\nbest: {best['model']} {best['layer']} / {best['pooling']} / {best['head']}: "
              f"accuracy {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.report:
        from featx.html import Page
        from featx.report import comparison_section  # scikit-learn: imported by the comparison already

        comparison_section(Page(f"featx compare: {source.name}"), rows, title=source.name).write(args.report)
        if not args.json:
            print(f"wrote {args.report}")
    return 0


def compare_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    # --models names the backbones compared: no --model beside it, which would be ignored (argparse reads
    # '--model X' as the abbreviation of '--models X').
    add_extraction_options(p, [field for field in EXTRACTION if field != "backbone"], layers="all")
    p.add_argument(
        "--models",
        default=ExtractOptions.backbone,
        help="comma-separated backbones; join with + to concatenate their features, e.g. "
        "efficientnet_lite0+efficientnet_lite2 (default: %(default)s)",
    )
    add_head_options(p, several=True)
    g = p.add_argument_group("fine-tuned rows")
    g.add_argument("--finetune-from", default=None, metavar="LAYERS",
                   help="also fine-tune from these layers (comma-separated) on the same outer folds: one training "
                   "per fold, on the cached maps (see 'featx finetune')")
    g.add_argument("--finetune-epochs", type=int, default=FinetuneOptions.epochs,
                   help="at most this many epochs per fold (default: %(default)s)")
    p.add_argument("--out", default="compare", metavar="DIR", help="folder for the CSV, JSON and PNG (default: %(default)s)")
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write the plot and the table as one self-contained HTML page")
    add_json(p, "print the rows as JSON")


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {"cv": (cmd_cv, cv_arguments), "compare": (cmd_compare, compare_arguments)}
