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


CV_COLUMNS = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std", "balanced_accuracy", "fit_time"]


def demo(*, model: str = "efficientnet_lite0", per_class: int | None = None, cv: int = 5, out=print) -> list[dict]:
    """The main job: digits through a backbone, every stage, logistic regression per layer."""
    from featx.compare import best_row, compare_layers
    from featx.images import open_source

    start = time.perf_counter()
    out(f"Layers of {model}:")
    out(format_table(layer_rows(model)))
    source = open_source("digits", per_class=per_class)
    out(
        f"\nscikit-learn's digits: {len(source)} images of {source.n_classes} classes (8x8 pixels, unlike "
        f"ImageNet). Features of every stage, then {cv}-fold cross-validated logistic regression per layer …"
    )
    rows = compare_layers(source, backbones=model, layers="all", poolings="avg", heads="logreg", cv=cv)
    out(format_table(rows, CV_COLUMNS))
    best = best_row(rows)
    out(
        f"\nbest layer: {best['layer']} ({best['pooling']} pooling, {best['dim']} features): "
        f"accuracy {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f}"
    )
    out(f"total time: {time.perf_counter() - start:.1f} s (run it again: the features come from the store)")
    return rows


def cmd_demo(args) -> int:
    demo(model=args.model, per_class=args.per_class)
    return 0


@contextlib.contextmanager
def _interruptible():
    """SIGINT and SIGTERM stop a run the same way; yields the ``stop`` check for featx.extract.

    The handler raises KeyboardInterrupt at once, and also records the signal: if the exception
    lands where Python ignores it (a finaliser), the run still stops at the next batch.
    """
    received = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


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
        "tta": None if args.tta == "none" else args.tta,
    }


def _engine(args):
    """``--engine``: "local", or a RayEngine from --address, --workers (actors) and --gpus-per-worker."""
    if args.engine == "local":
        for option, value in (("--address", args.address), ("--gpus-per-worker", args.gpus_per_worker),
                              ("--cpus-per-worker", args.cpus_per_worker)):
            if value is not None:
                raise FeatxError(f"{option} is an option of the Ray engine: add --engine ray, or leave {option} out")
        return "local"
    from featx.distributed import RayEngine, require_ray

    require_ray()
    return RayEngine(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker or 0,
                     cpus_per_worker=args.cpus_per_worker or 1)


def _engine_kwargs(args) -> dict:
    """Extraction options with the engine; with Ray, --workers counts actors, not decoding processes."""
    kwargs = _extraction_kwargs(args)
    engine = _engine(args)
    if engine != "local":
        kwargs["num_workers"] = "auto"
    return {**kwargs, "engine": engine}


def cmd_extract(args) -> int:
    from featx.extraction import extract

    shard = None
    if args.shard is not None:
        from featx.shards import parse_shard

        shard = parse_shard(args.shard)
    kwargs = _engine_kwargs(args)
    source = _open_data(args)
    for path, reason in source.problems:
        print(f"featx: warning: {path}: {reason}", file=sys.stderr)
    with _interruptible() as stop:
        try:
            result = extract(source, layers=args.layers, pooling=args.pool, stop=stop, shard=shard,
                             decoder=args.decoder, compile=args.compile, runtime=args.runtime, **kwargs)
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
        _print_json(report)
    else:
        print(f"{path}: {'ok' if report['ok'] else 'PROBLEMS'}")
        for problem in report["problems"]:
            print(f"  {problem}")
    return 0 if args.action != "verify" or report["ok"] else 1


def _cache_merge(args) -> int:
    from featx.shards import merge_stores

    if not args.store:
        raise FeatxError("'featx cache merge' needs the shard stores (files, or their folder) and -o OUT")
    if args.output is None:
        raise FeatxError("'featx cache merge' needs -o OUT: a folder (the store gets its canonical name) or a .h5 file")
    report = merge_stores(args.store, args.output)
    if args.json:
        _print_json(report)
    else:
        print(f"merged {len(report['shards'])} stores into {report['output']}: {report['n_keys']} images, "
              f"{report['rows_copied']} rows copied ({', '.join(report['entries'])})")
    return 0


def _source_problems(source) -> None:
    for path, reason in source.problems:
        print(f"featx: warning: {path}: {reason}", file=sys.stderr)


