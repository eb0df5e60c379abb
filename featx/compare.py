"""Compare layers, poolings, heads and backbones on one labelled data set.

Built from the other modules: one :func:`featx.extract` per backbone (every requested layer and
pooling from one forward pass per image, through the feature store), then
:func:`featx.heads.evaluate` per (layer, pooling, head). It owns no loop of its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from featx import __version__
from featx.backbones import load_backbone, resolve_layers
from featx.exceptions import FeatxError, FeatxWarning
from featx.extraction import extract, join_features, kept_labels
from featx.featuresets import parse_feature_sets, set_name
from featx.images import ImageSource, open_source
from featx.options import CACHED, ExtractOptions, FinetuneOptions
from featx.paths import atomic_write, split_names
from featx.store import canonical_json

__all__ = [
    "best_row",
    "cached_evaluate",
    "compare_layers",
    "evaluate_auto",
    "kept_labels",
    "plot_comparison",
    "reports_folder",
    "select_layer",
    "write_comparison",
]


def reports_folder(store) -> Path | None:
    """Where the evaluation reports of the features in ``store`` are kept: ``<store>.h5.reports``."""
    return None if store is None else Path(str(store.path) + ".reports")


def _evaluator(method: str, n_jobs=None):
    """The outer cross-validation function of ``method`` (``n_jobs`` goes to the heads' one)."""
    if method == "heads":
        import functools

        from featx.heads import evaluate  # scikit-learn: only when a report must be computed

        return functools.partial(evaluate, n_jobs=n_jobs)
    if method == "finetune":
        from featx.finetuning import cross_validate_finetune  # torch

        return cross_validate_finetune
    raise FeatxError(f"Unknown evaluation method {method!r}: expected 'heads' or 'finetune'.")


def cached_evaluate(X, y, *, folder: Path | None, n_jobs=None, method: str = "heads", **settings) -> dict:
    """An outer cross-validation report, kept in ``folder`` under a hash of the inputs.

    ``method="heads"`` runs :func:`featx.heads.evaluate` (a head on feature vectors);
    ``"finetune"`` runs :func:`featx.finetuning.cross_validate_finetune` (``X`` holds maps).
    The hash covers the method, the feature bytes, the labels, every setting and the versions
    of featx and of scikit-learn or torch, so a report is reused only for the identical
    computation (both are deterministic on the CPU). ``n_jobs`` does not change the report and
    is not part of the key. A report that cannot be written (a read-only folder, a full disk) is
    returned all the same, with a :class:`~featx.exceptions.FeatxWarning`.
    """
    # scikit-learn (or torch) is imported only when a report must be computed: a warm run reads them.
    if folder is None:
        return _evaluator(method, n_jobs)(X, y, **settings)
    import importlib.metadata

    plain = (str, int, float, bool, type(None), list, tuple, dict, Path, np.integer, np.floating)
    key = {**{k: v if isinstance(v, plain) else str(v) for k, v in settings.items()},  # weights enums, devices
           "shape": list(X.shape), "dtype": str(X.dtype), "featx": __version__}
    if method == "heads":
        key["sklearn"] = importlib.metadata.version("scikit-learn")
    else:
        key.update(method=method, torch=importlib.metadata.version("torch"))
    X = np.ascontiguousarray(X)
    digest = hashlib.sha256()
    digest.update(canonical_json(key).encode())
    digest.update(X.tobytes())
    digest.update("\0".join(str(label) for label in y).encode())
    path = folder / f"{digest.hexdigest()[:32]}.json"
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):  # unreadable: recompute and rewrite it
            return {**json.loads(path.read_text()), "from_cache": True}
    report = {**_evaluator(method, n_jobs)(X, y, **settings), "from_cache": False}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(report))
    except OSError as exc:
        warnings.warn(f"cannot keep the cross-validation report in {str(folder)!r} ({exc.strerror or exc}): "
                      "the result was computed and is used, but not kept (the next run computes it again); "
                      "make the folder writable or use a writable cache folder to keep it.",
                      FeatxWarning, stacklevel=2)
    return report


