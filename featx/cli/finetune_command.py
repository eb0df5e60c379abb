"""``featx finetune``: train the top blocks of a backbone on its cached maps, and save the model.

The command's docstring is its ``--help``. The group ``training`` has one option per field of
:class:`~featx.options.FinetuneOptions`, of the same name and default (``--no-flip`` is
``flip=False``), and :func:`finetune_options` builds that object from it. ``--batch-size`` is the
training's (maps per step); the frozen part's is ``--extract-batch-size``.
featx.finetuning imports torch: it is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses

from featx.cli.arguments import (
    add_data_options,
    add_extraction_options,
    add_json,
    add_model_output,
    extract_options,
    open_data,
)
from featx.cli.interrupts import interrupted, interruptible
from featx.cli.output import print_json, report_skipped
from featx.options import PRECISIONS, FinetuneOptions

__all__ = ["COMMANDS", "add_training_options", "finetune_options"]

TRAINING = FinetuneOptions()

#: How 'featx finetune' words the extraction options of its frozen part.
FROZEN_PART = {
    "batch_size": {"flag": "--extract-batch-size", "help": "images per frozen forward pass (default: %(default)s)"},
    "precision": {"help": "of the frozen part: auto, fp32, bf16 or fp16 (default: %(default)s)"},
    "num_workers": {"help": "decoding processes (default: on a CPU, threads of the main process; on a GPU, one per core)"},
}


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """Add the group ``training``: the options :func:`finetune_options` reads."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=TRAINING.epochs,
                   help="at most this many epochs (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=TRAINING.batch_size,
                   help="maps per training step (default: %(default)s)")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default=TRAINING.optimizer,
                   help="AdamW or SGD with momentum (default: %(default)s)")
    g.add_argument("--lr", type=float, default=TRAINING.lr,
                   help="learning rate of the pretrained blocks (default: %(default)s)")
    g.add_argument("--head-lr", type=float, default=TRAINING.head_lr,
                   help="learning rate of the new head (default: 10 x --lr)")
    g.add_argument("--weight-decay", type=float, default=TRAINING.weight_decay, help="(default: %(default)s)")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default=TRAINING.schedule,
                   help="learning-rate decay (default: %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=TRAINING.label_smoothing, help="(default: %(default)s)")
    g.add_argument("--no-flip", action="store_true", help="no horizontal flips of the cached maps")
    g.add_argument("--batchnorm", choices=("auto", "frozen", "train"), default=TRAINING.batchnorm,
                   help="BatchNorm in the trained blocks: ImageNet's running statistics (frozen) or batch statistics "
                        "recomputed after each epoch (train); auto: frozen for pretrained weights, train for "
                        "--weights none (default: %(default)s)")
    g.add_argument("--dropout", type=float, default=TRAINING.dropout, help="before the new head (default: %(default)s)")
    g.add_argument("--val-split", type=float, default=TRAINING.val_split,
                   help="held-out fraction for early stopping (default: %(default)s)")
    g.add_argument("--patience", type=int, default=TRAINING.patience,
                   help="epochs without improvement before stopping (default: %(default)s)")
    g.add_argument("--train-precision", choices=PRECISIONS, default=TRAINING.train_precision,
                   help="autocast of the training: bf16 on CPUs that compute it natively, fp16 on CUDA, else "
                        "fp32 (default: %(default)s)")


def finetune_options(args: argparse.Namespace) -> FinetuneOptions:
    """The FinetuneOptions of :func:`add_training_options`' arguments.

    Examples
    --------
    >>> parser = argparse.ArgumentParser()
    >>> add_training_options(parser)
    >>> options = finetune_options(parser.parse_args(["--epochs", "3", "--no-flip"]))
    >>> options.epochs, options.flip, options.batch_size
    (3, False, 64)
    """
    names = [field.name for field in dataclasses.fields(FinetuneOptions) if field.name != "flip"]
    return FinetuneOptions(**{name: getattr(args, name) for name in names}, flip=not args.no_flip)


def cmd_finetune(args) -> int:
    """fine-tune the top blocks of the backbone on cached maps, save the model

    Freeze the backbone up to --from, keep that layer's output maps in the feature store (computed
    once per image, float16), and train the blocks after it plus a new linear head on them, with
    early stopping on a stratified held-out split of DATA. Prints one line per epoch and the time
    spent in the frozen part (about 0 s when every map is in the store). The model file works with
    'featx predict' and 'featx evaluate' like one from 'featx fit'.

    Example: featx finetune fashion-mnist --per-class 500 --from stage4 --epochs 20 -o ft.joblib
    """
    from featx.finetuning import finetune  # torch: only when the command runs
    from featx.models import save_model  # scikit-learn

    source = open_data(args, classified=True)

    def on_epoch(record) -> None:
        val = "-" if record["val_accuracy"] is None else f"{record['val_accuracy']:.4f}"
        print(f"epoch {record['epoch']:3d}  train loss {record['train_loss']:.4f}  val accuracy {val}  "
              f"lr {record['lr']:.2e}  {record['seconds']:.1f} s", flush=True)

    with interruptible() as stop:
        try:
            model, report = finetune(source, extract_options(args), from_layer=args.from_layer,
                                     training=finetune_options(args), random_state=args.seed,
                                     on_epoch=None if args.json else on_epoch, stop=stop)
        except KeyboardInterrupt:
            return interrupted("the frozen part's completed batches are kept in the store")
    report_skipped(report["skipped"], len(source), data=args.data)
    save_model(model, args.output)
    if args.json:
        print_json({**report, "output": args.output})
        return 0
    val = report["val_accuracy"]
    print(f"frozen part: {report['n_computed']} images computed, {report['n_from_store']} from the store: "
          f"{report['frozen_seconds']:.1f} s (maps read in {report['read_seconds']:.1f} s)")
    print(f"training: {len(report['history'])} epochs"
          + (" (stopped early)" if report["stopped_early"] else "")
          + f", best epoch {report['best_epoch']}"
          + ("" if val is None else f", val accuracy {val:.4f}")
          + f": {report['train_seconds']:.1f} s ({report['train_precision']})")
    print(f"store: {report['store']}")
    print(f"{model.describe()}\nsaved to {args.output}")
    return 0


def finetune_arguments(p: argparse.ArgumentParser) -> None:
    add_data_options(p)
    g = add_extraction_options(p, ("backbone", "weights"), title="backbone and frozen part")
    g.add_argument("--from", dest="from_layer", default="stage4",
                   help="last frozen layer: the blocks after it are trained (default: %(default)s)")
    add_extraction_options(g, ("batch_size", "device", "precision", "num_workers", "on_error", "store", "max_pixels"),
                           title=None, changes=FROZEN_PART)
    add_training_options(p)
    add_model_output(p)
    add_json(p, "print the report as JSON instead of progress lines")


#: The command: what runs it, and what adds its arguments.
COMMANDS = {"finetune": (cmd_finetune, finetune_arguments)}