def _report_skipped(skipped) -> None:
    if skipped:
        print(f"featx: skipped {len(skipped)} images:", file=sys.stderr)
        for name, reason in skipped:
            print(f"  {name}: {reason}", file=sys.stderr)


def _auto_candidates(source, args, kwargs):
    """Every (layer, pooling) feature set of DATA for --layers auto, from one extraction."""
    from featx.compare import kept_labels
    from featx.extraction import extract

    result = extract(source, layers="all", pooling=args.pool, **kwargs)
    _report_skipped(result.skipped)
    candidates = {r.key: result[r.key] for r in result.requests}
    return candidates, kept_labels(result), result


def cmd_cv_auto(args, source, kwargs) -> int:
    from featx.compare import evaluate_auto

    candidates, y, result = _auto_candidates(source, args, kwargs)
    rows = []
    for head in [h for h in args.head.split(",") if h]:
        report = evaluate_auto(candidates, y, head=head, cv=args.cv, random_state=args.seed)
        layer, pooling = report["chosen"].split("/")
        rows.append({"model": args.model, "layer": "auto", "chosen_layer": layer, "pooling": pooling, "head": head,
                     "accuracy_mean": report["accuracy_mean"], "accuracy_std": report["accuracy_std"],
                     "balanced_accuracy": report["balanced_accuracy"], "chosen_per_fold": report["chosen_per_fold"],
                     "n_images": report["n_samples"], "cv": report["cv"], "fit_time": report["fit_time"]})
    if args.json:
        _print_json(rows)
        return 0
    print(format_table(rows, ["model", "layer", "chosen_layer", "pooling", "head", "accuracy_mean", "accuracy_std"]))
    for row in rows:
        print(f"{row['head']}: layer chosen by inner cross-validation in each outer fold: "
              f"{', '.join(row['chosen_per_fold'])} (accuracy includes that choice)")
    return 0


def cmd_cv(args) -> int:
    from featx.compare import best_row

    kwargs = _engine_kwargs(args)
    source = _open_data(args)
    _source_problems(source)
    with contextlib.ExitStack() as stack:
        if kwargs["engine"] != "local":
            from featx.distributed import joblib_on_ray

            # One Ray session: the extraction's actors, then every CV fold and grid search as Ray
            # tasks (joblib's n_jobs default becomes -1, all the cluster's CPUs, unless --jobs says).
            stack.enter_context(joblib_on_ray(args.address))
        if args.layers == "auto":
            return cmd_cv_auto(args, source, kwargs)
        rows = _compare_rows(args, source, kwargs, args.model)
    if args.json:
        _print_json(rows)
        return 0
    print(format_table(rows, CV_COLUMNS))
    best = best_row(rows)
    print(
        f"\nbest: {best['layer']} / {best['pooling']} / {best['head']}: accuracy {best['accuracy_mean']:.3f} "
        f"± {best['accuracy_std']:.3f} ({best['n_images']} images, {best['cv']}-fold)"
    )
    return 0


AUTO_COLUMNS = ["rank", "configuration", "dim", "accuracy_mean", "accuracy_std", "seconds", "extraction_seconds",
                "status"]


