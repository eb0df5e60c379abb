"""The options several ``featx`` commands share, each declared once, and what they build.

:func:`add_extraction_options` adds extraction options to a command, one flag per field of
:class:`~featx.options.ExtractOptions` with that field's default, and records which; and
:func:`extract_options` turns the parsed arguments back into that one object. No other part of
the CLI spells an extraction setting. The data source (:func:`add_data_options`,
:func:`open_data`), the Ray engine, the head, ``--json`` and the model file a command writes are
declared here too.

This module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence

from featx.cli.output import warn_problems
from featx.distributed import RayEngine, require_ray
from featx.exceptions import FeatxError
from featx.images import open_source
from featx.options import CACHED, DECODERS, RUNTIMES, STORE_DTYPES, TTAS, ExtractOptions

__all__ = [
    "DEFAULTS",
    "EXTRACTION",
    "OPTIONS",
    "add_allow_outside_root",
    "add_data_options",
    "add_engine_options",
    "add_extraction_options",
    "add_head_options",
    "add_json",
    "add_model_output",
    "add_per_class",
    "check_output_file",
    "engine",
    "extract_options",
    "open_data",
]

DEFAULTS = ExtractOptions()

#: The ExtractOptions field behind each extraction option: its flag (the ``args`` attribute is the
#: flag's name with underscores) and the keywords of ``add_argument``, in ``--help`` order.
OPTIONS: dict[str, tuple[str, dict]] = {
    "backbone": ("--model", {"default": DEFAULTS.backbone,
                             "help": "backbone (default: %(default)s; see 'featx models')"}),
    "weights": ("--weights", {"default": DEFAULTS.weights,
                              "help": "DEFAULT, a weights name, a state-dict path, or none"}),
    "layers": ("--layers", {
        "default": DEFAULTS.layers,
        "help": "comma-separated aliases or nodes, all, or (cv, fit) auto: chosen by inner cross-validation among "
        "all layers and the --pool values; join layers with + for one concatenated feature set (stage4+pre_logits, "
        "or stage4/spp+pre_logits/avg with a pooling per layer) (default: %(default)s)",
    }),
    "pooling": ("--pool", {"default": DEFAULTS.pooling,
                           "help": "comma-separated: avg, max, avgmax, spp (default: avg; with --layers auto "
                                   "the candidates are avg and spp of every layer)"}),
    "batch_size": ("--batch-size", {"type": int, "default": DEFAULTS.batch_size,
                                    "help": "images per forward pass (default: %(default)s)"}),
    "device": ("--device", {"default": DEFAULTS.device,
                            "help": "auto, cpu, cuda, cuda:N or mps (default: %(default)s)"}),
    "precision": ("--precision", {"default": DEFAULTS.precision,
                                  "help": "auto, fp32, bf16 or fp16 (default: %(default)s)"}),
    "num_workers": ("--workers", {
        "type": int, "default": None,
        "help": "decoding processes (default: on a CPU, threads of the main process taking turns with the "
                "network; on a GPU, one process per core); with --engine ray: Ray actors",
    }),
    "on_error": ("--on-error", {"choices": ("skip", "raise"), "default": CACHED.on_error,
                                "help": "bad images: skip and report, or stop"}),
    "store": ("--cache", {"default": None, "metavar": "DIR",
                          "help": "feature store folder (default: $FEATX_CACHE or ./cache)"}),
    "dtype": ("--dtype", {"choices": STORE_DTYPES, "default": DEFAULTS.dtype,
                          "help": "storage precision of a new store"}),
    "tta": ("--tta", {
        "choices": TTAS, "default": "none",
        "help": "hflip: average every feature over the image and its horizontal mirror (one forward pass on both; "
        "twice the network work; a store of its own) (default: %(default)s)",
    }),
    "decoder": ("--decoder", {
        "choices": DECODERS, "default": DEFAULTS.decoder,
        "help": "where JPEGs are decoded: auto (on the GPU with a CUDA device, else PIL in the decoding processes), "
        "pil, or torch (torchvision.io on the device) (default: %(default)s)",
    }),
    "compile": ("--compile", {
        "action": "store_true",
        "help": "run the network under torch.compile (CPU or CUDA): compiles once (seconds to minutes), then faster; "
        "pays on large folders ('featx bench --compile' measures both). Same features up to rounding.",
    }),
    "runtime": ("--runtime", {
        "choices": RUNTIMES, "default": DEFAULTS.runtime,
        "help": "what runs the network: auto (the fastest runtime installed and verified against eager features "
        "for this backbone on this machine, measured once on a few batches and remembered in the cache folder), "
        'torch (eager), onnxruntime (pip install "featx[onnx]") or openvino (pip install openvino), both on the '
        "CPU; features within the precision's tolerance of eager (default: %(default)s)",
    }),
    "max_pixels": ("--max-pixels", {
        "type": int, "default": DEFAULTS.max_pixels, "metavar": "N",
        "help": "largest width x height of an image file that is decoded; a larger one is a bad image "
        "(decompression-bomb guard). Raise it for files you trust (default: %(default)s)",
    }),
    "threads": ("--threads", {
        "default": "auto", "metavar": "auto|none|N",
        "help": "the thread plan: auto (torch threads capped by the cores, OpenMP threads that sleep when they wait, "
        "BLAS on one thread in featx's heads), N torch threads for the forward pass, or none (featx changes no thread "
        "setting) (default: %(default)s)",
    }),
}

#: The group of options 'featx extract', 'cv', 'compare' and 'fit' have.
EXTRACTION = ("backbone", "weights", "layers", "pooling", "batch_size", "device", "precision", "num_workers",
              "on_error", "store", "dtype", "tta", "max_pixels", "threads")


def _threads(value):
    """``--threads``: "auto", "none" (None) or a whole number, checked by ExtractOptions."""
    if value.lower() == "none":
        return None
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise FeatxError(f"--threads must be auto, none or a whole number >= 1, got {value!r}.") from None

# How a parsed value becomes its field's: what the CLI writes for "no value" differs from the field's own.
_VALUES = {
    "weights": lambda value: None if value.lower() == "none" else value,
    "num_workers": lambda value: "auto" if value is None else value,
    "store": lambda folder: folder or True,
    "threads": _threads,
}

_DECLARED = "extraction_options"  # the args attribute that maps each declared field to its args attribute


def add_extraction_options(parser, fields: Sequence[str] = EXTRACTION, *, title: str | None = "extraction",
                           layers: str = DEFAULTS.layers, changes: Mapping[str, Mapping] | None = None):
    """Add the options of ``fields`` (ExtractOptions field names, from :data:`OPTIONS`) to a command.

    Parameters
    ----------
    parser : argparse.ArgumentParser or argument group
    fields : sequence of str, default=EXTRACTION
        The options this command has, in ``--help`` order.
    title : str or None, default="extraction"
        A new argument group of that title; None adds the options to ``parser`` itself.
    layers : str, default="pre_logits"
        The default of ``--layers`` (``"all"`` for the commands that compare layers).
    changes : mapping, optional
        Per field, the ``add_argument`` keywords this command words its own way (``help``, and
        ``flag`` for another flag: the ``args`` attribute follows the flag).

    Returns
    -------
    The group (or ``parser``) the options went into.
    """
    group = parser.add_argument_group(title) if title else parser
    declared = dict(parser.get_default(_DECLARED) or {})
    for field in fields:
        flag, spec = OPTIONS[field]
        spec = {**spec, **({"default": layers} if field == "layers" else {}), **(changes or {}).get(field, {})}
        flag = spec.pop("flag", flag)
        group.add_argument(flag, **spec)
        declared[field] = flag.lstrip("-").replace("-", "_")
    parser.set_defaults(**{_DECLARED: declared})
    return group


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Add ``--engine`` and the Ray options; :func:`extract_options` then builds the engine."""
    g = parser.add_argument_group("engine (see docs/scaling.md)")
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
    parser.set_defaults(**{_DECLARED: {**(parser.get_default(_DECLARED) or {}), "engine": "engine"}})


