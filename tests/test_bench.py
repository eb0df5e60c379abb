import json

import pytest

from PIL import Image

from featx.bench import make_jpegs, run_bench, run_busy_bench
from featx.cli import main


def test_make_jpegs_writes_class_folders(tmp_path):
    """Check that generated benchmark images are 500x375 JPEGs in class folders."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    files = sorted(folder.rglob("*.jpg"))
    assert len(files) == 4 and {f.parent.name for f in files} == {"class0", "class1"}
    with Image.open(files[0]) as image:
        assert image.size == (500, 375) and image.format == "JPEG"


def test_run_bench_reports_documented_keys(tmp_path):
    """Check that the benchmark runs the three measurements and reports every documented key."""
    folder = make_jpegs(tmp_path / "imgs", 8)
    report = run_bench(folder, model="featx_tiny_cnn", batch_size=4, device="cpu", out=lambda line: None)
    for key in ["naive_images_per_s", "featx_images_per_s", "model_only_images_per_s", "speedup_vs_naive",
                "fraction_of_model_limit", "peak_rss_mb"]:
        assert report[key] > 0, key
    assert report["n_images"] == 8
    assert report["speedup_vs_naive"] == report["featx_images_per_s"] / report["naive_images_per_s"]


def test_cli_bench_json(tmp_path, capsys):
    """Check that 'featx bench DIR --json' prints the report as JSON."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    assert main(["bench", str(folder), "--model", "featx_tiny_cnn", "--batch-size", "2", "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 4


@pytest.mark.slow
def test_run_bench_compile_reports_compiled_limit(tmp_path):
    """Check that bench --compile adds the compiled model-only limit and the compile time."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    report = run_bench(folder, model="featx_tiny_cnn", batch_size=2, device="cpu", compile=True, out=lambda line: None)
    assert report["model_only_compiled_images_per_s"] > 0 and report["compile_seconds"] > 0
    assert report["featx_compiled_images_per_s"] > 0 and report["featx_compile_seconds"] > 0
    assert report["compiled_speedup_vs_naive"] > 0 and report["compiled_fraction_of_compiled_limit"] > 0
    assert report["decoder"] == "pil"


def test_run_bench_onnxruntime_reports_its_rate_and_limit(tmp_path):
    """Check that bench --runtime onnxruntime adds featx's and the model-only rates with ONNX Runtime."""
    pytest.importorskip("onnxruntime")
    folder = make_jpegs(tmp_path / "imgs", 4)
    report = run_bench(folder, model="featx_tiny_cnn", batch_size=2, device="cpu", runtime="onnxruntime",
                       out=lambda line: None)
    assert report["onnx_images_per_s"] > 0 and report["model_only_onnx_images_per_s"] > 0
    assert report["onnx_export_seconds"] > 0 and report["onnx_speedup_vs_naive"] > 0
    assert "model_only_compiled_images_per_s" not in report


def test_run_busy_bench_reports_default_against_best(tmp_path):
    """Check that bench --busy measures each thread setting beside a neighbour and reports best over default."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    report = run_busy_bench(folder, model="featx_tiny_cnn", batch_size=2, device="cpu", n=4, settings=("auto", 1, None),
                            settle_s=0.5, out=lambda line: None)
    assert [row["threads"] for row in report["results"]] == ["auto", 1, None]
    assert report["default_threads"] == "auto" and report["n_images"] == 4
    best = max(row["images_per_s"] for row in report["results"])
    assert report["best_images_per_s"] == best
    assert report["best_over_default"] == best / report["default_images_per_s"] >= 1.0


def test_cli_bench_busy_prints_each_setting(tmp_path, capsys, monkeypatch):
    """Check that 'featx bench --busy' prints one line per thread setting and the best / default ratio."""
    import featx.bench

    monkeypatch.setattr(featx.bench, "available_cores", lambda: 1)
    folder = make_jpegs(tmp_path / "imgs", 2)
    assert main(["bench", str(folder), "--busy", "--model", "featx_tiny_cnn", "--batch-size", "2", "--device", "cpu",
                 "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "threads=auto" in out and "threads=None" in out and "best / default (threads=auto)" in out
