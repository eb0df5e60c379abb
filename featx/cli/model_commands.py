"""``featx fit``, ``featx predict``, ``featx evaluate`` and ``featx report``: a model file, written, used and scored.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
featx.models imports scikit-learn: it is imported only when one of these commands runs.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

from featx.auto import DEFAULT_BACKBONES, DEFAULT_FEATURE_SETS, DEFAULT_HEADS, DEFAULT_TTAS, auto_fit
from featx.cli.arguments import (
    add_allow_outside_root,
    add_data_options,
    add_extraction_options,
    add_head_options,
    add_json,
    add_model_output,
    check_output_file,
    extract_options,
    open_data,
)
from featx.cli.output import format_selection, format_table, print_json, report_skipped, warn_problems
from featx.selection import Selection
from featx.exceptions import FeatxError, ModelFileError
from featx.images import IMAGE_EXTENSIONS, open_source

__all__ = ["AUTO_COLUMNS", "COMMANDS"]

AUTO_COLUMNS = ["rank", "configuration", "dim", "accuracy_mean", "accuracy_std", "within_1se", "seconds",
                "extraction_seconds", "status"]

#: What the --auto search chooses itself: the options of these fields are ignored with --auto.
AUTO_CHOOSES = ("backbone", "layers", "pooling", "tta")


def cmd_fit_auto(args, source) -> int:
    from featx.models import save_model  # scikit-learn: only when the command runs

    def progress_line(row):
        print(f"featx: {row['configuration']}: accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} "
              f"({row['seconds']:.0f} s, {row['extraction_seconds']:.0f} s of it extracting)", file=sys.stderr)

    result = auto_fit(source, extract_options(args, leave_out=AUTO_CHOOSES), budget=args.budget,
                      backbones=args.auto_models, feature_sets=args.auto_layers, ttas=args.auto_tta,
                      heads=args.auto_heads, finetune=args.auto_finetune, finetune_epochs=args.auto_finetune_epochs,
                      cv=args.cv or 5, random_state=args.seed, report=progress_line,
                      on_skipped=lambda skipped, n: report_skipped(skipped, n, data=args.data))
    save_model(result.model, args.output)
    if args.json:
        print_json({**result.to_json(), "output": args.output})
        return 0

    def shown(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [{**row, "rank": shown(row["rank"], "d"), "dim": shown(row["dim"], "d"),
             "accuracy_mean": shown(row["accuracy_mean"], ".4f"), "accuracy_std": shown(row["accuracy_std"], ".4f"),
             "within_1se": ("yes, chosen" if row.get("chosen") else "yes") if row.get("within_1se") else
                           ("no" if row["rank"] is not None else "-"),
             "seconds": shown(row["seconds"], ".1f"), "extraction_seconds": shown(row["extraction_seconds"], ".1f")}
            for row in result.leaderboard]
    print(format_table(rows, AUTO_COLUMNS))
    if result.advice is not None:
        advice = result.advice
        print(f"\nadvisor: {advice['quadrant']} ({advice['images_per_class']:.0f} images per class, shift "
              f"{advice['similarity_score']:.2f}): fine-tuning candidates "
              + (f"from {', '.join(advice['finetune_from'])}" if advice["finetune_from"] else
                 "none (small data: heads on frozen features); --auto-finetune stage5 adds one"))
    best, selection = result.best, result.selection
    top = result.leaderboard[0]
    why = ("the highest mean" if best is top else
           f"the cheapest candidate within one standard error of the highest mean ({top['configuration']} "
           f"{top['accuracy_mean']:.4f}), since a small lead among {len(selection.table)} candidates is mostly luck")
    print(f"\nchosen: {best['configuration']}: accuracy {best['accuracy_mean']:.4f} ± {best['accuracy_std']:.4f} "
          f"({best['cv']}-fold CV on {source.name} only): {why}")
    print(f"estimate of the whole search: {selection.estimate:.4f} (the rule scored by a bootstrap over the folds; "
          f"the chosen candidate's own score is optimistic by about {selection.bias:+.4f})")
    print("extractions: " + ", ".join(f"{e['backbone']} {'maps' if e['maps'] else 'tta=' + e['tta']} {e['seconds']:.0f} s "
                                      f"({e['n_computed']} computed)" for e in result.extractions))
    print(f"search and refit: {result.seconds:.0f} s of a {result.budget:.0f} s budget")
    print(f"saved to {args.output}")
    return 0


def cmd_fit(args) -> int:
    """tune and fit a head on all of DATA, save the model

    Tune the head's hyper-parameters by cross-validation on DATA, refit on all of it, and save one
    model file (the head, the extraction configuration, the class names, the featx version).
    Model files are pickles: share and load them only as you would code.

    Examples: featx fit data/train --layers stage4 --pool spp --head logreg -o model.joblib; featx
    fit data/train --auto --budget 15m --cache /tmp/featx-cache -o model.joblib
    """
    from featx.models import fit_model, save_model  # scikit-learn: only when the command runs

    source = open_data(args, classified=True, cv=(args.cv or 5) if args.auto else None)
    if args.auto:
        return cmd_fit_auto(args, source)
    if args.json:
        raise FeatxError("--json goes with --auto (the leaderboard); a plain 'featx fit' prints one line.")
    inner_cv = 3 if args.cv is None else args.cv
    options = extract_options(args)
    # the skipped images are reported after the extraction, before the tuning
    model, _ = fit_model(source, options, head=args.head, inner_cv=inner_cv, random_state=args.seed,
                         on_skipped=lambda skipped, n: report_skipped(skipped, n, data=args.data))
    selection = model.info["selection"]
    if selection is not None:
        selection = Selection(**selection)
        print(f"--layers auto: {selection.scored_by()}:")
        print(format_selection(selection))
    save_model(model, args.output)
    print(f"{model.describe()}; chosen {model.info['chosen_params']}")
    print(_cv_score_line(model.info))
    print(f"saved to {args.output}")
    return 0


def _cv_score_line(info: dict) -> str:
    """What 'featx fit' says of the inner cross-validation behind the chosen parameters."""
    if info.get("cv_score") is None:
        return "not cross-validated (a class has a single image): the defaults were fitted, with no score"
    return f"inner {info['inner_cv']}-fold CV accuracy {info['cv_score']:.4f} for the chosen parameters"


def fit_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    add_extraction_options(p, layers="auto")
    add_head_options(p, several=False)
    g = p.add_argument_group(
        "auto", "--auto searches backbones, feature sets, flip averaging, heads and (where the advisor says so) "
        "partial fine-tuning by stratified K-fold CV on DATA only (never on held-out data), cheapest first, within "
        "--budget; prints the leaderboard and saves the winner, refitted on all of DATA. --model, --layers, --pool, "
        "--head and --tta are then ignored."
    )
    g.add_argument("--auto", action="store_true", help="search for the best configuration within --budget")
    g.add_argument("--budget", default="10m", help="time for the search and the refit: 90s, 15m, 1h (default: %(default)s)")
    g.add_argument("--auto-models", default=",".join(DEFAULT_BACKBONES), help="backbones to try (default: %(default)s)")
    g.add_argument("--auto-layers", default=",".join(DEFAULT_FEATURE_SETS),
                   help="feature sets to try, in --layers syntax (default: %(default)s)")
    g.add_argument("--auto-tta", default=",".join(DEFAULT_TTAS), help="tta values to try (default: %(default)s)")
    g.add_argument("--auto-heads", default=",".join(DEFAULT_HEADS),
                   help="heads to try; the first is tried on every feature set, the others on the best ones "
                   "(default: %(default)s)")
    g.add_argument("--auto-finetune", default="advise",
                   help="fine-tuning candidates: advise (the layers 'featx advise' names for the data: none for small "
                   "data), none, or layers to fine-tune from, e.g. stage5,stage4 (default: %(default)s)")
    g.add_argument("--auto-finetune-epochs", type=int, default=10,
                   help="most epochs of a fine-tuning candidate; early stopping, patience 3 (default: %(default)s)")
    add_json(g, "with --auto: print the leaderboard and the winner as JSON")
    add_model_output(p)


#: Files that are data, never a model file: given as MODEL, the arguments are likely swapped.
_DATA_SUFFIXES = (*IMAGE_EXTENSIONS, ".csv", ".tsv", ".txt")


def _load_model_argument(path: str, command: str, data_metavar: str, data: list[str]):
    """The model in file ``path`` (argument MODEL of ``featx command``).

    When MODEL is a folder or a data file, the error also gives the order of the arguments, and
    the swapped command when the first of ``data`` is a featx model file.
    """
    from featx.models import FORMAT, load_model  # scikit-learn: only when the command runs

    try:
        return load_model(path)
    except ModelFileError as exc:
        if not (os.path.isdir(path) or path.lower().endswith(_DATA_SUFFIXES)):
            raise
        swapped = len(data) == 1 and _starts_with(data[0], f"{FORMAT} sha256=".encode("ascii"))
        hint = f"The order is 'featx {command} MODEL {data_metavar}', the model file first" + (
            f": did you mean 'featx {command} {data[0]} {path}'?" if swapped else ".")
        raise ModelFileError(f"{exc} {hint}") from exc


def _starts_with(path: str, prefix: bytes) -> bool:
    """Whether ``path`` is a readable file that starts with ``prefix``."""
    try:
        with open(path, "rb") as handle:
            return handle.read(len(prefix)) == prefix
    except OSError:
        return False


def cmd_predict(args) -> int:
    """predict labels of images with a saved model

    Write image, predicted label and class probabilities as CSV, reusing the feature store.

    Example: featx predict model.joblib data/new -o predictions.csv
    """
    from featx.models import predict  # scikit-learn: only when the command runs

    model = _load_model_argument(args.model_file, "predict", "IMAGES", args.images)
    images = args.images[0] if len(args.images) == 1 else list(args.images)
    source = open_source(images, allow_outside_root=args.allow_outside_root)
    warn_problems(source)
    rows = predict(model, source, store=args.cache, max_pixels=args.max_pixels)
    columns = ["image", "label", "error", *(f"p_{c}" for c in model.classes)]
    handle = open(args.output, "w", newline="") if args.output else sys.stdout
    try:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    finally:
        if args.output:
            handle.close()
    failed = [row for row in rows if row["error"]]
    if args.output:
        print(f"{len(rows) - len(failed)} predictions written to {args.output}", file=sys.stderr)
    report_skipped([(row["image"], row["error"]) for row in failed], len(rows),
                   data=images if isinstance(images, str) else None)
    return 0


def _add_model_file(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_file", metavar="MODEL", help="a model file written by 'featx fit'")


def predict_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_file(p)
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files, a folder, or a CSV with a path column")
    p.add_argument("-o", "--output", default=None, help="CSV file to write (default: standard output)")
    add_allow_outside_root(p)
    _add_cache(p)
    add_extraction_options(p, ("max_pixels",), title=None)


def _add_cache(p: argparse.ArgumentParser) -> None:
    """``--cache DIR`` of 'featx predict' and 'featx evaluate': None keeps the model's own cache setting."""
    add_extraction_options(p, ("store",), title=None, changes={"store": {
        "help": "feature store folder for this run's features (default: the one the model was fitted with: "
        "its --cache, else $FEATX_CACHE or ./cache)"}})