def engine(args):
    """``--engine``: "local", or a RayEngine from --address, --workers (actors) and --gpus-per-worker."""
    if args.engine == "local":
        for option, value in (("--address", args.address), ("--gpus-per-worker", args.gpus_per_worker),
                              ("--cpus-per-worker", args.cpus_per_worker)):
            if value is not None:
                raise FeatxError(f"{option} is an option of the Ray engine: add --engine ray, or leave {option} out")
        return "local"
    require_ray()
    return RayEngine(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker or 0,
                     cpus_per_worker=args.cpus_per_worker or 1)


def extract_options(args: argparse.Namespace, base: ExtractOptions = DEFAULTS, *,
                    leave_out: Sequence[str] = ()) -> ExtractOptions:
    """The ExtractOptions of a command's parsed arguments: ``base`` with every option it declared.

    Parameters
    ----------
    args : argparse.Namespace
        Parsed by a parser that :func:`add_extraction_options` (and :func:`add_engine_options`) filled.
    base : ExtractOptions, default=ExtractOptions()
        The fields the command has no option for (the workflow's own defaults, e.g. ``CACHED``).
    leave_out : sequence of str
        Fields the command declares but the workflow chooses itself (``featx fit --auto``).

    Returns
    -------
    ExtractOptions
        With Ray, ``--workers`` counts actors and ``num_workers`` stays ``"auto"``.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> _ = add_extraction_options(parser, ("backbone", "store", "tta"))
    >>> options = extract_options(parser.parse_args(["--model", "featx_tiny_cnn"]))
    >>> options.backbone, options.store, options.tta
    ('featx_tiny_cnn', True, None)
    """
    declared = {field: dest for field, dest in getattr(args, _DECLARED, {}).items() if field not in leave_out}
    settings = {field: _VALUES.get(field, _same)(getattr(args, dest)) for field, dest in declared.items()
                if field != "engine"}
    if "engine" in declared:
        settings["engine"] = engine(args)
        if settings["engine"] != "local":
            settings["num_workers"] = "auto"
    return base.replace(**settings)


