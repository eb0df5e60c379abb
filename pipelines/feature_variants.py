"""Held-out accuracy of stronger frozen features (issue 19, point 3): which variants help, on which data.

On the rows of :mod:`accuracy` (the same splits: train on the training part only, score once on
the held-out part), every variant below is one logistic regression (``featx.heads.fit_head``, C
tuned by inner 3-fold CV) on cached features of efficientnet_lite0:

- ``pre_logits``, ``stage5``, ``stage4``: one layer, the average of its map;
- ``stage4/spp``, ``stage5/spp``: the spatial pyramid (1x1 + 2x2 averages);
- ``concat 4+5+pl``: stage4, stage5 and pre_logits side by side, each block standardised and
  weighted by ``featx.heads.BlockScaler`` (per-block normalisation);
- ``stage5 power+l2``, ``pre_logits power+l2``: signed square root, then L2 normalisation;
- ``stage5 pca-whiten``: PCA keeping 95 % of the variance, whitened;
- ``stage5 rbf``: the RBF SVM head instead of logistic regression.

A larger input size is not a variant here: featx feeds every backbone its own input size; the
larger-input backbones (Lite1 at 240 px, Lite2 at 260 px) are compared with ``featx compare
--model``. Partial fine-tuning is an ``--auto`` candidate (``featx.auto``), measured by
``pipelines/accuracy.py --methods auto``.

The output is one table (a row per data set, a column per variant) and, with ``--out``, JSON.
What was adopted from it is written in docs/guide.md ("How featx chooses") and
docs/benchmarks.md.

Example (about 4 minutes on 2 CPU cores for the small rows with a warm cache)::

    python pipelines/feature_variants.py --rows digits,neu_steel@5,flowers5@30 --cache /tmp/featx-accuracy

Uses featx's public API only.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import accuracy  # noqa: E402  (the rows and their splits)

import featx  # noqa: E402
from featx.cli import format_table  # noqa: E402
from featx.extraction import kept_labels  # noqa: E402
from featx.heads import fit_head  # noqa: E402

SMALL_ROWS = ("digits", "fashion-mnist@100", "neu_steel@5", "neu_steel@10", "clothing_small@10",
              "clothing_small@30", "flowers5@10", "flowers5@30")


def power(X: np.ndarray) -> np.ndarray:
    """Signed square root (power normalisation with exponent 1/2)."""
    return np.sign(X) * np.sqrt(np.abs(X))


#: name -> (feature blocks, fit_head settings, transform of the features before the head)
VARIANTS = {
    "pre_logits": (["pre_logits/avg"], {}, None),
    "stage5": (["stage5/avg"], {}, None),
    "stage4": (["stage4/avg"], {}, None),
    "stage4/spp": (["stage4/spp"], {}, None),
    "stage5/spp": (["stage5/spp"], {}, None),
    "concat 4+5+pl": (["stage4/avg", "stage5/avg", "pre_logits/avg"], {}, None),
    "stage5 power+l2": (["stage5/avg"], {"l2_normalize": True}, power),
    "pre_logits power+l2": (["pre_logits/avg"], {"l2_normalize": True}, power),
    "stage5 pca-whiten": (["stage5/avg"], {"pca": 0.95}, None),
    "stage5 rbf": (["stage5/avg"], {"head": "rbf-svm"}, None),
}


def score_variants(train, test, *, cache: str, seed: int) -> dict[str, tuple[float, float]]:
    """Held-out (accuracy, binomial standard error) of every variant on one row."""
    options = dict(backbone="efficientnet_lite0", layers="all", pooling="avg,spp", store=cache, progress=False,
                   on_error="skip")
    tr, te = featx.extract(train, **options), featx.extract(test, **options)
    y_train, y_test = kept_labels(tr), np.asarray(kept_labels(te))
    scores = {}
    for name, (keys, settings, transform) in VARIANTS.items():
        X_train, X_test = np.hstack([tr[k] for k in keys]), np.hstack([te[k] for k in keys])
        if transform is not None:
            X_train, X_test = transform(X_train), transform(X_test)
        settings = {"head": "logreg", **settings}
        blocks = [tr[k].shape[1] for k in keys] if len(keys) > 1 else None
        model, _ = fit_head(X_train, y_train, inner_cv=3, random_state=seed, blocks=blocks, **settings)
        acc = float(np.mean(model.predict(X_test) == y_test))
        scores[name] = (acc, math.sqrt(acc * (1 - acc) / len(y_test)))
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(SMALL_ROWS),
                        help="comma-separated rows of pipelines/accuracy.py, or all (default: the small rows)")
    parser.add_argument("--fashion-per-class", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=accuracy.DATA, help="the shared image sets (default: %(default)s)")
    parser.add_argument("--cache", default="cache", help="feature store folder (default: %(default)s)")
    parser.add_argument("--out", default=None, help="also write the scores as JSON here")
    args = parser.parse_args(argv)
    table, raw = [], {}
    for row in accuracy.rows_available(args):
        scores = score_variants(row["train"](), row["test"](), cache=args.cache, seed=args.seed)
        raw[row["data"]] = scores
        best = max(acc for acc, _ in scores.values())
        table.append({"data": row["data"], "similar": row["similar"],
                      **{name: f"{acc:.3f}" + ("*" if acc == best else "") for name, (acc, _) in scores.items()}})
        print(f"{row['data']}: " + " ".join(f"{n}={a:.3f}" for n, (a, _) in scores.items()), file=sys.stderr,
              flush=True)
    print(format_table(table, ["data", "similar", *VARIANTS]))
    print("held-out accuracy; * the best of the row")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({row: {n: {"accuracy": a, "se": s} for n, (a, s) in scores.items()}
                                              for row, scores in raw.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