def cmd_evaluate(args) -> int:
    """held-out accuracy of a saved model on labelled data

    Score a saved model on a labelled folder, CSV or built-in dataset.

    Example: featx fit data/train -o m.joblib && featx evaluate m.joblib data/val
    """
    from featx.models import evaluate_model  # scikit-learn: only when the command runs
    from featx.report import accuracy_line, model_report

    if args.report:
        check_output_file(args.report, "--report")
    model = _load_model_argument(args.model_file, "evaluate", "DATA", [args.data])
    source = open_data(args, labelled=True)
    if args.report:
        written = model_report(model, source, store=args.cache, max_pixels=args.max_pixels)
        report = written.evaluation
        written.write(args.report)
    else:
        report = evaluate_model(model, source, store=args.cache, max_pixels=args.max_pixels)
    report_skipped(report["skipped"], report["n_images"] + len(report["skipped"]), data=args.data)
    if args.json:
        print_json({k: v for k, v in report.items() if k != "predictions"})
        return 0
    print(report["model"])
    print(accuracy_line(report))
    print(format_table([{"class": c, **v} for c, v in report["per_class"].items()]))
    if args.report:
        print(f"wrote {args.report}")
    return 0


def cmd_report(args) -> int:
    """an HTML report of a saved model on labelled data: scores and the images it gets wrong

    Score a saved model on a labelled folder, CSV or built-in dataset and write one self-contained
    HTML file (images embedded as thumbnails; no network, no server): accuracy figures, the
    confusion matrix, precision and recall per class, and for each confusion (true -> predicted)
    the misclassified images with their true and predicted labels and probabilities.

    Example: featx fit data/train -o m.joblib && featx report m.joblib data/val -o report.html
    """
    from featx.report import accuracy_line, model_report  # scikit-learn: only when the command runs

    check_output_file(args.output, "-o")
    model = _load_model_argument(args.model_file, "report", "DATA", [args.data])
    source = open_data(args, labelled=True)
    report = model_report(model, source, store=args.cache, max_pixels=args.max_pixels,
                          per_confusion=args.per_confusion, max_confusions=args.max_confusions,
                          thumbnail_size=args.thumbnail_size)
    evaluation = report.evaluation
    report_skipped(evaluation["skipped"], evaluation["n_images"] + len(evaluation["skipped"]), data=args.data)
    report.write(args.output)
    print(evaluation["model"])
    print(accuracy_line(evaluation))
    print(format_table(report.confusions[:10], ["true", "predicted", "count", "share"]) if report.confusions
          else "no misclassified images")
    if len(report.confusions) > 10:
        print(f"... and {len(report.confusions) - 10} more confusions in the report")
    size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({len(report.misclassified)} misclassified images in {len(report.confusions)} "
          f"confusions; {size / 1024:.0f} KiB)")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def report_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_file(p)
    add_data_options(p)
    add_extraction_options(p, ("max_pixels",), title=None)
    _add_cache(p)
    g = p.add_argument_group("page")
    g.add_argument("-o", "--output", default="report.html", metavar="HTML",
                   help="HTML file to write (default: %(default)s)")
    g.add_argument("--per-confusion", type=_positive_int, default=48, metavar="N",
                   help="most thumbnails per confusion, the most confident mistakes first (default: %(default)s)")
    g.add_argument("--max-confusions", type=_positive_int, default=50, metavar="N",
                   help="most confusions shown with their images, the most frequent first; the table lists all "
                   "(default: %(default)s)")
    g.add_argument("--thumbnail-size", type=_positive_int, default=96, metavar="PX",
                   help="side of a thumbnail in pixels (default: %(default)s)")




def evaluate_arguments(p: argparse.ArgumentParser) -> None:
    _add_model_file(p)
    add_data_options(p)
    add_extraction_options(p, ("max_pixels",), title=None)
    add_json(p, "print JSON")
    _add_cache(p)
    p.add_argument("--report", default=None, metavar="HTML",
                   help="also write the HTML report of 'featx report' (scores and the misclassified images) here")


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {
    "fit": (cmd_fit, fit_arguments),
    "predict": (cmd_predict, predict_arguments),
    "evaluate": (cmd_evaluate, evaluate_arguments),
    "report": (cmd_report, report_arguments),
}