def compare_layers(
    source,
    options: ExtractOptions | None = None,
    *,
    backbones: str | Sequence[str] = ("efficientnet_lite0",),
    layers: str | Sequence[str] = "all",
    poolings: str | Sequence[str] = ("avg",),
    heads: str | Sequence[str] = ("logreg",),
    cv: int = 5,
    repeats: int = 1,
    random_state: int = 0,
    n_jobs: int | None = None,
    report=None,
    on_skipped=None,
    finetune_from: str | Sequence[str] | None = None,
    finetune_options: FinetuneOptions | dict | None = None,
    **settings,
) -> list[dict]:
    """Cross-validate a head on every (backbone, layer, pooling) of a labelled image set.

    Parameters
    ----------
    source : ImageSource or anything :func:`featx.images.open_source` accepts
        Labelled images.
    backbones : str or sequence of str, default=("efficientnet_lite0",)
        Backbones, compared side by side; ``"efficientnet_lite0+efficientnet_lite2"`` is one entry
        whose features concatenate both backbones' (each image still goes through each backbone once).
    layers : str or sequence of str, default="all"
        Layer names, or ``"all"`` (every alias but ``logits``), for every backbone. Layers joined
        by ``+`` form one concatenated feature set (``"stage4+pre_logits"``, or
        ``"stage4/spp+pre_logits/avg"`` with a pooling per layer); each block is standardised and
        weighted inside the cross-validation (:class:`~featx.heads.BlockScaler`).
    poolings : str or sequence of str, default=("avg",)
    heads : str or sequence of str, default=("logreg",)
        Heads of :mod:`featx.heads`.
    cv, repeats, random_state
        Outer cross-validation of :func:`featx.heads.evaluate`.
    options : ExtractOptions, optional
        How to extract (default :data:`featx.options.CACHED`: the cache folder, bad images
        skipped); its ``backbone``, ``layers`` and ``pooling`` are replaced by the comparison's
        axes above. With a store, evaluation reports are kept beside it too (keyed by a hash of
        the features, labels and settings), so a repeated comparison is read back, not refitted.
    n_jobs : int, optional
        Outer folds evaluated in parallel.
    report : callable, optional
        Called with each row as soon as it is ready (progress for long comparisons).
    on_skipped : callable, optional
        Called once, after extraction and before any evaluation, with the ``(image, reason)``
        pairs the extraction skipped (unreadable or missing images, over every backbone) and the
        number of images of ``source``; not called when none was skipped. Rows count only the
        images kept (``n_images``).
    **settings
        :class:`~featx.options.ExtractOptions` fields by name (``store=``, ``device=``, ``tta=``,
        ``engine=`` …), replacing those of ``options``. With ``engine="ray"`` the extraction runs
        on Ray; to run the folds on Ray too, call this inside
        :func:`featx.distributed.joblib_on_ray` with ``n_jobs=-1``.
    finetune_from : str or sequence of str, optional
        Also add one fine-tuned row per backbone and layer given (head ``"finetune"``, pooling
        ``"map"``): the blocks after that layer and a new head trained on the cached maps by
        :func:`featx.finetuning.cross_validate_finetune`, on the same outer folds as the frozen
        rows. Costly: one training per fold.
    finetune_options : FinetuneOptions or dict, optional
        How those rows train (``epochs``, ``lr`` …; see :class:`~featx.options.FinetuneOptions`).

    Returns
    -------
    list of dict
        One row per (backbone, feature set, head), in backbone and depth order: ``model``
        (backbones joined by ``+`` when concatenated), ``layer`` and ``pooling`` (joined by ``+``
        for a concatenation), ``depth`` (0 = first layer, or concatenation of layers, listed), ``features`` (the feature
        set's name, e.g. ``stage4/spp+pre_logits/avg``), ``tta``, ``head``, ``dim``,
        ``accuracy_mean``, ``accuracy_std``, ``balanced_accuracy``, ``macro_f1``,
        ``chosen_params``, ``n_images``, ``n_classes``, ``cv``, ``extraction_time`` (seconds
        this run spent extracting for the backbone, 0 when all came from the store),
        ``fit_time`` (of the evaluation, when it was computed), ``from_cache`` (the report was
        read back) and ``notes``.

    Examples
    --------
    >>> import numpy as np, tempfile
    >>> rng = np.random.default_rng(0)
    >>> images = rng.integers(0, 256, size=(12, 32, 32, 3), dtype=np.uint8)
    >>> images[6:] //= 4  # the second class is darker
    >>> rows = compare_layers(open_source(images, labels=[0] * 6 + [1] * 6), backbones="featx_tiny_cnn",
    ...                       layers=["stage1", "pre_logits"], cv=3, device="cpu", store=tempfile.mkdtemp())
    >>> [(row["layer"], row["dim"], row["accuracy_mean"]) for row in rows]
    [('stage1', 16, 1.0), ('pre_logits', 32, 1.0)]
    """
    for axis in ("backbone", "pooling"):
        if axis in settings:
            raise FeatxError(f"compare_layers compares {axis}s: pass {axis}s={settings[axis]!r}, not {axis}=.")
    options = ExtractOptions.merge(options or CACHED, settings, where="compare_layers")
    finetune = FinetuneOptions.merge(finetune_options, where="compare_layers")
    source = source if isinstance(source, ImageSource) else open_source(source)
    source.require_classes("compare_layers needs labelled images")  # fewer images than folds: fewer folds, warned
    entries = [split_names(entry, sep="+") for entry in split_names(backbones)]
    # Each backbone runs once, for the union of what every entry asks of it.
    loaded, sets, results, extraction_times = {}, {}, {}, {}
    for name in dict.fromkeys(n for entry in entries for n in entry):
        backbone = load_backbone(name, weights=options.weights, lazy=True)
        loaded[name] = backbone
        all_layers = [layer for layer, _ in resolve_layers(backbone.name, "all")]
        sets[name] = parse_feature_sets(layers, poolings, all_layers=all_layers)
        blocks = list(dict.fromkeys(pair for fs in sets[name] for pair in fs))
        start = time.perf_counter()
        results[name] = extract(source, options.replace(backbone=backbone, pooling="avg",
                                                        layers=tuple(f"{layer}/{p}" for layer, p in blocks)))
        extraction_times[name] = time.perf_counter() - start if results[name].n_computed else 0.0
    skipped = {name: reason for result in results.values() for name, reason in result.skipped}
    if skipped and on_skipped is not None:
        on_skipped(list(skipped.items()), len(source))
    rows = []
    for entry in entries:
        model = "+".join(loaded[name].name for name in entry)
        depths: dict[str, int] = {}
        for pairs in sets[entry[0]]:
            layer_name = "+".join(layer for layer, _ in pairs)
            depth = depths.setdefault(layer_name, len(depths))
            keys = [f"{layer}/{pooling}" for layer, pooling in pairs]
            X, widths, kept = join_features([results[name] for name in entry], [keys] * len(entry))
            y = kept_labels(results[entry[0]], kept)
            if len(entry) > 1:
                features = set_name([pair for _ in entry for pair in pairs],
                                    [loaded[name].name for name in entry for _ in pairs])
            else:
                features = set_name(pairs)
            for head in split_names(heads):
                evaluation = cached_evaluate(
                    X,
                    y,
                    folder=reports_folder(results[entry[0]].store),
                    head=head,
                    cv=cv,
                    repeats=repeats,
                    random_state=random_state,
                    n_jobs=n_jobs,
                    **({"blocks": widths} if len(widths) > 1 else {}),
                )
                row = {
                    "model": model,
                    "layer": layer_name,
                    "depth": depth,
                    "pooling": "+".join(pooling for _, pooling in pairs),
                    "features": features,
                    "tta": options.tta or "none",
                    "head": head,
                    "dim": int(X.shape[1]),
                    "accuracy_mean": evaluation["accuracy_mean"],
                    "accuracy_std": evaluation["accuracy_std"],
                    "balanced_accuracy": evaluation["balanced_accuracy"],
                    "macro_f1": evaluation["macro_f1"],
                    "chosen_params": evaluation["chosen_params"],
                    "n_images": int(len(y)),
                    "n_classes": evaluation["n_classes"],
                    "cv": evaluation["cv"],
                    "extraction_time": sum(extraction_times[name] for name in entry),
                    "fit_time": evaluation["fit_time"],
                    "from_cache": evaluation.get("from_cache", False),
                    "notes": evaluation["notes"],
                }
                rows.append(row)
                if report is not None:
                    report(row)
        if len(entry) > 1:  # fine-tuning trains the top of one network: no row for concatenated backbones
            continue
        for layer in split_names(finetune_from or []):
            row = _finetune_row(source, loaded[entry[0]], layer, options, finetune, depth=depths.get(layer, len(depths)),
                                cv=cv, repeats=repeats, random_state=random_state)
            rows.append(row)
            if report is not None:
                report(row)
    return rows