def cmd_fit_auto(args, source, kwargs) -> int:
    from featx.auto import auto_fit
    from featx.models import save_model

    kwargs = {k: v for k, v in kwargs.items() if k not in ("backbone", "tta")}

    def progress_line(row):
        print(f"featx: {row['configuration']}: accuracy {row['accuracy_mean']:.4f} ± {row['accuracy_std']:.4f} "
              f"({row['seconds']:.0f} s, {row['extraction_seconds']:.0f} s of it extracting)", file=sys.stderr)

    result = auto_fit(
        source,
        budget=args.budget,
        backbones=args.auto_models,
        feature_sets=args.auto_layers,
        ttas=args.auto_tta,
        heads=args.auto_heads,
        finetune=args.auto_finetune,
        finetune_epochs=args.auto_finetune_epochs,
        cv=args.cv or 5,
        random_state=args.seed,
        report=progress_line,
        **kwargs,
    )
    save_model(result.model, args.output)
    if args.json:
        _print_json({**result.to_json(), "output": args.output})
        return 0

    def shown(value, fmt):
        return "-" if value is None else format(value, fmt)

    rows = [{**row, "rank": shown(row["rank"], "d"), "dim": shown(row["dim"], "d"),
             "accuracy_mean": shown(row["accuracy_mean"], ".4f"), "accuracy_std": shown(row["accuracy_std"], ".4f"),
             "seconds": shown(row["seconds"], ".1f"), "extraction_seconds": shown(row["extraction_seconds"], ".1f")}
            for row in result.leaderboard]
    print(format_table(rows, AUTO_COLUMNS))
    if result.advice is not None:
        advice = result.advice
        print(f"\nadvisor: {advice['quadrant']} ({advice['images_per_class']:.0f} images per class, shift "
              f"{advice['similarity_score']:.2f}): fine-tuning candidates "
              + (f"from {', '.join(advice['finetune_from'])}" if advice["finetune_from"] else
                 "none (small data: heads on frozen features); --auto-finetune stage5 adds one"))
    best = result.best
    print(f"\nbest: {best['configuration']}: accuracy {best['accuracy_mean']:.4f} ± {best['accuracy_std']:.4f} "
          f"({best['cv']}-fold CV on {source.name} only)")
    print("extractions: " + ", ".join(f"{e['backbone']} {'maps' if e['maps'] else 'tta=' + e['tta']} {e['seconds']:.0f} s "
                                      f"({e['n_computed']} computed)" for e in result.extractions))
    print(f"search and refit: {result.seconds:.0f} s of a {result.budget:.0f} s budget")
    print(f"saved to {args.output}")
    return 0


def cmd_fit(args) -> int:
    from featx.models import fit_model, save_model

    source = _open_data(args)
    _source_problems(source)
    kwargs = _extraction_kwargs(args)
    if args.auto:
        return cmd_fit_auto(args, source, kwargs)
    if args.json:
        raise FeatxError("--json goes with --auto (the leaderboard); a plain 'featx fit' prints one line.")
    if args.cv is None:
        args.cv = 3
    if args.layers == "auto":
        from featx.compare import select_layer

        candidates, y, _ = _auto_candidates(source, args, kwargs)
        chosen, scores = select_layer(candidates, y, head=args.head, cv=args.cv, random_state=args.seed)
        print(f"--layers auto: chose {chosen} by {args.cv}-fold cross-validation "
              f"({', '.join(f'{k} {v:.3f}' for k, v in scores.items())})")
        args.layers, args.pool = chosen.split("/")
    model, result = fit_model(
        source,
        layer=args.layers,
        pooling=args.pool,
        head=args.head,
        inner_cv=args.cv,
        random_state=args.seed,
        **kwargs,
    )
    _report_skipped(result.skipped)
    save_model(model, args.output)
    print(f"{model.describe()}; chosen {model.info['chosen_params']}")
    print(f"saved to {args.output}")
    return 0


def cmd_predict(args) -> int:
    import csv

    from featx.images import open_source
    from featx.models import load_model, predict

    model = load_model(args.model_file)
    images = args.images[0] if len(args.images) == 1 else list(args.images)
    source = open_source(images, allow_outside_root=args.allow_outside_root)
    _source_problems(source)
    rows = predict(model, source)
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
    _report_skipped([(row["image"], row["error"]) for row in failed])
    return 0


def cmd_evaluate(args) -> int:
    from featx.models import evaluate_model, load_model

    model = load_model(args.model_file)
    source = _open_data(args)
    _source_problems(source)
    report = evaluate_model(model, source)
    if args.json:
        _print_json(report)
        return 0
    print(report["model"])
    print(
        f"held-out accuracy {report['accuracy']:.4f}, balanced accuracy {report['balanced_accuracy']:.4f}, "
        f"macro-F1 {report['macro_f1']:.4f} on {report['n_images']} images"
    )
    print(format_table([{"class": c, **v} for c, v in report["per_class"].items()]))
    _report_skipped([(s["image"], s["reason"]) for s in report["skipped"]])
    return 0


