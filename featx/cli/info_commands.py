"""``featx demo``, ``models``, ``layers``, ``advise`` and ``bench``: what there is, what to do, how fast.

A command's docstring is its ``--help``: the one-line summary, the description, the example.
featx.advise imports torch: it is imported only when 'featx advise' runs.
"""

from __future__ import annotations

import argparse
import sys
import time

from featx.backbones import list_backbones, list_layers
from featx.bench import run_bench, run_busy_bench
from featx.cli.arguments import (
    add_data_options,
    add_extraction_options,
    add_json,
    add_per_class,
    extract_options,
    open_data,
)
from featx.cli.evaluation_commands import CV_COLUMNS
from featx.cli.output import format_table, print_json, report_skipped
from featx.compare import best_row, compare_layers
from featx.images import open_source
from featx.options import CACHED, ExtractOptions
from featx.pooling import POOLINGS

__all__ = ["COMMANDS", "demo", "layer_rows"]


def layer_rows(model: str, *, all_nodes: bool = False) -> list[dict]:
    """Rows of ``featx layers``: alias, node, shape and pooled dimension per pooling."""
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


def demo(*, model: str = ExtractOptions.backbone, per_class: int | None = None, cv: int = 5, out=print) -> list[dict]:
    """The main job: digits through a backbone, every stage, logistic regression per layer."""
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
    """the main job: digits through efficientnet_lite0, every layer cross-validated

    List the default backbone's layers, extract every stage of scikit-learn's digits and
    cross-validate a logistic regression per layer; prints the table and the best layer.

    Example: featx demo
    """
    demo(model=args.model, per_class=args.per_class)
    return 0


def demo_arguments(p: argparse.ArgumentParser) -> None:
    add_extraction_options(p, ("backbone",), title=None)
    add_per_class(p, help="digits per class (default: all)", metavar=None)


def cmd_models(args) -> int:
    """list the backbones

    List the registered backbones, marking which work offline.

    Example: featx models --json
    """
    rows = list_backbones()
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows, ["name", "family", "offline", "input_size", "description"]))
        print("\nAny timm model works too, as timm:<name> (weights are downloaded by timm).")
    return 0


def models_arguments(p: argparse.ArgumentParser) -> None:
    add_json(p, "print JSON instead of a table")


def cmd_layers(args) -> int:
    """list a backbone's layers and dimensions

    List a backbone's layer aliases with their node, shape and pooled dimension per pooling,
    without downloading anything.

    Example: featx layers efficientnet_lite0 --all
    """
    rows = layer_rows(args.model, all_nodes=args.all)
    if args.json:
        print_json(rows)
    else:
        print(format_table(rows))
    return 0


def layers_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=ExtractOptions.backbone, help="backbone (default: %(default)s)")
    p.add_argument("--all", action="store_true", help="also list every raw node of the network")
    add_json(p, "print JSON instead of a table")


def cmd_advise(args) -> int:
    """which layer or strategy fits your data (size x similarity to ImageNet)

    Count images per class, measure how far the images' statistics are from ImageNet's, place the
    data in the classic transfer-learning table and say what to do.

    Example: featx advise data/train --measure
    """
    from featx.advise import advise  # torch: only when the command runs

    source = open_data(args, classified=True, cv=args.cv if args.measure else None)
    options = extract_options(args, CACHED)  # compare_layers' own defaults, with --model and --device
    comparison = None
    if args.measure:
        comparison = compare_layers(source, options, backbones=options.backbone, layers="all", poolings="avg",
                                    heads="logreg", cv=args.cv, random_state=args.seed)
    report = advise(source, backbone=options.backbone, device=options.device, comparison=comparison, data=args.data)
    report_skipped(report["skipped"], len(source), data=args.data)
    if args.json:
        print_json(report)
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


def advise_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    add_extraction_options(p, ("backbone", "device"), title=None,
                           changes={"backbone": {"help": "backbone to advise for (default: %(default)s)"}})
    p.add_argument("--measure", action="store_true", help="also cross-validate every layer and compare with the table")
    p.add_argument("--cv", type=int, default=5, help="folds for --measure (default: %(default)s)")
    add_json(p, "print JSON")