def _finetune_row(source, backbone, layer, options: ExtractOptions, finetune: FinetuneOptions, *, depth, cv,
                  repeats, random_state) -> dict:
    """A comparison row for fine-tuning from ``layer``, cross-validated on the frozen rows' folds."""
    from featx.finetuning import read_maps, split_tap  # torch: only for a fine-tuned row

    split_tap(backbone.name, layer)
    if options.store is None or options.store is False:
        raise FeatxError("A fine-tuned comparison row needs a feature store for the maps: pass store=True or a folder.")
    start = time.perf_counter()
    result = extract(source, options.for_maps(backbone, layer))
    extraction_time = time.perf_counter() - start if result.n_computed else 0.0
    y = kept_labels(result)
    X = read_maps(result, layer)
    settings = finetune.changes()
    evaluation = cached_evaluate(X, y, folder=reports_folder(result.store), method="finetune", cv=cv, repeats=repeats,
                                 random_state=random_state, backbone=backbone.name, weights=backbone.weights_arg,
                                 layer=layer, device=str(options.device), **settings)
    return {
        "model": backbone.name,
        "layer": layer,
        "depth": depth,
        "pooling": "map",
        "features": f"{layer}/map",
        "tta": "none",
        "head": "finetune",
        "dim": int(X.shape[1]),
        "accuracy_mean": evaluation["accuracy_mean"],
        "accuracy_std": evaluation["accuracy_std"],
        "balanced_accuracy": evaluation["balanced_accuracy"],
        "macro_f1": evaluation["macro_f1"],
        "chosen_params": {"best_epochs": evaluation["best_epochs"], **settings},
        "n_images": int(len(y)),
        "n_classes": evaluation["n_classes"],
        "cv": evaluation["cv"],
        "extraction_time": extraction_time,
        "fit_time": evaluation["fit_time"],
        "from_cache": evaluation["from_cache"],
        "notes": [f"fine-tuned after {layer}: the blocks after it and a new head trained in each outer fold on its "
                  "training part (early stopping on a split of that part), scored on the same outer folds as "
                  "the frozen rows"],
    }