def cmd_finetune(args) -> int:
    from featx.finetuning import finetune
    from featx.models import save_model

    source = _open_data(args)
    _source_problems(source)

    def on_epoch(record) -> None:
        val = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.4f}"
        print(f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  val accuracy {val}  "
              f"lr {record['lr']:.2e}  {record['seconds']:.1f} s", flush=True)

    with _interruptible() as stop:
        try:
            model, report = finetune(
                source, backbone=args.model, from_layer=args.from_layer, weights=_weights(args.weights),
                epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
                head_lr=args.head_lr, weight_decay=args.weight_decay, schedule=args.schedule,
                label_smoothing=args.label_smoothing, flip=not args.no_flip, batchnorm=args.batchnorm,
                dropout=args.dropout, val_split=args.val_split, patience=args.patience, random_state=args.seed,
                store=args.cache if args.cache else True, extract_batch_size=args.extract_batch_size,
                device=args.device, precision=args.precision,
                num_workers=args.workers if args.workers is not None else "auto", on_error=args.on_error,
                on_epoch=None if args.json else on_epoch, stop=stop,
            )
        except KeyboardInterrupt:
            print("featx: interrupted: the frozen part's completed batches are kept in the store; run the same "
                  "command again to resume.", file=sys.stderr)
            return 130
    _report_skipped(report["skipped"])
    save_model(model, args.output)
    if args.json:
        _print_json({**report, "output": args.output})
        return 0
    val = report["val_accuracy"]
    print(f"frozen part: {report['n_computed']} images computed, {report['n_from_store']} from the store: "
          f"{report['frozen_seconds']:.1f} s (maps read in {report['read_seconds']:.1f} s)")
    print(f"training: {len(report['history'])} epochs"
          + (" (stopped early)" if report["stopped_early"] else "")
          + f", best epoch {report['best_epoch']}"
          + ("" if val is None else f", val accuracy {val:.4f}")
          + f": {report['train_seconds']:.1f} s")
    print(f"store: {report['store']}")
    print(f"{model.describe()}\nsaved to {args.output}")
    return 0


def _compare_rows(args, source, kwargs, backbones) -> list[dict]:
    """compare_layers with the options that 'featx cv' and 'featx compare' share."""
    from featx.compare import compare_layers

    kwargs = {k: v for k, v in kwargs.items() if k != "backbone"}
    return compare_layers(
        source,
        backbones=backbones,
        layers=args.layers,
        poolings=args.pool,
        heads=args.head,
        cv=args.cv,
        repeats=args.repeats,
        random_state=args.seed,
        n_jobs=args.jobs,
        finetune_from=getattr(args, "finetune_from", None),
        finetune_options={"epochs": args.finetune_epochs} if getattr(args, "finetune_from", None) else None,
        **kwargs,
    )


def cmd_compare(args) -> int:
    from featx.compare import best_row, write_comparison

    source = _open_data(args)
    _source_problems(source)
    rows = _compare_rows(args, source, _extraction_kwargs(args), args.models)
    paths = write_comparison(rows, args.out, title=source.name)
    columns = ["model", "layer", "pooling", "head", "dim", "accuracy_mean", "accuracy_std", "extraction_time", "fit_time"]
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows, columns))
        best = best_row(rows)
        print(f"\nbest: {best['model']} {best['layer']} / {best['pooling']} / {best['head']}: "
              f"accuracy {best['accuracy_mean']:.3f} ± {best['accuracy_std']:.3f}")
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_advise(args) -> int:
    from featx.advise import advise
    from featx.compare import compare_layers

    source = _open_data(args)
    _source_problems(source)
    comparison = None
    if args.measure:
        comparison = compare_layers(source, backbones=args.model, layers="all", poolings="avg", heads="logreg",
                                    cv=args.cv, random_state=args.seed, device=args.device)
    report = advise(source, backbone=args.model, device=args.device, comparison=comparison)
    if args.json:
        _print_json(report)
        return 0
    print(f"{report['data']}: {report['n_images']} images, {report['n_classes']} classes, "
          f"{report['images_per_class']:.0f} per class ({report['size']} data)")
    print(f"similarity to ImageNet: {report['similarity']} (shift {report['similarity_score']:.3f}; "
          f"below {report['threshold']} is similar)")
    print(f"quadrant: {report['quadrant']}")
    print(f"recommendation: {report['recommendation']}")
    if "measurement" in report:
        print(report["measurement"])
    return 0