def _same(value):
    return value


def add_per_class(parser, *, help: str = "keep N images per class (seeded)", metavar: str | None = "N") -> None:
    parser.add_argument("--per-class", type=int, default=None, metavar=metavar, help=help)


def add_allow_outside_root(parser) -> None:
    parser.add_argument("--allow-outside-root", action="store_true", help="accept CSV paths outside the CSV's folder")


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """Add the group ``data``: DATA and how to sample it (read by :func:`open_data`)."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "data",
        metavar="DATA",
        help="a folder of class sub-folders, a CSV/TSV (path,label), an image file, 'digits' or 'fashion-mnist'",
    )
    add_per_class(g)
    g.add_argument("--split", default="train", help="built-in datasets: train, test (or all for digits)")
    g.add_argument("--seed", type=int, default=0, help="seed of --per-class and of splits (default: %(default)s)")
    add_allow_outside_root(g)


def open_data(args: argparse.Namespace, *, labelled: bool = False, classified: bool = False,
              cv: int | None = None):
    """The ImageSource of :func:`add_data_options`' arguments; its problems are warned about on stderr.

    Refused here, before anything is extracted: with ``labelled=True`` an unlabelled source; with
    ``classified=True`` also one class only; with ``cv`` also a class of fewer than ``cv`` images
    (:meth:`~featx.images.ImageSource.require_classes`).
    """
    source = open_source(args.data, per_class=args.per_class, split=args.split, random_state=args.seed,
                         allow_outside_root=args.allow_outside_root)
    needs = (f"'featx {args.command}' needs classes: a folder of class sub-folders, a CSV with a 'label' column, "
             "or a built-in dataset")
    if classified or cv is not None:
        source.require_classes(needs, cv=cv)
    elif labelled:
        source.require_labels(needs)
    warn_problems(source)
    return source


def add_head_options(parser: argparse.ArgumentParser, *, several: bool) -> None:
    """Add the group ``head``; ``several``: heads to compare by (repeated) cross-validation, else one to tune."""
    g = parser.add_argument_group("head")
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


def add_json(parser, help: str) -> None:
    """Add ``--json``; ``help`` says what the command then prints."""
    parser.add_argument("--json", action="store_true", help=help)


def add_model_output(parser) -> None:
    parser.add_argument("-o", "--output", required=True, help="model file to write")


def check_output_file(path: str, option: str) -> None:
    """Refuse an output file that cannot be written, before any work: a folder, or in a missing folder.

    Examples
    --------
    >>> check_output_file(".", "-o")
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: -o '.' is a folder: give a file name in it, e.g. 'report.html'
    """
    if os.path.isdir(path):
        raise FeatxError(f"{option} {path!r} is a folder: give a file name in it, e.g. "
                         f"{os.path.join(path, 'report.html') if path != '.' else 'report.html'!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FeatxError(f"{option} {path!r}: the folder {folder!r} does not exist; create it or write elsewhere")
