"""The scripts in pipelines/ run end to end: once as a user runs them (a subprocess), and in
process (through their ``main``) for the cheaper checks of options and exit codes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, make_images

GRID_SEARCH = Path(__file__).resolve().parents[1] / "pipelines" / "grid_search.py"


@pytest.fixture
def png_folder(tmp_path):
    """3 classes × 6 synthetic PNGs in class sub-folders."""
    arrays, labels = make_images(n_per_class=6, n_classes=3)
    root = tmp_path / "pngs"
    for i, (array, label) in enumerate(zip(arrays, labels)):
        (root / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(root / label / f"img{i:02d}.png")
    return root


def run_script(script: Path, *args: str, cache: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FEATX_CACHE": str(cache)}
    return subprocess.run(
        [sys.executable, str(script), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def load_script(script: Path):
    spec = importlib.util.spec_from_file_location(f"pipelines_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_search_prints_ratio_and_best_params(png_folder, tmp_path):
    """Check that grid_search.py exits 0, prints the timings, ratio, best params and table, and cleans up."""
    cache = tmp_path / "cache"
    done = run_script(GRID_SEARCH, str(png_folder), "--model", TINY, "--layers", "stage1,stage2,pre_logits",
                      "--C", "0.1,1", "--cv", "2", cache=cache, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "18 images of" in out and "(3 classes)" in out
    assert "extraction (one pass, 3 layers, fresh store):" in out
    assert "grid search (6 points × 2 folds + refit = 13 fits, fresh store, BLAS threads: 1):" in out
    assert "ratio grid / extraction: " in out
    assert "best params: layer=" in out and "best score: " in out
    rows = [line.split()[:2] for line in out.splitlines() if line.startswith(("stage1 ", "stage2 ", "pre_logits "))]
    grid = [[layer, c] for layer in ("stage1", "stage2", "pre_logits") for c in ("0.1000", "1.0000")]
    assert sorted(rows) == sorted(grid)  # one table row per grid point
    # the two fresh stores are removed; the layer tables and the runtime memory stay
    assert sorted(p.name for p in cache.iterdir()) == ["layers", "runtimes"]


def test_grid_search_json(png_folder, tmp_path, capsys):
    """Check that --json gives the figures as data a script can read."""
    code = load_script(GRID_SEARCH).main([str(png_folder), "--model", TINY, "--layers", "stage2,stage3", "--C", "1",
                                          "--cv", "2", "--json", "--cache", str(tmp_path / "stores")])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_images"] == 18 and report["n_computed"] == 18 and report["n_fits"] == 5
    assert report["ratio"] == pytest.approx(report["grid_s"] / report["extract_s"])
    assert report["best_params"]["layer"] in ("stage2", "stage3") and report["best_params"]["C"] == 1.0
    assert len(report["results"]) == 2 and report["best_score"] > 0.9
    assert list((tmp_path / "stores").iterdir()) == []


def test_grid_search_featx_error_exits_1(png_folder, capsys):
    """Check that a featx error (a layer the model lacks) is one line on stderr and exit code 1."""
    code = load_script(GRID_SEARCH).main([str(png_folder), "--model", TINY, "--layers", "stage3,stage4", "--cv", "2"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("error: Unknown layer 'stage4'") and err.count("\n") == 1


def test_grid_search_rejects_bad_c(png_folder, capsys):
    """Check that a malformed --C is an argparse usage error (exit code 2) naming the value."""
    with pytest.raises(SystemExit) as exc:
        load_script(GRID_SEARCH).main([str(png_folder), "--C", "0.1,big"])
    assert exc.value.code == 2 and "'0.1,big'" in capsys.readouterr().err


RAY_SCALING = Path(__file__).resolve().parents[1] / "pipelines" / "ray_scaling.py"


def test_ray_scaling_measures_local_and_ray_workers(tmp_path):
    """Check that pipelines/ray_scaling.py times local and 1-worker Ray runs and the store's write rate."""
    pytest.importorskip("ray")
    result = run_script(RAY_SCALING, "--n", "8", "--model", TINY, "--workers", "1", "--json",
                        cache=tmp_path / "c", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [run["run"] for run in report["runs"]] == ["local", "ray x1"]
    assert all(run["n"] == 8 and run["images_per_s"] > 0 for run in report["runs"])
    assert [w["batch_rows"] for w in report["store_writes"]] == [32, 256]


def test_ray_scaling_rates_hash_decode_merge(tmp_path):
    """Check that --rates measures hashing, decoding and merging on generated JPEGs."""
    script = load_script(RAY_SCALING)
    from featx.bench import make_jpegs

    rates = script.per_core_rates(make_jpegs(tmp_path / "jpegs", 4), model=TINY, merge_rows=100, dim=8)
    assert rates["files"] == 4 and rates["merge_rows"] == 100
    assert min(rates["hash_files_per_s"], rates["decode_images_per_s"], rates["merge_rows_per_s"]) > 0


def test_grid_search_ratio_prints_each_figure_and_ratio(capsys):
    """Check that the acceptance script times extraction and grid alone and beside a neighbour, one line each."""
    spec = importlib.util.spec_from_file_location("grid_search_ratio", GRID_SEARCH.with_name("grid_search_ratio.py"))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--n", "30", "--model", TINY, "--layers", "stage1,stage2,pre_logits", "--busy-images", "4",
                        "--json"]) == 0
    out = capsys.readouterr().out
    for condition in ("alone", "busy"):
        assert f"[{condition}] GridSearchCV" in out and f"[{condition}] ratio grid / extraction:" in out
    report = json.loads(out[out.index("{"):])
    assert report["alone"]["ratio"] == report["alone"]["grid_s"] / report["alone"]["extract_s"] > 0
    assert report["busy"]["best_params"]["cnnfeatures__layer"] in ("stage1", "stage2", "pre_logits")