def cmd_bench(args) -> int:
    from featx.bench import run_bench

    report = run_bench(args.folder, model=args.model, n=args.n, batch_size=args.batch_size, device=args.device,
                       compile=args.compile, runtime=args.runtime, out=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    if args.json:
        _print_json(report)
        return 0
    print(
        f"\n{report['n_images']} images, {report['model']} on {report['device']} ({report['precision']}, "
        f"{report['cpu_count']} cores):\n"
        f"  naive loop   {report['naive_images_per_s']:8.1f} images/s  (peak RSS {report['naive_peak_rss_mb']:.0f} MB)\n"
        f"  featx        {report['featx_images_per_s']:8.1f} images/s  (peak RSS {report['peak_rss_mb']:.0f} MB)\n"
        f"  model only   {report['model_only_images_per_s']:8.1f} images/s\n"
        + (
            f"  compiled     {report['model_only_compiled_images_per_s']:8.1f} images/s model only "
            f"(torch.compile took {report['compile_seconds']:.0f} s)\n"
            f"  featx, compiled {report['featx_compiled_images_per_s']:5.1f} images/s "
            f"(peak RSS {report['featx_compiled_peak_rss_mb']:.0f} MB; compiling took "
            f"{report['featx_compile_seconds']:.0f} s before)\n"
            if "compile_seconds" in report
            else ""
        )
        + (
            f"  featx, onnxruntime {report['onnx_images_per_s']:5.1f} images/s (peak RSS {report['onnx_peak_rss_mb']:.0f} "
            f"MB; export took {report['onnx_export_seconds']:.0f} s before); model only with onnxruntime "
            f"{report['model_only_onnx_images_per_s']:.1f} images/s\n"
            if "onnx_images_per_s" in report
            else ""
        )
        + f"  decoder {report['decoder']}; "
        f"speedup vs naive {report['speedup_vs_naive']:.2f}x, "
        f"{100 * report['fraction_of_model_limit']:.0f}% of the model-only limit"
        + (
            f"; compiled: {report['compiled_speedup_vs_naive']:.2f}x, "
            f"{100 * report['compiled_fraction_of_compiled_limit']:.0f}% of the compiled limit"
            if "compile_seconds" in report
            else ""
        )
        + (
            f"; onnxruntime: {report['onnx_speedup_vs_naive']:.2f}x, "
            f"{100 * report['onnx_fraction_of_onnx_limit']:.0f}% of its model-only limit"
            if "onnx_images_per_s" in report
            else ""
        )
    )
    return 0


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
        "--layers",
        default=layers_default,
        help="comma-separated aliases or nodes, all, or (cv, fit) auto: chosen by inner cross-validation "
        "among all layers and the --pool values; join layers with + for one concatenated feature set "
        "(stage4+pre_logits, or stage4/spp+pre_logits/avg with a pooling per layer) (default: %(default)s)",
    )
    g.add_argument("--pool", default="avg", help="comma-separated: avg, max, avgmax, spp (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--precision", default="auto", help="auto, fp32, bf16 or fp16 (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: one per core); with --engine ray: Ray actors")
    g.add_argument(
        "--on-error", choices=("skip", "raise"), default="skip", help="bad images: skip and report, or stop"
    )
    g.add_argument("--cache", default=None, metavar="DIR", help="feature store folder (default: $FEATX_CACHE or ./cache)")
    g.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="storage precision of a new store")
    g.add_argument(
        "--tta",
        choices=("none", "hflip"),
        default="none",
        help="hflip: average every feature over the image and its horizontal mirror (one forward pass on both; "
        "twice the network work; a store of its own) (default: %(default)s)",
    )




def _add_engine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (see docs/scaling.md)")
    g.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: this process; ray: a pool of Ray actors, each holding the backbone, with --workers N "
        "actors (default: one per cluster CPU, or per GPU share); needs pip install \"featx[ray]\"",
    )
    g.add_argument("--address", default=None, help="Ray cluster address, e.g. auto or ray://head:10001 "
                   "(default: start a local Ray)")
    g.add_argument("--gpus-per-worker", type=float, default=None, metavar="G",
                   help="GPUs per Ray actor (fractions share a GPU; default: 0, CPU actors)")
    g.add_argument("--cpus-per-worker", type=float, default=None, metavar="C",
                   help="CPUs per Ray actor; from 2 on, one decoding process per CPU (default: 1). "
                   "GPU actors are limited by decoding: give them most of a node's cores")


