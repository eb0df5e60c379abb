"""Fine-tuning at the machine's speed: an epoch of ``featx finetune`` against older code and a plain loop.

Runs, one after the other in one invocation (so on the same machine under the same conditions),
each in a fresh process, on the same cached maps:

``old``
    ``python -m featx finetune`` of another featx checkout (``--old PATH``, e.g. an export of the
    ``main`` branch before this change): its own training loop, as users ran it.
``featx``
    ``python -m featx finetune`` of this checkout with its defaults (``--train-precision auto``:
    bf16 autocast on a CPU that computes bf16 natively, channels-last, batches gathered from the
    cached float16 maps and converted once).
``featx-fp32``
    The same with ``--train-precision fp32`` (channels-last and the direct feed, no autocast).
``plain``
    A plain PyTorch loop over the same maps: ``TensorDataset`` of float32 maps, ``DataLoader``
    (shuffle, batch size), the same tail and head, AdamW with the same learning rates, float32,
    no flips, no BatchNorm recomputation, no validation pass. What a user would write by hand.

The maps of the training images (and of ``--val``) are extracted once into ``--cache`` by the
first variant, through the feature store, so every variant reads the same float16 maps and the
frozen part is timed by none of them. Every featx variant trains ``--epochs`` epochs with the
same seed; its epoch seconds are the ``seconds`` of ``featx finetune``'s history (training,
BatchNorm recomputation and the held-out pass of one epoch). Accuracy: featx's held-out split of
the training images (``val_split``, the early-stopping score) and, with ``--val``, the accuracy
of the saved model on that folder (``featx evaluate``).

Example (the figures in ``docs/benchmarks.md``, "Fine-tuning at the machine's speed")::

    mkdir /tmp/featx_main && git archive main | tar -x -C /tmp/featx_main     # the code before
    python pipelines/finetune_bench.py /work/shared/data/clothing_small/train --per-class 100 \\
        --val /work/shared/data/clothing_small/val --from stage3 --epochs 3 \\
        --old /tmp/featx_main --cache /tmp/ft_cache

Timings on a shared machine are noisy: read the ratios of one run, not the absolute seconds.
Uses featx's public API and its command line only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
VARIANTS = ("old", "featx", "featx-fp32", "plain")


class CommandFailed(RuntimeError):
    """A variant's command exited with an error (its last stderr lines are the message)."""


def _run(command: list[str], *, pythonpath: Path, threads: int | None = None) -> str:
    """Run ``command`` with ``pythonpath``'s featx, from an empty folder: ``python -m`` puts the working
    folder first on ``sys.path``, so run from a checkout it would import that checkout's featx instead."""
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    if threads:  # torch's intra-op threads and the BLAS's, the same for every variant
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="featx-finetune-bench-cwd-") as empty:
        done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=empty)
    if done.returncode != 0:
        raise CommandFailed(f"{' '.join(command)} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def _json_of(stdout: str) -> dict:
    """The JSON document a command printed (after any line it printed before it)."""
    return json.loads(stdout[stdout.index("{"):])


def run_featx(checkout: Path, args, out: Path, *, extra=()) -> dict:
    """``featx finetune`` (and ``featx evaluate`` on ``--val``) of ``checkout``, in fresh processes."""
    model = out / "model.joblib"
    data = [args.data] + (["--per-class", str(args.per_class)] if args.per_class else [])
    command = [sys.executable, "-m", "featx", "finetune", *data, "--model", args.model, "--from", args.from_layer,
               "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
               "--val-split", str(args.val_split),
               "--cache", str(args.cache), "--device", args.device, "-o", str(model), "--json", *extra]
    start = time.perf_counter()
    report = _json_of(_run(command, pythonpath=checkout, threads=args.threads))
    row = {
        "epoch_seconds": [record["seconds"] for record in report["history"]],
        "held_out_accuracy": report["val_accuracy"],
        "train_precision": report.get("train_precision", "fp32"),  # code before it had fp32 on the CPU only
        "n_computed": report["n_computed"],
        "process_seconds": time.perf_counter() - start,
    }
    if args.val:
        evaluation = _json_of(_run([sys.executable, "-m", "featx", "evaluate", str(model), args.val, "--cache",
                                    str(args.cache), "--json"], pythonpath=checkout, threads=args.threads))
        row["val_accuracy"] = evaluation["accuracy"]
    return row


def plain_loop(args) -> dict:
    """The hand-written loop over the same maps (runs in its own process, ``--plain-worker``)."""
    import numpy as np
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from featx.backbones import layer_shape, load_backbone
    from featx.extraction import kept_labels
    from featx.finetuning import build_tail, extract_maps, read_maps, split_tap
    from featx.images import open_source
    from featx.options import CACHED

    options = CACHED.replace(backbone=args.model, store=str(args.cache), device=args.device, progress=False)

    def maps_of(folder, per_class):
        source = open_source(folder, per_class=per_class, random_state=args.seed)
        result, _ = extract_maps(source, options, from_layer=args.from_layer)
        return read_maps(result, args.from_layer), kept_labels(result)

    backbone = load_backbone(args.model)
    tap, _ = split_tap(backbone.name, args.from_layer)
    shape = tuple(int(v) for v in layer_shape(backbone.name, tap))
    X, y = maps_of(args.data, args.per_class)
    classes, y_index = np.unique(y, return_inverse=True)
    torch.manual_seed(args.seed)
    tail, n_features = build_tail(backbone, args.from_layer)
    net = nn.Sequential(tail, nn.Dropout(0.2), nn.Linear(n_features, len(classes)))
    optimizer = torch.optim.AdamW([{"params": tail.parameters(), "lr": 3e-4},
                                   {"params": net[2].parameters(), "lr": 3e-3}], weight_decay=0.01)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    data = TensorDataset(torch.from_numpy(X.astype(np.float32)).reshape(len(X), *shape), torch.from_numpy(y_index))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, drop_last=True)
    seconds = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        net.train()
        for x, target in loader:
            optimizer.zero_grad()
            loss = loss_fn(net(x), target)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
    row = {"epoch_seconds": seconds, "held_out_accuracy": None, "train_precision": "fp32"}
    if args.val:
        X_val, y_val = maps_of(args.val, None)
        net.eval()
        with torch.inference_mode():
            logits = torch.cat([net(torch.from_numpy(X_val[i:i + 256].astype(np.float32)).reshape(-1, *shape))
                                for i in range(0, len(X_val), 256)])
        row["val_accuracy"] = float((classes[logits.argmax(1).numpy()] == np.asarray(y_val)).mean())
    return row


