import json

import pytest

from PIL import Image

from featx.bench import STAGES, breakdown, loop_limit, make_jpegs, run_bench, run_busy_bench
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
    report = run_bench(folder, model="featx_tiny_cnn", batch_size=4, device="cpu", runtime="torch",
                       out=lambda line: None)
    for key in ["naive_images_per_s", "featx_images_per_s", "model_only_images_per_s", "speedup_vs_naive",
                "fraction_of_model_limit", "peak_rss_mb"]:
        assert report[key] > 0, key
    assert report["n_images"] == 8
    assert report["speedup_vs_naive"] == report["featx_images_per_s"] / report["naive_images_per_s"]
    assert report["decode_only_images_per_s"] > 0
    assert report["loop_limit_images_per_s"] == pytest.approx(
        1 / (1 / report["model_only_images_per_s"] + 1 / report["decode_only_images_per_s"]))
    assert report["fraction_of_loop_limit"] == report["featx_images_per_s"] / report["loop_limit_images_per_s"]
    stages = report["breakdown_ms_per_image"]
    assert list(stages) == list(STAGES) and all(ms >= 0 for ms in stages.values())
    assert stages["decode"] > 0 and stages["network"] > 0 and stages["hash"] > 0 and stages["write"] > 0
    # decoded in this process's threads (the CPU default): the stages are the whole time per image
    assert sum(stages.values()) == pytest.approx(1000 / report["featx_images_per_s"], rel=1e-3, abs=0.01)


def test_breakdown_counts_decoding_in_workers_as_overlapped():
    """Check that decoding in worker processes is reported but not taken out of the main process's time."""
    timings = {"hash": 0.1, "decode": 0.0, "decode_workers": 0.8, "handover": 0.2, "network": 0.5, "write": 0.1}
    stages = breakdown(timings, 1.0, 100)
    assert stages == {"decode": 8.0, "hash": 1.0, "handover": 2.0, "network": 5.0, "write": 1.0, "other": 1.0}
    assert loop_limit(60.0, 120.0) == pytest.approx(40.0)


def test_cli_bench_json(tmp_path, capsys):
    """Check that 'featx bench DIR --json' prints the report as JSON."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    assert main(["bench", str(folder), "--model", "featx_tiny_cnn", "--batch-size", "2", "--device", "cpu", "--runtime",
                 "torch", "--json"]) == 0
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


@pytest.mark.slow
def test_run_bench_auto_reports_the_choice_and_its_figures(tmp_path):
    """Check that bench with runtime='auto' (the default) prints and reports auto's choice and every runtime's figures."""
    pytest.importorskip("onnxruntime")
    folder = make_jpegs(tmp_path / "imgs", 4)
    lines = []
    report = run_bench(folder, model="featx_tiny_cnn", batch_size=2, device="cpu", out=lines.append)
    figures = report["auto_figures"]
    assert {"torch", "onnxruntime"} <= set(figures) and figures["onnxruntime"]["verified"]
    assert figures["torch"]["images_per_s"] > 0 and figures["onnxruntime"]["cosine"] >= 0.9999
    assert report["auto_runtime"] in figures and report["auto_images_per_s"] > 0
    assert report["auto_speedup_vs_naive"] == pytest.approx(report["auto_images_per_s"] / report["naive_images_per_s"])
    assert report["auto_fraction_of_loop_limit"] == pytest.approx(
        report["auto_images_per_s"] / report["auto_loop_limit_images_per_s"])
    assert any(line.startswith(f"    auto chose {report['auto_runtime']}: ") for line in lines)
    assert "measured every runtime on one batch of 2" in report["auto_reason"]


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


@pytest.mark.slow
def test_cli_bench_summary_reports_the_default_runtime(tmp_path, capsys):
    """Check that 'featx bench DIR' (runtime auto, the default) sums up featx's default, not only eager torch."""
    folder = make_jpegs(tmp_path / "imgs", 4)
    assert main(["bench", str(folder), "--model", "featx_tiny_cnn", "--batch-size", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    default = next(line for line in out.splitlines() if line.startswith("  featx's default (runtime auto: "))
    assert "x the naive loop" in default and "of its own loop limit" in default
    assert "; eager torch: speedup vs naive" in out
