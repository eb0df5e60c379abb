"""Progress bars: when featx shows one, and the one bar of a long piece of work.

Every bar of featx (extraction, cross-validation, the ``--auto`` search) is decided by the
``progress`` setting of :class:`~featx.options.ExtractOptions` (or a function's own ``progress=``
argument) through :func:`show_progress`: ``True`` always, ``False`` never, ``None`` only when
stderr is a terminal and the ``CI`` environment variable is not set to a true value. The bars are
tqdm's, written to stderr and removed when done (``leave=False``), so a pipe, a log file or a CI
job gets no bar and a terminal keeps only the results.

This module imports nothing heavy; tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import os
import sys

__all__ = ["Progress", "show_progress", "stderr_is_terminal"]

_FALSE = ("", "0", "false", "no", "off")


def show_progress(progress: bool | None) -> bool:
    """Whether a bar is shown for the setting ``progress`` (True, False, or None: terminal only).

    ``None`` means: stderr is a terminal and ``$CI`` is unset or false (``CI=true`` is what
    GitHub Actions, GitLab CI and most CI services set).

    Examples
    --------
    >>> show_progress(True), show_progress(False)
    (True, False)
    """
    if progress is not None:
        return bool(progress)
    if os.environ.get("CI", "").strip().lower() not in _FALSE:
        return False
    return stderr_is_terminal()


def stderr_is_terminal() -> bool:
    """Whether ``sys.stderr`` is a terminal (False without a stderr, or with a closed one)."""
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def _width() -> dict:
    """tqdm's size: the terminal's, followed as it is resized; 100 × 20 where the terminal says 0 × 0 or
    cannot say (a pseudo-terminal nobody sized, as under ``script``), where tqdm would draw nothing."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):
        size = os.terminal_size((0, 0))
    return {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 20}


class Progress:
    """One bar over a piece of work counted in units (outer folds, grid fits), naming what is scored.

    A disabled bar does nothing, so that code can advance it unconditionally. Several calls of
    :func:`featx.heads.evaluate` can advance one bar (``featx compare`` shows one bar over all
    its rows), and the total can grow while the work runs (the ``--auto`` search). A bar made
    without a total gets it from the first function that counts its own units
    (:meth:`expect`): ``featx fit`` names what it tunes, and :func:`featx.heads.fit_head`, which
    alone knows its grid, says how many fits that is.

    Parameters
    ----------
    total : int or None
        Units of work expected; None: set by the first :meth:`expect`.
    enabled : bool or None
        As for :func:`show_progress`.
    unit : str, default="fold"
    desc : str, default=""
        What is being done, shown before the bar.

    Examples
    --------
    >>> with Progress(10, enabled=False) as bar:
    ...     bar.describe("cv stage1/avg logreg")
    ...     bar.advance(3)
    >>> bar.n, bar.description
    (3, 'cv stage1/avg logreg')
    """

    def __init__(self, total: int | None, *, enabled: bool | None, unit: str = "fold", desc: str = ""):
        self.total = None if total is None else int(total)
        self.n = 0
        self.description = desc
        self.unit = unit
        self._shown = show_progress(enabled)
        self._bar = None
        if self.total is not None:
            self._open()

    def _open(self) -> None:
        """Draw the bar (once its total is known, so that it never shows a count without a total)."""
        if self._shown and self._bar is None:
            from tqdm.auto import tqdm  # only when a bar is shown

            self._bar = tqdm(total=self.total, initial=self.n, unit=self.unit, desc=self.description, leave=False,
                             **_width())

    @property
    def enabled(self) -> bool:
        """Whether a bar is shown (drawn as soon as its total is known)."""
        return self._shown

    def describe(self, text: str) -> None:
        """Name what is being done now (shown at once)."""
        self.description = text
        if self._bar is not None:
            self._bar.set_description_str(text, refresh=True)

    def advance(self, n: int = 1) -> None:
        """Count ``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def expect(self, n: int) -> None:
        """Called by a function that does ``n`` units of work on this bar: they become its total if
        it has none yet (otherwise the caller's total already counts them)."""
        if self.total is None:
            self.add_total(n)

    def add_total(self, n: int) -> None:
        """Expect ``n`` more units (or fewer, with a negative ``n``)."""
        self.total = (self.total or 0) + n
        if self._bar is None:
            self._open()
        else:
            self._bar.total = self.total
            self._bar.refresh()

    def close(self) -> None:
        self._shown = False
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
