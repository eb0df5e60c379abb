"""The ``featx`` command: thin verbs over the public API.

Each command parses its options, calls one importable function that returns data, and prints
that data as a table (or JSON with ``--json``). A :class:`~featx.exceptions.FeatxError` becomes
one line on stderr and exit code 1; anything else keeps its traceback, because it is a bug.

The options several commands share are declared once in :mod:`featx.cli.arguments`, which also
builds the :class:`~featx.options.ExtractOptions` every command hands its workflow; tables and
JSON come from :mod:`featx.cli.output`; each ``*_commands`` module holds the commands of one
concept, each command a function whose docstring is its ``--help`` and a function that adds its
arguments.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import warnings
from collections.abc import Sequence

from featx import __version__
from featx.cli import evaluation_commands, extraction_commands, finetune_command, info_commands, model_commands
from featx.cli.info_commands import demo, layer_rows
from featx.cli.output import format_table
from featx.exceptions import FeatxError, FeatxWarning

__all__ = ["build_parser", "demo", "format_table", "layer_rows", "main"]

#: The commands in the order ``featx --help`` lists them.
ORDER = ("demo", "models", "layers", "extract", "cv", "compare", "advise", "fit", "finetune", "predict", "evaluate",
         "bench", "cache")

_COMMANDS = {
    **info_commands.COMMANDS,
    **extraction_commands.COMMANDS,
    **evaluation_commands.COMMANDS,
    **model_commands.COMMANDS,
    **finetune_command.COMMANDS,
}


def add_command(subparsers, name: str, run) -> argparse.ArgumentParser:
    """The sub-parser of command ``name``, which runs ``run(args)``.

    ``run``'s docstring is the command's help: its paragraphs are the one-line summary (in
    ``featx --help``), the description and the example (the epilog), as typer reads a command's
    help from its function. Under ``python -OO`` (no docstrings) the commands work without help.
    """
    summary, description, example = (inspect.cleandoc(run.__doc__ or "").split("\n\n") + [None] * 3)[:3]
    parser = subparsers.add_parser(name, help=summary, description=description, epilog=example)
    parser.set_defaults(func=run)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The parser of the ``featx`` command and all its sub-commands."""
    parser = argparse.ArgumentParser(
        prog="featx",
        description="Small-data image classification with frozen, pretrained CNN features.",
        epilog="Example: featx layers efficientnet_lite0",
    )
    parser.add_argument("--version", action="version", version=f"featx {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in ORDER:
        run, add_arguments = _COMMANDS[name]
        add_arguments(add_command(subparsers, name, run))
    return parser


def _one_line_featx_warnings(show):
    """A ``warnings.showwarning`` that prints a FeatxWarning as one line on stderr, other warnings with ``show``."""

    def showwarning(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FeatxWarning):
            print(f"featx: warning: {message}", file=sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featx`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings():  # restores the caller's showwarning when the command ends
        warnings.showwarning = _one_line_featx_warnings(warnings.showwarning)
        try:
            return int(args.func(args) or 0)
        except FeatxError as exc:
            print(f"featx: error: {exc}", file=sys.stderr)
            return 1