def _add_head_options(p: argparse.ArgumentParser, *, several: bool) -> None:
    g = p.add_argument_group("head")
    g.add_argument(
        "--head",
        default="logreg",
        help=("comma-separated: " if several else "") + "logreg, linear-svm or rbf-svm (default: %(default)s)",
    )
    if several:
        g.add_argument("--cv", type=int, default=5, help="cross-validation folds (default: %(default)s)")
    else:
        g.add_argument("--cv", type=int, default=None,
                       help="cross-validation folds (default: 3 for tuning, 5 to score --auto candidates)")
    if several:
        g.add_argument("--repeats", type=int, default=1, help="repetitions of the outer folds (default: %(default)s)")
        g.add_argument("--jobs", type=int, default=None, help="outer folds in parallel (default: 1; -1: all cores)")


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
        help="the main job: digits through efficientnet_lite0, every layer cross-validated",
        description="List the default backbone's layers, extract every stage of scikit-learn's digits "
        "and cross-validate a logistic regression per layer; prints the table and the best layer.",
        epilog="Example: featx demo",
    )
    p.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--per-class", type=int, default=None, help="digits per class (default: all)")
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
        epilog="Examples: featx extract digits --model efficientnet_lite0 --layers stage3,pre_logits; "
        "featx extract data/train --shard 0/4 (then 1/4, 2/4, 3/4 anywhere, and 'featx cache merge cache -o cache'); "
        "featx extract data/train --engine ray --address auto --gpus-per-worker 1",
    )
    _add_data_options(p)
    _add_extraction_options(p)
    p.add_argument(
        "--decoder", choices=("auto", "pil", "torch"), default="auto",
        help="where JPEGs are decoded: auto (on the GPU with a CUDA device, else PIL in the decoding "
        "processes), pil, or torch (torchvision.io on the device) (default: %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--compile", action="store_true",
        help="run the network under torch.compile (CPU or CUDA): compiles once (seconds to minutes), then "
        "faster; pays on large folders ('featx bench --compile' measures both). Same features up to rounding.",
    )  # fmt: skip
    p.add_argument(
        "--runtime", choices=("torch", "onnxruntime"), default="torch",
        help="onnxruntime: export the network to ONNX once and run it with ONNX Runtime on the CPU "
        '(pip install "featx[onnx]"); same features up to rounding (default: %(default)s)',
    )  # fmt: skip
    _add_engine_options(p)
    p.add_argument(
        "--shard",
        default=None,
        metavar="I/N",
        help="extract only part I of N (numbered from 0: 0/N ... N-1/N), chosen by content key, into a shard "
        "store beside the main store; skips what the main store or any shard holds. Merge with 'featx cache merge'",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a summary")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser(
        "cv",
        help="cross-validate heads on layers of a labelled data set",
        description="Extract what the store lacks, then evaluate each (layer, pooling, head) by nested, "
        "stratified cross-validation and print a table.",
        epilog="Example: featx cv fashion-mnist --per-class 100 --layers all --pool avg --head logreg --json; "
        "with --engine ray, extraction runs on Ray actors and the folds and grid searches on Ray's joblib backend",
    )
    _add_data_options(p)
    _add_extraction_options(p, layers_default="all")
    _add_engine_options(p)
    _add_head_options(p, several=True)
    p.add_argument("--json", action="store_true", help="print a JSON list of rows")
    p.set_defaults(func=cmd_cv)

    p = sub.add_parser(
        "compare",
        help="compare layers, poolings and backbones: table, CSV, JSON and plot",
        description="Cross-validate a head on every layer (and pooling, head, backbone) of DATA; each image "
        "goes through each backbone once. Writes DIR/compare.csv, compare.json and compare.png (accuracy "
        "against depth with error bars).",
        epilog="Example: featx compare fashion-mnist --per-class 100 --models efficientnet_lite0,efficientnet_lite2 "
        "--layers all --pool avg,spp --out results",
    )
    _add_data_options(p)
    _add_extraction_options(p, layers_default="all")
    p.add_argument(
        "--models",
        default="efficientnet_lite0",
        help="comma-separated backbones; join with + to concatenate their features, e.g. "
        "efficientnet_lite0+efficientnet_lite2 (default: %(default)s)",
    )
    _add_head_options(p, several=True)
    g = p.add_argument_group("fine-tuned rows")
    g.add_argument("--finetune-from", default=None, metavar="LAYERS",
                   help="also fine-tune from these layers (comma-separated) on the same outer folds: one training "
                   "per fold, on the cached maps (see 'featx finetune')")
    g.add_argument("--finetune-epochs", type=int, default=30, help="at most this many epochs per fold (default: %(default)s)")
    p.add_argument("--out", default="compare", metavar="DIR", help="folder for the CSV, JSON and PNG (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "advise",
        help="which layer or strategy fits your data (size x similarity to ImageNet)",
        description="Count images per class, measure how far the images' statistics are from ImageNet's, "
        "place the data in the classic transfer-learning table and say what to do.",
        epilog="Example: featx advise data/train --measure",
    )
    _add_data_options(p)
    p.add_argument("--model", default="efficientnet_lite0", help="backbone to advise for (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument("--measure", action="store_true", help="also cross-validate every layer and compare with the table")
    p.add_argument("--cv", type=int, default=5, help="folds for --measure (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_advise)

    p = sub.add_parser(
        "fit",
        help="tune and fit a head on all of DATA, save the model",
        description="Tune the head's hyper-parameters by cross-validation on DATA, refit on all of it, and "
        "save one model file (the head, the extraction configuration, the class names, the featx version). "
        "Model files are pickles: share and load them only as you would code.",
        epilog="Examples: featx fit data/train --layers stage4 --pool spp --head logreg -o model.joblib; "
        "featx fit data/train --auto --budget 15m --cache /tmp/featx-cache -o model.joblib",
    )
    _add_data_options(p)
    _add_extraction_options(p)
    _add_head_options(p, several=False)
    g = p.add_argument_group(
        "auto", "--auto searches backbones, feature sets, flip averaging, heads and (where the advisor says so) "
        "partial fine-tuning by stratified K-fold CV on DATA only (never on held-out data), cheapest first, within "
        "--budget; prints the leaderboard and saves the winner, refitted on all of DATA. --model, --layers, --pool, "
        "--head and --tta are then ignored."
    )
    g.add_argument("--auto", action="store_true", help="search for the best configuration within --budget")
    g.add_argument("--budget", default="10m", help="time for the search and the refit: 90s, 15m, 1h (default: %(default)s)")
    g.add_argument("--auto-models", default=",".join(_auto_default("DEFAULT_BACKBONES")),
                   help="backbones to try (default: %(default)s)")
    g.add_argument("--auto-layers", default=",".join(_auto_default("DEFAULT_FEATURE_SETS")),
                   help="feature sets to try, in --layers syntax (default: %(default)s)")
    g.add_argument("--auto-tta", default=",".join(_auto_default("DEFAULT_TTAS")), help="tta values to try (default: %(default)s)")
    g.add_argument("--auto-heads", default=",".join(_auto_default("DEFAULT_HEADS")),
                   help="heads to try; the first is tried on every feature set, the others on the best ones "
                   "(default: %(default)s)")
    g.add_argument("--auto-finetune", default="advise",
                   help="fine-tuning candidates: advise (the layers 'featx advise' names for the data: none for small "
                   "data), none, or layers to fine-tune from, e.g. stage5,stage4 (default: %(default)s)")
    g.add_argument("--auto-finetune-epochs", type=int, default=10,
                   help="most epochs of a fine-tuning candidate; early stopping, patience 3 (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="with --auto: print the leaderboard and the winner as JSON")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser(
        "finetune",
        help="fine-tune the top blocks of the backbone on cached maps, save the model",
        description="Freeze the backbone up to --from, keep that layer's output maps in the feature store "
        "(computed once per image, float16), and train the blocks after it plus a new linear head on them, "
        "with early stopping on a stratified held-out split of DATA. Prints one line per epoch and the time "
        "spent in the frozen part (about 0 s when every map is in the store). The model file works with "
        "'featx predict' and 'featx evaluate' like one from 'featx fit'.",
        epilog="Example: featx finetune fashion-mnist --per-class 500 --from stage4 --epochs 20 -o ft.joblib",
    )
    _add_data_options(p)
    g = p.add_argument_group("backbone and frozen part")
    g.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s; see 'featx models')")
    g.add_argument("--weights", default="DEFAULT", help="DEFAULT, a weights name, a state-dict path, or none")
    g.add_argument("--from", dest="from_layer", default="stage4",
                   help="last frozen layer: the blocks after it are trained (default: %(default)s)")
    g.add_argument("--extract-batch-size", type=int, default=32, help="images per frozen forward pass (default: %(default)s)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: %(default)s)")
    g.add_argument("--precision", default="auto", help="of the frozen part: auto, fp32, bf16 or fp16 (default: %(default)s)")
    g.add_argument("--workers", type=int, default=None, help="decoding processes (default: one per core)")
    g.add_argument("--on-error", choices=("skip", "raise"), default="skip", help="bad images: skip and report, or stop")
    g.add_argument("--cache", default=None, metavar="DIR", help="feature store folder (default: $FEATX_CACHE or ./cache)")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=30, help="at most this many epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=64, help="maps per training step (default: %(default)s)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw", help="AdamW or SGD with momentum (default: %(default)s)")
    g.add_argument("--lr", type=float, default=3e-4, help="learning rate of the pretrained blocks (default: %(default)s)")
    g.add_argument("--head-lr", type=float, default=None, help="learning rate of the new head (default: 10 x --lr)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="(default: %(default)s)")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine", help="learning-rate decay (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=0.1, help="(default: %(default)s)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips of the cached maps")
    g.add_argument("--batchnorm", choices=("train", "frozen"), default="train",
                   help="BatchNorm in the trained blocks: batch statistics or ImageNet's (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=0.2, help="before the new head (default: %(default)s)")
    g.add_argument("--val-split", type=float, default=0.1, help="held-out fraction for early stopping (default: %(default)s)")
    g.add_argument("--patience", type=int, default=5, help="epochs without improvement before stopping (default: %(default)s)")
    p.add_argument("-o", "--output", required=True, help="model file to write")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of progress lines")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser(
        "predict",
        help="predict labels of images with a saved model",
        description="Write image, predicted label and class probabilities as CSV, reusing the feature store.",
        epilog="Example: featx predict model.joblib data/new -o predictions.csv",
    )
    p.add_argument("model_file", metavar="MODEL", help="a model file written by 'featx fit'")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="image files, a folder, or a CSV with a path column")
    p.add_argument("-o", "--output", default=None, help="CSV file to write (default: standard output)")
    p.add_argument("--allow-outside-root", action="store_true", help="accept CSV paths outside the CSV's folder")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "evaluate",
        help="held-out accuracy of a saved model on labelled data",
        description="Score a saved model on a labelled folder, CSV or built-in dataset.",
        epilog="Example: featx fit data/train -o m.joblib && featx evaluate m.joblib data/val",
    )
    p.add_argument("model_file", metavar="MODEL", help="a model file written by 'featx fit'")
    _add_data_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "bench",
        help="benchmark extraction against the naive loop and the model-only limit",
        description="On the same images (DIR, or N generated 500x375 JPEGs), measure in one run the naive "
        "tutorial loop, featx's extraction into a fresh store, and the model's forward pass alone; print "
        "images/s, the ratios and peak memory.",
        epilog="Example: featx bench --n 512 --json",
    )
    p.add_argument("folder", nargs="?", default=None, metavar="DIR", help="a folder of class sub-folders of images")
    p.add_argument("--model", default="efficientnet_lite0", help="backbone (default: %(default)s)")
    p.add_argument("--n", type=int, default=256, help="images to generate without DIR (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: %(default)s)")
    p.add_argument(
        "--compile", action="store_true",
        help="also measure featx and the model-only limit under torch.compile (compile time reported apart)",
    )  # fmt: skip
    p.add_argument(
        "--runtime", choices=("torch", "onnxruntime"), default="torch",
        help="onnxruntime: also measure featx and the model-only limit with ONNX Runtime (default: %(default)s)",
    )  # fmt: skip
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "cache",
        help="list, inspect, verify, merge or remove feature stores",
        description="Manage the feature stores in the cache folder. 'merge' copies shard stores (of one "
        "configuration; others are refused) into one ordinary store.",
        epilog="Example: featx cache list; featx cache verify cache/efficientnet_lite0-0123456789ab.h5; "
        "featx cache merge cache/*.shard-*.h5 -o cache",
    )
    p.add_argument("action", choices=("list", "info", "verify", "rm", "merge"))
    p.add_argument("store", nargs="*", metavar="STORE",
                   help="a store file (info, verify, rm); shard store files or their folder (merge)")
    p.add_argument("-o", "--output", default=None, metavar="OUT",
                   help="merge: a folder (the store gets its canonical name, found by --cache) or a .h5 file")
    p.add_argument("--cache", default=None, metavar="DIR", help="folder to list (default: $FEATX_CACHE or ./cache)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_cache)
    return parser


def _auto_default(name: str):
    from featx import auto

    return getattr(auto, name)


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
