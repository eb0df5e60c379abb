"""The held-out accuracy table: train on a training part, score once on a separate part, for every data set offline.

Rows (each skipped with a line on stderr when its data is absent):

- ``digits`` (scikit-learn's, its stratified 75/25 split) and ``fashion-mnist`` (Debian's
  ``dataset-fashion-mnist``: ``--fashion-per-class`` images per class of its train split, scored
  on as many of its test split): unlike ImageNet;
- ``neu_steel`` at 5 and 10 images per class (train → val): unlike ImageNet, few-shot;
- ``clothing_small`` (train → val) and ``flowers5`` (a seeded stratified 80/20 split of ``all``),
  each in full and at 10 and 30 images per class: similar to ImageNet.

Methods: ``old`` (the previous default: ``pre_logits/avg``, logistic regression), ``new`` (the
default today: ``featx fit`` with ``--layers auto``, the one-standard-error rule) and ``auto``
(``featx fit --auto --budget``). Every method fits on the training part only and is scored once
on the held-out part; ``se`` is the binomial standard error of that accuracy,
``sqrt(acc (1 - acc) / n_test)``. ``seconds`` is the method's fit time; the features of both parts
are extracted into ``--cache`` first (``extract_seconds`` per data set), so the methods' times
compare heads and search, not extraction.

Example (about 20 minutes on 2 CPU cores for old and new; add ``auto`` for 5 more minutes per row)::

    python pipelines/accuracy.py --methods old,new --cache /tmp/featx-accuracy --out results/accuracy.json

Uses featx's public API only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

import featx
from featx.auto import auto_fit
from featx.cli import format_table
from featx.images import open_source
from featx.models import evaluate_model, fit_model

#: ../shared/data beside the repository (a worktree elsewhere passes --data).
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
METHODS = ("old", "new", "auto")
COLUMNS = ["data", "similar", "n_train", "n_test", "method", "chosen", "accuracy", "se", "seconds"]


def _folder_items(root: Path) -> tuple[list[str], list[str]]:
    paths, labels = [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(folder.iterdir()):
            if path.is_file():
                paths.append(str(path))
                labels.append(folder.name)
    return paths, labels


def _per_class(paths, labels, n: int | None, seed: int):
    if n is None:
        return list(paths), list(labels)
    rng = np.random.default_rng(seed)
    labels_ = np.asarray(labels)
    keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(labels_ == c))[:n] for c in np.unique(labels_)]))
    return [paths[i] for i in keep], [labels[i] for i in keep]


def _split(paths, labels, test_size: float, seed: int):
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(np.arange(len(paths)), test_size=test_size, stratify=labels, random_state=seed)
    pick = lambda idx: ([paths[i] for i in np.sort(idx)], [labels[i] for i in np.sort(idx)])  # noqa: E731
    return pick(train), pick(test)


def rows_available(args) -> list[dict]:
    """Every (name, train, test, similar) row whose data is here; a line on stderr for each one absent."""
    DATA = args.data
    rows = [{"data": "digits", "similar": "no", "train": lambda: open_source("digits", split="train", random_state=args.seed),
             "test": lambda: open_source("digits", split="test", random_state=args.seed)}]
    try:
        fashion = [open_source("fashion-mnist", split=s, per_class=args.fashion_per_class, random_state=args.seed)
                   for s in ("train", "test")]
        rows.append({"data": f"fashion-mnist@{args.fashion_per_class}", "similar": "no",
                     "train": lambda: fashion[0], "test": lambda: fashion[1]})
    except featx.FeatxError as exc:
        print(f"skipping fashion-mnist: {exc} (apt-get install dataset-fashion-mnist)", file=sys.stderr)
    for name, similar, make, sizes in (
        ("neu_steel", "no", lambda: (_folder_items(DATA / "neu_steel" / "train"), _folder_items(DATA / "neu_steel" / "val")),
         (5, 10)),
        ("clothing_small", "yes", lambda: (_folder_items(DATA / "clothing_small" / "train"),
                                           _folder_items(DATA / "clothing_small" / "val")), (None, 10, 30)),
        ("flowers5", "yes", lambda: _split(*_folder_items(DATA / "flowers5_128px" / "all"), 0.2, args.seed),
         (None, 10, 30)),
    ):
        folder = DATA / {"flowers5": "flowers5_128px"}.get(name, name)
        if not folder.is_dir():
            print(f"skipping {name}: {folder} is absent", file=sys.stderr)
            continue
        (train, test) = make()
        for n in sizes:
            part = _per_class(*train, n, args.seed)
            rows.append({"data": name + ("" if n is None else f"@{n}"), "similar": similar,
                         "train": lambda part=part: open_source(part[0], labels=part[1]),
                         "test": lambda test=test: open_source(test[0], labels=test[1])})
    wanted = set(args.rows.split(",")) if args.rows != "all" else None
    return [row for row in rows if wanted is None or row["data"] in wanted]


def run_method(method: str, train, test, args) -> dict:
    options = dict(backbone=args.model, store=args.cache, progress=False)
    start = time.perf_counter()
    if method == "old":
        model, _ = fit_model(train, layers="pre_logits", pooling="avg", head="logreg", random_state=args.seed, **options)
        chosen = "pre_logits/avg"
    elif method == "new":
        model, _ = fit_model(train, layers="auto", head="logreg", random_state=args.seed, **options)
        chosen = model.info["selection"]["chosen"]
    else:
        result = auto_fit(train, budget=args.budget, random_state=args.seed, store=args.cache, progress=False)
        model, chosen = result.model, result.best["configuration"]
    seconds = time.perf_counter() - start
    report = evaluate_model(model, test, store=args.cache)
    accuracy, n = report["accuracy"], report["n_images"]
    return {"method": method, "chosen": chosen, "accuracy": accuracy, "se": math.sqrt(accuracy * (1 - accuracy) / n),
            "seconds": round(seconds, 1), "n_test": n}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="all", help="comma-separated row names (e.g. digits,neu_steel@5) or all")
    parser.add_argument("--methods", default="old,new,auto", help="comma-separated: old, new, auto")
    parser.add_argument("--budget", default="5m", help="the --auto budget (default: %(default)s)")
    parser.add_argument("--model", default="efficientnet_lite0", help="backbone of old and new (default: %(default)s)")
    parser.add_argument("--fashion-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA, help="the shared image sets (default: %(default)s)")
    parser.add_argument("--cache", default="cache", help="feature store folder (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}: expected some of {list(METHODS)}")
    table = []
    for row in rows_available(args):
        train, test = row["train"](), row["test"]()
        start = time.perf_counter()
        featx.extract(train, backbone=args.model, layers="all", store=args.cache, on_error="skip", progress=False)
        featx.extract(test, backbone=args.model, layers="all", store=args.cache, on_error="skip", progress=False)
        extract_seconds = time.perf_counter() - start
        for method in methods:
            result = run_method(method, train, test, args)
            table.append({"data": row["data"], "similar": row["similar"], "n_train": len(train),
                          "extract_seconds": round(extract_seconds, 1), **result})
            print(f"{row['data']} {method}: {result['accuracy']:.4f} ± {result['se']:.4f} ({result['chosen']}, "
                  f"{result['seconds']:.0f} s)", file=sys.stderr, flush=True)
    print(format_table([{**row, "seconds": f"{row['seconds']:.0f}"} for row in table], COLUMNS))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