def bench(args) -> dict:
    """Every variant of ``args.variants``, in order; their rows and the ratios to ``old``."""
    rows = {}
    with tempfile.TemporaryDirectory(prefix="featx-finetune-bench-") as tmp:
        for name in args.variants:
            out = Path(tmp) / name
            out.mkdir()
            if name == "old":
                rows[name] = run_featx(Path(args.old), args, out)
            elif name == "featx":
                rows[name] = run_featx(HERE, args, out)
            elif name == "featx-fp32":
                rows[name] = run_featx(HERE, args, out, extra=("--train-precision", "fp32"))
            else:
                command = [sys.executable, str(Path(__file__).resolve()), "--plain-worker", args.data, "--model",
                           args.model, "--from", args.from_layer, "--epochs", str(args.epochs), "--batch-size",
                           str(args.batch_size), "--seed", str(args.seed), "--device", args.device, "--cache",
                           str(args.cache), *(["--per-class", str(args.per_class)] if args.per_class else []),
                           *(["--val", args.val] if args.val else [])]
                rows[name] = _json_of(_run(command, pythonpath=HERE, threads=args.threads))
            rows[name]["epoch_median"] = statistics.median(rows[name]["epoch_seconds"])
            print(f"{name}: epochs {', '.join(f'{s:.1f}' for s in rows[name]['epoch_seconds'])} s, held-out "
                  f"{_fmt(rows[name]['held_out_accuracy'])}, val {_fmt(rows[name].get('val_accuracy'))}, load average "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    if "old" in rows:
        for row in rows.values():
            row["speedup_vs_old"] = rows["old"]["epoch_median"] / row["epoch_median"]
    return rows


def _fmt(value, pattern="{:.4f}") -> str:
    return "-" if value is None else pattern.format(value)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="a folder of class sub-folders (the training images)")
    parser.add_argument("--per-class", type=int, default=None, help="keep N training images per class (seeded)")
    parser.add_argument("--val", default=None, help="a labelled folder scored by every trained model")
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--from", dest="from_layer", default="stage3")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-split", type=float, default=0.1, help="featx's held-out share (default: 0.1)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FEATX_CACHE", "cache")),
                        help="feature store folder for the maps, kept between runs (default: $FEATX_CACHE or ./cache)")
    parser.add_argument("--old", default=None, help="root of the featx checkout to compare with (variant 'old')")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated, run in this order (default: {','.join(VARIANTS)}; without --old: "
                             "the others)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP/MKL/OpenBLAS threads of every variant's process (default: the libraries' own)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    parser.add_argument("--plain-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.plain_worker:
        print(json.dumps(plain_loop(args)))
        return 0
    names = args.variants.split(",") if args.variants else [v for v in VARIANTS if v != "old" or args.old]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or ("old" in names and not args.old):
        parser.error(f"variants are {', '.join(VARIANTS)} ('old' needs --old PATH); got {args.variants!r}")
    args.variants = names
    args.cache = args.cache.resolve()
    for name in ("data", "val", "old"):  # the variants run from an empty folder (see _run)
        value = getattr(args, name)
        if value is not None and Path(value).exists():
            setattr(args, name, str(Path(value).resolve()))
    load = os.getloadavg()[0]
    try:
        rows = bench(args)
    except CommandFailed as exc:
        print(f"finetune_bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"load_average_at_start": load, "cpus": os.cpu_count(), "rows": rows}, indent=2))
        return 0
    print(f"{args.model} from {args.from_layer}, {args.epochs} epochs of batch {args.batch_size} on {args.device}; "
          f"{os.cpu_count()} CPUs, threads {args.threads or 'default'}, load average {load:.1f} at start")
    print(f"{'variant':<11} {'precision':<9} {'epoch s':>8} {'x old':>6} {'held-out':>8} {'val':>7}")
    for name, row in rows.items():
        print(f"{name:<11} {row['train_precision']:<9} {row['epoch_median']:>8.1f} "
              f"{_fmt(row.get('speedup_vs_old'), '{:.2f}'):>6} {_fmt(row['held_out_accuracy']):>8} "
              f"{_fmt(row.get('val_accuracy')):>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
