"""Tests of ``pipelines/layer_depth.py``, run as a script on a tiny setting."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from featx.compare import best_row

SCRIPT = Path(__file__).resolve().parents[1] / "pipelines" / "layer_depth.py"
TINY_RUN = ["--per-class", "5", "--models", "featx_tiny_cnn", "--cv", "2", "--device", "cpu"]


@pytest.fixture(scope="module")
def layer_depth():
    """The script loaded as a module, to call its ``main`` in process for the cheap checks."""
    spec = importlib.util.spec_from_file_location("pipelines_layer_depth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, tmp_path, env=None):
    """Run the pipeline in ``tmp_path`` with its feature store there; return the finished process."""
    environment = {**os.environ, "FEATX_CACHE": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=tmp_path, env=environment,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


@pytest.mark.slow
@pytest.mark.weights
def test_layer_depth_writes_table_plot_and_advice(tmp_path):
    """Check that the study writes CSV, JSON, PNG and advice, and prints the best layer and verdict."""
    out = tmp_path / "out"
    done = run_script("--datasets", "digits", *TINY_RUN, "--out", str(out), tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    folder = out / "digits"
    for name in ("compare.csv", "compare.json", "compare.png", "advice.json"):
        assert (folder / name).stat().st_size > 0, name
    rows = json.loads((folder / "compare.json").read_text())
    assert [row["layer"] for row in rows] == ["stem", "stage1", "stage2", "stage3", "pre_logits"]
    assert {row["n_images"] for row in rows} == {50}
    best = best_row(rows)
    printed = re.search(r"^best layer: featx_tiny_cnn (\S+) / avg / logreg: accuracy ([\d.]+)", done.stdout, re.M)
    assert printed, done.stdout
    assert printed.group(1) == best["layer"]
    assert float(printed.group(2)) == pytest.approx(best["accuracy_mean"], abs=5e-4)
    advice = json.loads((folder / "advice.json").read_text())
    assert advice["measured_best"]["layer"] == best["layer"]
    assert f"advisor: {advice['quadrant']}" in done.stdout
    assert f"recommendation: {advice['recommendation']}" in done.stdout
    assert f"agrees with the table: {'yes' if advice['agrees'] else 'no'}" in done.stdout


def test_layer_depth_skips_missing_fashion_mnist(tmp_path):
    """Check that absent Fashion-MNIST files skip that dataset with an install hint on stderr."""
    empty = tmp_path / "no-fashion-mnist"
    empty.mkdir()
    out = tmp_path / "out"
    done = run_script("--datasets", "digits,fashion-mnist", *TINY_RUN, "--no-advice", "--out", str(out),
                      tmp_path=tmp_path, env={"FEATX_FASHION_MNIST_DIR": str(empty)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "skipped fashion-mnist" in done.stderr
    assert "apt-get install dataset-fashion-mnist" in done.stderr
    assert "Traceback" not in done.stderr
    assert (out / "digits" / "compare.png").is_file()
    assert not (out / "digits" / "advice.json").exists()
    assert not (out / "fashion-mnist").exists()
    assert "best layer: featx_tiny_cnn" in done.stdout


def test_layer_depth_fails_when_no_dataset_can_be_studied(layer_depth, tmp_path, monkeypatch, capsys):
    """Check that the script exits 1 with a message when every dataset is skipped."""
    monkeypatch.setenv("FEATX_FASHION_MNIST_DIR", str(tmp_path))
    code = layer_depth.main(["--datasets", "fashion-mnist", *TINY_RUN, "--out", str(tmp_path / "out")])
    assert code == 1
    stderr = capsys.readouterr().err
    assert "apt-get install dataset-fashion-mnist" in stderr
    assert "no dataset could be studied" in stderr
    assert not (tmp_path / "out").exists()


def test_layer_depth_rejects_unknown_dataset(layer_depth, capsys):
    """Check that an unknown dataset name is a usage error (exit 2) that lists the known ones."""
    with pytest.raises(SystemExit) as exit_info:
        layer_depth.main(["--datasets", "digitz"])
    assert exit_info.value.code == 2
    assert "unknown dataset 'digitz'; expected some of digits, fashion-mnist" in capsys.readouterr().err


def test_layer_depth_reports_featx_errors_in_one_line(layer_depth, tmp_path, capsys):
    """Check that a featx error (an unknown backbone) exits 1 with one line on stderr."""
    code = layer_depth.main(["--datasets", "digits", "--per-class", "2", "--models", "no_such_net", "--no-advice",
                             "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 1
    stderr = capsys.readouterr().err
    assert re.fullmatch(r"error: digits: Unknown backbone 'no_such_net'\..*\n", stderr)
