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
import contextlib
import inspect
import logging
import os
import select
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from featx import __version__
from featx.cli import (audit_command, evaluation_commands, extraction_commands, finetune_command, info_commands,
                       model_commands)
from featx.cli.info_commands import demo, layer_rows
from featx.cli.output import format_table
from featx.exceptions import FeatxError, FeatxWarning
from featx.paths import using_cache_dir

__all__ = ["build_parser", "demo", "format_table", "layer_rows", "main"]

#: The commands in the order ``featx --help`` lists them.
ORDER = ("demo", "models", "layers", "extract", "cv", "compare", "advise", "fit", "finetune", "predict", "evaluate",
         "report", "audit", "bench", "cache")

_COMMANDS = {
    **info_commands.COMMANDS,
    **extraction_commands.COMMANDS,
    **evaluation_commands.COMMANDS,
    **model_commands.COMMANDS,
    **finetune_command.COMMANDS,
    **audit_command.COMMANDS,
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


class _OneLineNotes(logging.Handler):
    """Prints featx's INFO log records (e.g. which runtime ``auto`` chose) as one ``featx:`` line on stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"featx: {record.getMessage()}", file=sys.stderr)


@contextlib.contextmanager
def _featx_notes():
    """Show featx's notes (logger ``featx``, INFO) on stderr while a command runs; restore the logger after."""
    logger, handler = logging.getLogger("featx"), _OneLineNotes(logging.INFO)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


#: The exit code when stdout's reader goes early (``featx cv --json | head -1``): 128 + SIGPIPE, what
#: a shell reports for ``cat``, ``grep`` or ``seq`` stopped the same way.
EXIT_BROKEN_PIPE = 128 + 13


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll flags it POLLERR; POLLHUP on some systems).

    A stdout without a file descriptor (captured by a caller) cannot have raised the BrokenPipeError.
    """
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    if not hasattr(select, "poll"):  # Windows: no way to ask; stdout is by far the likeliest pipe
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _stop_writing_stdout() -> int:
    """End quietly after stdout's reader went: stdout points at devnull, so that Python's flush at exit
    cannot raise again (as Python's docs recommend, "Note on SIGPIPE"); returns :data:`EXIT_BROKEN_PIPE`.

    The exit code is 141, not 0: the output was cut short, and a pipeline under ``set -o pipefail``
    fails as it does for any Unix tool that SIGPIPE ended; without pipefail only ``head``'s status counts.
    """
    with contextlib.suppress(AttributeError, OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return EXIT_BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``featx`` console script; returns the exit code.

    A :class:`~featx.exceptions.FeatxError` is one line on stderr and exit code 1. When stdout's
    reader goes early (``featx cv --json | head -1``) the command ends quietly with exit code
    :data:`EXIT_BROKEN_PIPE`, as Unix tools do.
    """
    try:
        try:
            code = _run(build_parser(), argv)
        except SystemExit:  # --help and --version print, then exit
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # a reader that has gone shows here, not in Python's flush at exit
        return code
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise  # another pipe broke: a bug, it keeps its traceback
        return _stop_writing_stdout()


def _cache_dir_of(args: argparse.Namespace):
    """The scope in which a command given ``--cache DIR`` runs: everything featx caches goes under DIR
    (the layer tables too, not ./cache), whatever ``$FEATX_CACHE`` says; a ``.h5`` store file: its folder."""
    folder = getattr(args, "cache", None)
    if not folder:
        return contextlib.nullcontext()
    path = Path(folder)
    return using_cache_dir(path.parent if path.suffix == ".h5" else path)


def _run(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse ``argv`` and run its command: a FeatxError is one line on stderr, a FeatxWarning too."""
    args = parser.parse_args(argv)
    with warnings.catch_warnings(), _featx_notes():  # restores the caller's showwarning when the command ends
        warnings.showwarning = _one_line_featx_warnings(warnings.showwarning)
        try:
            with _cache_dir_of(args):
                return int(args.func(args) or 0)
        except FeatxError as exc:
            print(f"featx: error: {exc}", file=sys.stderr)
            return 1
