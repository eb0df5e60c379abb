"""Tests of featx.progress: when a bar is shown, and the bar itself."""

from __future__ import annotations

import pytest

from featx import progress
from featx.progress import Progress, show_progress


@pytest.mark.parametrize("ci, terminal, expected", [
    (None, True, True), (None, False, False), ("true", True, False), ("1", True, False), ("false", True, True),
    ("0", True, True),
])
def test_show_progress_none_means_a_terminal_outside_ci(monkeypatch, ci, terminal, expected):
    """Check that progress=None shows a bar only on a terminal with $CI unset or false."""
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: terminal)
    assert show_progress(None) is expected


def test_show_progress_true_and_false_are_obeyed(monkeypatch):
    """Check that True and False win over the terminal and CI checks."""
    monkeypatch.setenv("CI", "true")
    assert show_progress(True) is True
    monkeypatch.delenv("CI")
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: True)
    assert show_progress(False) is False


def test_progress_draws_description_and_total_then_clears(capsys):
    """Check that a shown bar writes its description and count on stderr, and that a disabled one writes nothing."""
    with Progress(4, enabled=True, desc="cv stage1/avg logreg [1/2]") as bar:
        bar.advance(2)
        bar.describe("cv stage2/avg logreg [2/2]")
    err = capsys.readouterr().err
    assert "cv stage1/avg logreg [1/2]" in err and "cv stage2/avg logreg [2/2]" in err and "| 0/4 " in err
    with Progress(4, enabled=False, desc="quiet") as bar:
        bar.advance(4)
    assert capsys.readouterr().err == "" and bar.n == 4


def test_progress_without_total_is_drawn_once_a_function_expects_its_units(capsys):
    """Check that a bar made without a total shows nothing until expect(), which sets it once."""
    bar = Progress(None, enabled=True, unit="fit", desc="tune stage1/avg logreg")
    assert capsys.readouterr().err == ""
    bar.expect(13)
    bar.expect(99)  # the total is set: later counts are the caller's
    bar.advance(13)
    bar.close()
    assert bar.total == 13 and "| 0/13 " in capsys.readouterr().err