FINETUNE_BENCH = Path(__file__).resolve().parents[1] / "pipelines" / "finetune_bench.py"


def test_finetune_bench_times_each_variant_and_the_ratio(png_folder, tmp_path):
    """Check that finetune_bench.py runs featx finetune of an 'old' checkout (here: this one), of this one and
    the plain loop on the same cached maps, and reports their epoch seconds, ratios and accuracies as JSON."""
    cache = tmp_path / "cache"
    done = run_script(FINETUNE_BENCH, str(png_folder), "--val", str(png_folder), "--model", TINY, "--from", "stage1",
                      "--epochs", "2", "--batch-size", "8", "--val-split", "0.34", "--old", str(FINETUNE_BENCH.parents[1]), "--cache",
                      str(cache), "--json", cache=cache, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    rows = report["rows"]
    assert list(rows) == ["old", "featx", "featx-fp32", "plain"]
    assert rows["featx-fp32"]["train_precision"] == "fp32"
    for row in rows.values():
        assert len(row["epoch_seconds"]) == 2 and row["epoch_median"] > 0 and 0 <= row["val_accuracy"] <= 1
        assert row["speedup_vs_old"] == pytest.approx(rows["old"]["epoch_median"] / row["epoch_median"])
    assert rows["old"]["n_computed"] == 18 and rows["featx"]["n_computed"] == 0  # the maps are extracted once


def test_finetune_bench_refuses_old_without_a_checkout(capsys):
    """Check that asking for the 'old' variant without --old exits 2 with the variants named."""
    module = load_script(FINETUNE_BENCH)
    with pytest.raises(SystemExit) as exc:
        module.main(["data", "--variants", "old,featx"])
    assert exc.value.code == 2
    assert "'old' needs --old PATH" in capsys.readouterr().err


ACCURACY = Path(__file__).resolve().parents[1] / "pipelines" / "accuracy.py"


def _neu_steel_folders(tmp_path, *, n_per_class: int, seed: int) -> Path:
    """A stand-in for ../shared/data: neu_steel/{train,val}/<class>/ of 3 classes, every third image in val."""
    arrays, labels = make_images(n_per_class=n_per_class, n_classes=3, seed=seed)
    data = tmp_path / "data"
    for i, (array, label) in enumerate(zip(arrays, labels)):
        split = "val" if i % 3 == 0 else "train"
        (data / "neu_steel" / split / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(data / "neu_steel" / split / label / f"{i:02d}.png")
    return data


def test_accuracy_pipeline_scores_old_and_new_defaults_on_a_held_out_part(tmp_path, capsys):
    """Check that accuracy.py fits each method on the training part only and scores it once on the held-out part."""
    data = _neu_steel_folders(tmp_path, n_per_class=18, seed=3)  # 12 train and 6 val images per class
    accuracy = load_script(ACCURACY)
    out = tmp_path / "accuracy.json"
    assert accuracy.main(["--rows", "neu_steel@5,neu_steel@10", "--methods", "old,new", "--model", TINY,
                          "--data", str(data), "--cache", str(tmp_path / "c"), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["data"], r["method"], r["n_train"], r["n_test"]) for r in rows] == [
        ("neu_steel@5", "old", 15, 18), ("neu_steel@5", "new", 15, 18),
        ("neu_steel@10", "old", 30, 18), ("neu_steel@10", "new", 30, 18)]
    for row in rows:
        assert 0 <= row["accuracy"] <= 1 and row["se"] == pytest.approx((row["accuracy"] * (1 - row["accuracy"]) / 18) ** 0.5)
    assert rows[0]["chosen"] == "pre_logits/avg" and rows[1]["chosen"].endswith("/avg")
    printed = capsys.readouterr()
    assert "neu_steel@10" in printed.out and "skipping clothing_small" in printed.err
    with pytest.raises(SystemExit):
        accuracy.main(["--methods", "old,best"])


FEATURE_VARIANTS = Path(__file__).resolve().parents[1] / "pipelines" / "feature_variants.py"


@pytest.mark.weights
def test_feature_variants_scores_every_variant_on_the_held_out_part(tmp_path, capsys):
    """Check that feature_variants.py scores each variant once on a row's held-out part and marks the row's best."""
    data = _neu_steel_folders(tmp_path, n_per_class=12, seed=4)  # 8 train and 4 val images per class
    variants = load_script(FEATURE_VARIANTS)
    out = tmp_path / "variants.json"
    assert variants.main(["--rows", "neu_steel@5", "--data", str(data), "--cache", str(tmp_path / "c"),
                          "--out", str(out)]) == 0
    scores = json.loads(out.read_text())["neu_steel@5"]
    assert list(scores) == list(variants.VARIANTS)
    for score in scores.values():
        assert 0 <= score["accuracy"] <= 1
        assert score["se"] == pytest.approx((score["accuracy"] * (1 - score["accuracy"]) / 12) ** 0.5)
    printed = capsys.readouterr().out
    assert "neu_steel@5" in printed and "*" in printed and "stage5 power+l2" in printed