def plot_comparison(rows: Sequence[dict], path, *, title: str | None = None) -> None:
    """Draw accuracy against layer depth, one line per (backbone, pooling, head), with error bars.

    ``title`` names the data set in the plot's title.

    The x axis lists the layer aliases in depth order; error bars are ± one standard deviation
    over the outer folds. Drawn on a bare matplotlib Figure (Agg rendering, no display and no
    pyplot state).
    """
    from matplotlib.figure import Figure

    layers: list[str] = []
    for row in sorted(rows, key=lambda r: r["depth"]):
        if row["layer"] not in layers:
            layers.append(row["layer"])
    figure = Figure(figsize=(8, 4.8), dpi=120)
    axes = figure.subplots()
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["model"], row["pooling"], row["head"]), []).append(row)
    several_heads = len({key[2] for key in groups}) > 1
    for (model, pooling, head), group in groups.items():
        group = sorted(group, key=lambda r: layers.index(r["layer"]))
        x = [layers.index(r["layer"]) for r in group]
        label = f"{model} · {pooling}" + (f" · {head}" if several_heads else "")
        axes.errorbar(x, [r["accuracy_mean"] for r in group], yerr=[r["accuracy_std"] for r in group],
                      marker="o", capsize=3, label=label)
    best = best_row(rows)
    axes.annotate(f"best {best['accuracy_mean']:.3f}",
                  (layers.index(best["layer"]), best["accuracy_mean"] + best["accuracy_std"]),
                  textcoords="offset points", xytext=(0, 6), ha="center", fontsize=9)
    axes.set_xticks(range(len(layers)), layers)
    axes.set_xlabel("layer (early → late)")
    axes.set_ylabel("cross-validated accuracy")
    n = rows[0]["n_images"]
    subject = f"{title}: " if title else ""
    axes.set_title(f"{subject}accuracy by layer depth ({n} images, {rows[0]['cv']}-fold CV, ± 1 std)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)


def write_comparison(rows: Sequence[dict], folder, *, title: str | None = None) -> dict:
    """Write ``compare.csv``, ``compare.json`` and ``compare.png`` into ``folder``; return their paths.

    ``title`` (e.g. the data set's name) goes into the plot's title.
    """
    import csv

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {kind: folder / f"compare.{kind}" for kind in ("csv", "json", "png")}
    columns = [k for k in rows[0] if k not in ("notes", "chosen_params")] + ["chosen_params"]
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, "chosen_params": json.dumps(row["chosen_params"])})
    paths["json"].write_text(json.dumps(list(rows), indent=2))
    plot_comparison(rows, paths["png"], title=title)
    return paths


def best_row(rows: Sequence[dict]) -> dict:
    """The row with the highest mean accuracy (the earliest, i.e. shallowest, on a tie)."""
    if not rows:
        raise FeatxError("No rows to choose from: nothing was evaluated.")
    return max(rows, key=lambda row: (row["accuracy_mean"], -row["depth"]))