def cmd_bench(args) -> int:
    """benchmark extraction against the naive loop and the model-only limit

    On the same images (DIR, or N generated 500x375 JPEGs), measure in one run the naive tutorial
    loop, featx's extraction into a fresh store, the model's forward pass alone and featx's
    decoding alone; print images/s, the ratios, the loop's own limit (network and decoding
    sharing the cores), where an image's time goes, and peak memory.

    With --busy: featx's extraction at each thread setting while a second 'featx extract' of
    other images shares the cores; featx's default against its best setting.

    Example: featx bench --n 512 --json
    """
    if args.busy:
        return _bench_busy(args)
    report = run_bench(args.folder, extract_options(args), n=args.n,
                       out=(lambda line: print(line, file=sys.stderr)) if args.json else print)
    if args.json:
        print_json(report)
        return 0
    print(
        f"\n{report['n_images']} images, {report['model']} on {report['device']} ({report['precision']}, "
        f"{report['cpu_count']} cores):\n"
        f"  naive loop   {report['naive_images_per_s']:8.1f} images/s  (peak RSS {report['naive_peak_rss_mb']:.0f} MB)\n"
        f"  featx        {report['featx_images_per_s']:8.1f} images/s  (peak RSS {report['peak_rss_mb']:.0f} MB)\n"
        f"  model only   {report['model_only_images_per_s']:8.1f} images/s\n"
        f"  decode only  {report['decode_only_images_per_s']:8.1f} images/s\n"
        f"  loop limit   {report['loop_limit_images_per_s']:8.1f} images/s  (1 / (1/model only + 1/decode only))\n"
        f"  per image    " + ", ".join(f"{stage} {ms:.1f}" for stage, ms in report["breakdown_ms_per_image"].items())
        + " ms\n"
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
        + (
            f"  featx, auto  {report['auto_images_per_s']:8.1f} images/s with {report['auto_runtime']} "
            f"(auto chose it: {report['auto_reason']})\n"
            if "auto_runtime" in report
            else ""
        )
        + (
            f"  featx's default (runtime auto: {report['auto_runtime']}): {report['auto_speedup_vs_naive']:.2f}x the "
            f"naive loop, {100 * report['auto_fraction_of_loop_limit']:.0f}% of its own loop limit "
            f"({report['auto_loop_limit_images_per_s']:.1f} images/s)\n"
            if "auto_runtime" in report
            else ""
        )
        + f"  decoder {report['decoder']}; eager torch: "
        f"speedup vs naive {report['speedup_vs_naive']:.2f}x, "
        f"{100 * report['fraction_of_model_limit']:.0f}% of the model-only limit, "
        f"{100 * report['fraction_of_loop_limit']:.0f}% of the loop's own limit"
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


def _bench_busy(args) -> int:
    """``featx bench --busy``: the thread settings side by side, under a neighbouring extraction."""
    report = run_busy_bench(args.folder, extract_options(args), n=args.n, repeat=args.repeat,
                            out=lambda line: print(line, file=sys.stderr if args.json else sys.stdout))
    if args.json:
        print_json(report)
        return 0
    print(f"\n{report['n_images']} images, {report['model']}, {report['cpu_count']} cores, beside a second "
          f"'featx extract' (load average {report['load_before']:.1f} before, {report['load_after']:.1f} after):")
    for row in report["results"]:
        print(f"  threads={str(row['threads']):5} {row['images_per_s']:8.1f} images/s")
    print(f"  best: threads={report['best_threads']}; best / default (threads={report['default_threads']}): "
          f"{report['best_over_default']:.2f}x")
    return 0


def bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", nargs="?", default=None, metavar="DIR", help="a folder of class sub-folders of images")
    add_extraction_options(p, ("backbone",), title=None)
    p.add_argument("--n", type=int, default=256, help="images to generate without DIR (default: %(default)s)")
    add_extraction_options(p, ("batch_size", "device", "num_workers", "compile", "runtime"), title=None, changes={
        "num_workers": {"help": "decoding processes for featx and its decode-only run (default: on a CPU, threads of "
                                "the main process; on a GPU, one per core)"},
        "compile": {"help": "also measure featx and the model-only limit under torch.compile (compile time reported "
                            "apart)"},
        "runtime": {"help": "auto: also measure what runtime='auto' chooses by (every installed runtime on one "
                            "batch, checked against eager; remembered in the cache folder) and featx with its choice; "
                            "onnxruntime: also measure featx and the model-only limit with ONNX Runtime (default: "
                            "%(default)s)"},
    })
    p.add_argument("--busy", action="store_true",
                   help="instead: featx's extraction at each thread setting (auto, 1 … the cores, none) while a second "
                        "'featx extract' of other images shares the cores; default against best")
    p.add_argument("--repeat", type=int, default=1, help="with --busy: rounds over the settings (default: %(default)s)")
    add_json(p, "print JSON")


#: Each command: what runs it, and what adds its arguments.
COMMANDS = {
    "demo": (cmd_demo, demo_arguments),
    "models": (cmd_models, models_arguments),
    "layers": (cmd_layers, layers_arguments),
    "advise": (cmd_advise, advise_arguments),
    "bench": (cmd_bench, bench_arguments),
}
