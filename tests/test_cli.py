import json
import re
import subprocess
import sys

from featx.cli import format_table, main


def test_cli_models_marks_offline(capsys):
    """Check that 'featx models' lists the Lite models as working offline."""
    assert main(["models", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["efficientnet_lite0"]["offline"] is True
    assert rows["resnet50"]["offline"] is False


def test_cli_layers_lists_aliases_with_dimensions(capsys):
    """Check that 'featx layers efficientnet_lite0' prints at least 7 aliases with node and dimensions."""
    assert main(["layers", "efficientnet_lite0"]) == 0
    out = capsys.readouterr().out
    for alias in ["stem", "stage1", "stage2", "stage3", "stage4", "stage5", "pre_logits", "logits"]:
        assert f"\n{alias} " in out
    assert "blocks.4" in out and "14×14" in out and "1600" in out


def test_cli_layers_unknown_model_is_one_line_exit_1(capsys):
    """Check that a FeatxError becomes one line on stderr and exit code 1."""
    assert main(["layers", "resnet5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "Unknown backbone 'resnet5'" in err and "featx models" in err


def _table(folder, header: str):
    """A CSV in `folder` listing its class sub-folders' images under `header` (path column first)."""
    rows = [f"{image.relative_to(folder).as_posix()},{image.parent.name}" for image in sorted(folder.rglob("img*"))]
    table = folder / "list.csv"
    table.write_text("\n".join([header, *rows]) + "\n")
    return table


def test_cli_cv_csv_header_typo_suggests_path_and_label(capsys, image_folder, tmp_path):
    """Check that 'featx cv' on a CSV headed 'paht,lable' exits 1 with one line naming the columns and their fixes."""
    table = _table(image_folder, "paht,lable")
    assert main(["cv", str(table), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "has no 'path' column: expected a header with 'path' and, for labelled data, 'label'" in err
    assert "found ['paht', 'lable']" in err and "Did you mean 'paht'" not in err
    assert "Column 'paht' looks like 'path' and column 'lable' looks like 'label': rename them in the header" in err


def test_cli_cv_csv_without_label_column_names_it_before_extracting(capsys, image_folder, tmp_path):
    """Check that 'featx cv' on a CSV headed 'path,labl' exits 1 before extracting, naming 'labl' and suggesting 'label'."""
    table = _table(image_folder, "path,labl")
    assert main(["cv", str(table), "--cache", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{table} has no labels: 'featx cv' needs classes: a folder of class sub-folders, a CSV with a 'label'" in err
    assert "Its header has the columns ['path', 'labl'] and no 'label' column; column 'labl' looks like 'label'" in err
    assert not (tmp_path / "cache").exists()  # refused before any extraction


def test_cli_python_dash_m_help():
    """Check that 'python -m featx --help' works and shows an example."""
    result = subprocess.run([sys.executable, "-m", "featx", "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in result.stdout and "layers" in result.stdout


def test_cli_closed_stdout_pipe_ends_quietly_with_141():
    """Check that a reader closing stdout early (featx models --json | head -c 10) ends featx quietly with 141."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before featx writes: every write breaks the pipe
    try:
        result = subprocess.run([sys.executable, "-m", "featx.cli", "models", "--json"], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.returncode == 141
    assert result.stderr == ""


def test_cli_other_broken_pipe_keeps_its_traceback(monkeypatch):
    """Check that a BrokenPipeError while stdout still works is not taken for a closed stdout: it propagates."""
    import featx.cli

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(featx.cli._COMMANDS, "models", (broken, featx.cli._COMMANDS["models"][1]))
    with pytest.raises(BrokenPipeError, match="Broken pipe"):
        main(["models"])


def test_format_table_aligns_columns():
    """Check that tables are aligned and floats rounded."""
    text = format_table([{"name": "a", "value": 0.123456}, {"name": "long", "value": 2.0}])
    assert text.splitlines() == ["name  value", "----  ------", "a     0.1235", "long  2.0000"]


# --------------------------------------------------------------------------- extract and cache

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featx.store import FeatureStore

from conftest import make_images


def _folder(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(40, 40, 3), dtype=np.uint8)).save(folder / f"{i:04d}.png")
    return root


def _featx(*args, cache, **kwargs):
    env = {**os.environ, "FEATX_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "featx", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


EXTRACT = ["--model", "featx_tiny_cnn", "--layers", "stage2,pre_logits", "--pool", "avg,spp",
           "--batch-size", "2", "--workers", "0", "--device", "cpu"]


def _interrupt_when_segments(proc, cache: Path, count: int, signum) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        segments = list(cache.glob("*.journal/seg-*.npz"))
        if len(segments) >= count:
            proc.send_signal(signum)
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended before it could be interrupted: {proc.communicate()}")


def _all_rows(cache: Path) -> dict:
    [path] = cache.glob("*.h5")
    with FeatureStore(path) as store:
        keys = list(store.keys)
        return {entry: dict(zip(keys, store.read(keys, *entry))) for entry in store.entries}


def test_cli_extract_interrupted_then_resumed_equals_clean_run(tmp_path):
    """Check that SIGINT and SIGTERM keep completed batches and a resumed run equals a clean one."""
    data = _folder(tmp_path / "data", 400)
    cache = tmp_path / "resumed"
    for signum in (signal.SIGINT, signal.SIGTERM):
        proc = _featx("extract", str(data), *EXTRACT, cache=cache)
        _interrupt_when_segments(proc, cache, 5 if signum == signal.SIGINT else 120, signum)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        assert "interrupted" in err and "run the same command again to resume" in err
        partial = _all_rows(cache)
        assert 0 < len(partial[("stage2", "avg")]) < 400
    proc = _featx("extract", str(data), *EXTRACT, cache=cache)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "400 images" in out and "images/s" in out
    clean = tmp_path / "clean"
    proc = _featx("extract", str(data), *EXTRACT, cache=clean)
    assert proc.communicate(timeout=300) and proc.returncode == 0
    resumed, expected = _all_rows(cache), _all_rows(clean)
    assert resumed.keys() == expected.keys()
    for entry in expected:
        assert resumed[entry].keys() == expected[entry].keys()
        for key, row in expected[entry].items():
            np.testing.assert_array_equal(resumed[entry][key], row)


SHARED = [*EXTRACT, "--batch-size", "8", "--json"]
TINY_SETTINGS = dict(backbone="featx_tiny_cnn", layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu",
                     num_workers=0)  # what EXTRACT asks for, in Python


def test_cli_extract_two_runs_at_once_share_the_work(tmp_path):
    """Check that two simultaneous 'featx extract' of 200 images into one store compute them about once together."""
    from featx.extraction import extract
    from featx.images import content_key

    data = _folder(tmp_path / "data", 200)
    cache = tmp_path / "shared"
    # The store exists already (one other image): both runs then look it up at once and, before
    # the work was shared, both computed all 200 images (the second one waiting for the lock).
    extract(make_images(1, 1, seed=1)[0], store=cache, **TINY_SETTINGS)
    runs = [_featx("extract", str(data), *SHARED, "--cache", str(cache), cache=cache) for _ in range(2)]
    reports = []
    for proc in runs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        reports.append(json.loads(out))
    for report in reports:
        assert report["n_images"] == report["n_kept"] == 200
        assert report["n_computed"] + report["n_from_other_processes"] + report["n_from_store"] == 200, report
    assert sum(report["n_computed"] for report in reports) <= 1.3 * 200, reports
    store = reports[0]["store"]
    assert reports[1]["store"] == store
    verify = subprocess.run([sys.executable, "-m", "featx", "cache", "verify", store, "--json"], capture_output=True,
                            text=True, timeout=300)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    checked = json.loads(verify.stdout)
    assert checked["ok"] and checked["n_keys"] == 201 and checked["journal_segments"] == 0, checked
    assert all(entry["n"] == 201 for entry in checked["entries"].values()), checked
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("featx_tiny_cnn")) == [
        Path(store).name, Path(store).name + ".lock"]  # no journal, no claims left
    sample = sorted(data.rglob("*.png"))[::10]  # each key's row is its own image's, whichever process computed it
    expected = extract(sample, **TINY_SETTINGS)
    with FeatureStore(store) as written:
        for name, rows in expected.items():
            np.testing.assert_allclose(written.read([content_key(p) for p in sample], *name.split("/")), rows,
                                       rtol=1e-5, atol=1e-6)


def test_cli_extract_says_another_process_is_writing(tmp_path):
    """Check that 'featx extract' says in one line that another process (its pid) writes, and takes its rows."""
    from featx.extraction import extract
    from featx.images import content_key
    from featx.store import WorkShare

    data = _folder(tmp_path / "data", 40)
    cache = tmp_path / "cache"
    settings = TINY_SETTINGS
    paths = sorted(data.rglob("*.png"))
    store = extract(paths[:1], store=cache, **settings).store  # the store the command writes to
    ours = paths[1:21]  # this test is "the other process": it claims 20 images, then commits them
    keys = [content_key(path) for path in ours]
    entries = frozenset((layer, pool) for layer in ("stage2", "pre_logits") for pool in ("avg", "spp"))
    with WorkShare(store, store, keys, dict.fromkeys(keys, entries), chunk=len(keys)) as share:
        [claimed] = list(share.batches(len(keys)))
        assert sorted(claimed) == list(range(len(keys)))
        proc = _featx("extract", str(data), *SHARED, "--cache", str(cache), cache=cache)
        line = proc.stderr.readline()
        assert line == (f"featx: warning: another process (pid {os.getpid()} on {share.me.host}, writing since "
                        f"{share.me.since}) is writing to the store {store.path}: the images it commits are skipped "
                        "here\n")
        features = extract(ours, **settings)
        store.write(keys, {tuple(name.split("/")): value for name, value in features.items()})
        share.finished(keys)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0 and err == "", err
    report = json.loads(out)
    assert report["n_computed"] == 19  # 40 images: 1 was in the store, 20 came from "the other process"
    assert report["n_from_store"] + report["n_from_other_processes"] == 21, report
    assert store.verify()["ok"] and len(store.keys) == 40


def test_cli_extract_json_and_cache_commands(tmp_path, capsys, monkeypatch):
    """Check 'featx extract --json' and 'featx cache list | info | verify | rm'."""
    data = _folder(tmp_path / "data", 6)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_computed"] == 6 and report["features"]["stage2/spp"] == [6, 160]
    store = report["store"]
    assert main(["cache", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["n_keys"] == 6
    assert main(["cache", "info", store, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"]["backbone"] == "featx_tiny_cnn"
    assert main(["cache", "verify", store]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["cache", "rm", store]) == 0
    assert not Path(store).exists()


def test_cli_extract_on_error_raise_names_file(tmp_path, capsys, monkeypatch):
    """Check that --on-error raise stops with one line naming the bad file and exit code 1."""
    data = _folder(tmp_path / "data", 3)
    (data / "class0" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--on-error", "raise"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "broken.jpg" in err


def test_cli_extract_decoder_torch_has_its_own_store(tmp_path, capsys, monkeypatch):
    """Check that 'featx extract --decoder torch' decodes JPEGs with torchvision into a store of its own."""
    data = _folder(tmp_path / "data", 4)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--json"]) == 0
    pil = json.loads(capsys.readouterr().out)
    assert main(["extract", str(data), *EXTRACT, "--decoder", "torch", "--json"]) == 0
    tensor = json.loads(capsys.readouterr().out)
    assert tensor["n_computed"] == 4 and tensor["store"] != pil["store"]


def test_cli_extract_warm_says_nothing_to_compute(tmp_path, capsys, monkeypatch):
    """Check that a warm 'featx extract' says that nothing was computed instead of a throughput of 0.0 images/s."""
    data = _folder(tmp_path / "data", 4)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT]) == 0
    assert "4 images: 4 computed" in capsys.readouterr().out
    assert main(["extract", str(data), *EXTRACT]) == 0
    out = capsys.readouterr().out
    assert "4 images: 0 computed, 4 from the store, 0 skipped; nothing to compute (" in out
    assert "images/s" not in out


def test_cli_extract_pool_mean_suggests_avg(tmp_path, capsys, monkeypatch):
    """Check that 'featx extract --pool mean' is one line on stderr suggesting 'avg' (not the closer spelling 'max')."""
    data = _folder(tmp_path / "data", 2)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--pool", "mean"]) == 1  # the last --pool wins
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Unknown pooling 'mean'" in err and "Did you mean 'avg'?" in err


def test_cli_cache_list_table_fits_a_terminal(tmp_path, capsys, monkeypatch):
    """Check that 'featx cache list' is a table of at most 120 columns naming each store; --json keeps every field."""
    data = _folder(tmp_path / "data", 3)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--layers", "all", "--pool", "avg,max,avgmax,spp", "--json"]) == 0
    store = Path(json.loads(capsys.readouterr().out)["store"])
    assert main(["cache", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) <= 120, lines
    assert lines[1].split() == ["store", "backbone", "images", "features", "size", "updated", "(UTC)"]
    assert lines[3].split()[:4] == [store.name, "featx_tiny_cnn", "3", "pre_logits/avg"] and "more" in lines[3]
    assert main(["cache", "list", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["path"] == str(store) and len(row["entries"]) == 20 and row["updated"]
    assert {"hash", "dtype", "journal_segments", "size_bytes"} <= set(row)


def test_cli_cache_info_prints_a_summary_unless_json(tmp_path, capsys, monkeypatch):
    """Check that 'featx cache info STORE' prints key: value lines, and with --json the store's full description."""
    data = _folder(tmp_path / "data", 3)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--json"]) == 0
    store = json.loads(capsys.readouterr().out)["store"]
    assert main(["cache", "info", store]) == 0
    out = capsys.readouterr().out
    assert not out.lstrip().startswith("{")
    lines = out.splitlines()
    assert lines[0] == f"store: {store}"
    for line in ("backbone: featx_tiny_cnn", "images: 3", "  stage2/spp: 3 rows × 160", "config:", "provenance:"):
        assert line in lines, out
    assert main(["cache", "info", store, "--json"]) == 0
    with FeatureStore(store) as opened:
        assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(opened.info(), default=str))


def test_cli_docs_cache_commands_do_not_read_as_a_pipe():
    """Check that README.md and docs/guide.md write the 'featx cache' subcommands as commands, not as a shell pipe."""
    root = Path(__file__).resolve().parents[1]
    for name in ("README.md", "docs/guide.md"):
        text = (root / name).read_text(encoding="utf-8")
        assert "featx cache list" in text, name
        piped = [line for line in text.splitlines() if re.search(r"featx cache [^#]*\|", line)]
        assert not piped, f"{name}: {piped}"


def test_cli_cache_verify_needs_store(capsys):
    """Check that 'featx cache verify' without a STORE says what is missing."""
    assert main(["cache", "verify"]) == 1
    assert "needs a STORE path" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_extract_digits_prints_throughput(capsys):
    """Check that 'featx extract digits' with the real Lite0 works and prints its throughput."""
    assert main(["extract", "digits", "--model", "efficientnet_lite0", "--layers", "stage3,pre_logits",
                 "--per-class", "3"]) == 0
    out = capsys.readouterr().out
    assert "30 images: 30 computed" in out and "images/s" in out


# --------------------------------------------------------------------------- cv, fit, predict, evaluate, demo


def _split_folders(root: Path) -> tuple[Path, Path]:
    arrays, labels = make_images(n_per_class=8, n_classes=3, seed=2)
    for i, (array, label) in enumerate(zip(arrays, labels)):
        folder = root / ("val" if i % 4 == 0 else "train") / label
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    return root / "train", root / "val"


TINY_OPTS = ["--model", "featx_tiny_cnn", "--device", "cpu", "--workers", "0"]


def test_cli_extract_and_cv_keep_quiet_when_auto_keeps_eager_torch(tmp_path, capsys, monkeypatch):
    """Check that a short extract or cv, where auto keeps eager torch without measuring others, prints no runtime line,
    and that the choice is remembered beside the layer tables."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    assert main(["extract", str(train), *TINY_OPTS, "--layers", "stage1", "--json"]) == 0
    assert "runtime auto" not in capsys.readouterr().err
    assert len(list((tmp_path / "c" / "runtimes").glob("featx_tiny_cnn-*.json"))) == 1
    assert main(["cv", str(train), *TINY_OPTS, "--layers", "stage1,pre_logits", "--cv", "3", "--json"]) == 0
    assert "runtime auto" not in capsys.readouterr().err


def test_cli_cv_json_rows(tmp_path, capsys, monkeypatch):
    """Check that 'featx cv --json' prints one row per layer with the documented keys."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    assert main(["cv", str(train), *TINY_OPTS, "--layers", "stage1,pre_logits", "--pool", "avg", "--cv", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in rows] == ["stage1", "pre_logits"]
    for key in ["model", "layer", "pooling", "head", "accuracy_mean", "accuracy_std", "n_images"]:
        assert key in rows[0]
    assert rows[0]["model"] == "featx_tiny_cnn" and rows[0]["n_images"] == 18
    assert main(["cv", str(train), *TINY_OPTS, "--layers", "stage1", "--cv", "3"]) == 0
    assert "best: stage1 / avg / logreg" in capsys.readouterr().out


def test_cli_cv_unwritable_reports_folder_warns_and_prints_rows(tmp_path, capsys, monkeypatch):
    """Check that 'featx cv' with a read-only reports folder prints its rows and one warning line, no traceback."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    args = ["cv", str(train), *TINY_OPTS, "--layers", "stage1", "--pool", "avg", "--cv", "3", "--json"]
    assert main(args) == 0  # features and the logreg report cached
    capsys.readouterr()
    (reports,) = (tmp_path / "c").rglob("*.h5.reports")
    reports.chmod(0o555)
    try:
        if os.access(reports, os.W_OK):  # root writes anyway: fail the write as a read-only folder does
            def refuse(path, data, **kwargs):
                raise PermissionError(13, "Permission denied", str(path))

            monkeypatch.setattr("featx.compare.atomic_write", refuse)
        assert main([*args, "--head", "linear-svm"]) == 0
    finally:
        reports.chmod(0o755)
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["layer"], r["head"]) for r in rows] == [("stage1", "linear-svm")]
    assert captured.err.count("featx: warning: cannot keep the cross-validation report in") == 1
    assert str(reports) in captured.err and "computed" in captured.err and "Traceback" not in captured.err


def test_cli_fit_predict_evaluate(tmp_path, capsys, monkeypatch):
    """Check fit -o, predict -o CSV and evaluate --json end to end."""
    import csv

    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, val = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", "--pool", "spp", "-o", str(model)]) == 0
    assert "saved to" in capsys.readouterr().out and model.is_file()
    out = tmp_path / "pred.csv"
    assert main(["predict", str(model), str(val), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 6 and set(rows[0]) == {"image", "label", "error", "p_class0", "p_class1", "p_class2"}
    assert main(["evaluate", str(model), str(val), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = sum(r["label"] == Path(r["image"]).parent.name for r in rows) / len(rows)
    assert report["accuracy"] == pytest.approx(expected)


def test_cli_fit_prints_the_inner_cv_score_of_the_chosen_parameters(tmp_path, capsys):
    """Check that 'featx fit' prints the inner-CV accuracy of the chosen C, the one the model file records."""
    from featx.models import load_model

    train, _ = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", "--cache", str(tmp_path / "c"),
                 "-o", str(model)]) == 0
    found = re.search(r"^inner 3-fold CV accuracy (\d\.\d{4}) for the chosen parameters$", capsys.readouterr().out,
                      re.MULTILINE)
    assert found is not None
    assert float(found.group(1)) == pytest.approx(load_model(model).info["cv_score"], abs=5e-5)


def test_cli_evaluate_says_when_the_images_trained_the_model(tmp_path, capsys):
    """Check that 'featx evaluate' calls a score held-out only when no image trained the model, counts those
    that did, and says 'unknown' for a model file without the record."""
    import shutil

    from featx.models import load_model, save_model

    train, val = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    cache = ["--cache", str(tmp_path / "c")]
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", *cache, "-o", str(model)]) == 0
    capsys.readouterr()
    mixed = tmp_path / "mixed"
    shutil.copytree(val, mixed)
    for picture in sorted(train.glob("*/*.png"))[:3]:
        shutil.copy(picture, mixed / picture.parent.name / f"copy-{picture.name}")

    def accuracy_line(data, model=model):
        assert main(["evaluate", str(model), str(data), *cache]) == 0
        captured = capsys.readouterr()
        assert "Traceback" not in captured.err
        return captured.out.splitlines()[1]

    line = accuracy_line(train)
    assert line.startswith("accuracy on the training images ") and "held-out accuracy" not in line
    assert line.endswith("on 18 images: all 18 were used to train this model, not a held-out score")
    assert accuracy_line(val).startswith("held-out accuracy ")
    line = accuracy_line(mixed)
    assert line.startswith("accuracy ") and line.endswith(
        "on 9 images: 3 of 9 images were used to train this model, not a held-out score")
    assert main(["evaluate", str(model), str(mixed), *cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_training_images"] == 3
    old = load_model(model)
    del old.info["training_keys"]  # as a model file written before featx recorded its training images
    save_model(old, tmp_path / "old.joblib")
    line = accuracy_line(val, tmp_path / "old.joblib")
    assert line.startswith("accuracy ") and line.endswith(
        "(this model file does not record its training images, so whether this is a held-out score is unknown)")
    assert main(["evaluate", str(tmp_path / "old.joblib"), str(val), *cache, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_training_images"] is None


def test_cli_predict_evaluate_cache_is_the_store_of_the_run(tmp_path, capsys, monkeypatch):
    """Check that 'featx predict/evaluate --cache DIR' keep the run's features in DIR, and that without it
    they use the store the model was fitted with, not ./cache or $FEATX_CACHE."""
    train, val = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", "--cache", str(tmp_path / "fitted"),
                 "-o", str(model)]) == 0
    run = tmp_path / "run"
    run.mkdir()
    monkeypatch.chdir(run)
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "env"))
    assert main(["predict", str(model), str(val), "--cache", str(tmp_path / "p")]) == 0
    assert main(["evaluate", str(model), str(val), "--cache", str(tmp_path / "e")]) == 0
    assert len(list((tmp_path / "p").glob("*.h5"))) == 1 and len(list((tmp_path / "e").glob("*.h5"))) == 1
    fitted = {p.name: p.stat().st_size for p in (tmp_path / "fitted").glob("*.h5")}
    assert main(["evaluate", str(model), str(val)]) == 0
    assert not (tmp_path / "env").exists() and not (run / "cache").exists()
    assert [p.name for p in (tmp_path / "fitted").glob("*.h5")] == list(fitted)
    capsys.readouterr()


def test_cli_predict_missing_model_is_one_line(tmp_path, capsys):
    """Check that a missing model file gives one line naming it and exit code 1."""
    assert main(["predict", str(tmp_path / "nope.joblib"), str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.joblib" in err and "featx fit" in err


def test_cli_predict_evaluate_swapped_arguments_give_the_order(tmp_path, capsys):
    """Check that 'featx predict DATA MODEL' (and evaluate) says DATA is a folder and gives the swapped command."""
    data = _folder(tmp_path / "data", 3)
    model = tmp_path / "m.joblib"
    model.write_bytes(b"featx-model sha256=" + b"0" * 64 + b"\n")  # only its header line is read
    for command, metavar in (("predict", "IMAGES"), ("evaluate", "DATA")):
        assert main([command, str(data), str(model)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert f"{str(data)!r} is a folder, not a model file" in err
        assert f"The order is 'featx {command} MODEL {metavar}', the model file first" in err
        assert f"did you mean 'featx {command} {model} {data}'?" in err


def test_cli_predict_image_or_text_as_model_names_the_file(tmp_path, capsys):
    """Check that a JPEG or a text file given as MODEL is named, said not to be a featx model file, with the fix."""
    data = _folder(tmp_path / "data", 3)
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (8, 8)).save(photo)
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    for path, kind in ((photo, "a JPEG image"), (notes, "a text file (first line 'hello')")):
        assert main(["predict", str(path), str(data)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "UnpicklingError" not in err
        assert f"{str(path)!r} is not a featx model file: it is {kind}" in err
        assert "'featx-model sha256=...'" in err and "featx fit DATA -o model.joblib" in err
        assert "The order is 'featx predict MODEL IMAGES'" in err


@pytest.mark.slow
@pytest.mark.weights
def test_cli_demo_digits_best_layer_reaches_095(capsys):
    """Check that 'featx demo' (digits, Lite0, every stage) finds a layer at 0.95 accuracy or more."""
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    best = float(out.split("best layer:")[1].split("accuracy")[1].split("±")[0])
    assert best >= 0.95, out


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.weights
@pytest.mark.skipif(not FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_cli_cv_fashion_mnist_best_layer_reaches_083(capsys):
    """Check that Lite0 features of 100 Fashion-MNIST images per class reach 0.83 with logistic regression."""
    assert main(["cv", "fashion-mnist", "--per-class", "100", "--model", "efficientnet_lite0", "--layers", "all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["n_images"] == 1000
    assert max(r["accuracy_mean"] for r in rows) >= 0.83, rows


def test_cli_compare_writes_table_csv_json_png(tmp_path, capsys, monkeypatch):
    """Check that 'featx compare' prints the table and writes the three files."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    out = tmp_path / "results"
    assert main(["compare", str(train), "--models", "featx_tiny_cnn", "--device", "cpu", "--workers", "0",
                 "--layers", "stage1,stage2,pre_logits", "--pool", "avg,spp", "--cv", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "best: featx_tiny_cnn" in printed and "compare.png" in printed
    assert {p.name for p in out.iterdir()} == {"compare.csv", "compare.json", "compare.png"}
    rows = json.loads((out / "compare.json").read_text())  # pre_logits is a vector: one row, not avg and spp
    assert [(r["layer"], r["pooling"]) for r in rows] == [("stage1", "avg"), ("stage1", "spp"), ("stage2", "avg"),
                                                          ("stage2", "spp"), ("pre_logits", "avg")]


def test_cli_cv_and_fit_choose_the_layer_by_default(tmp_path, capsys, monkeypatch):
    """Check that cv and fit without --layers choose the feature set by the one-standard-error rule and show its table."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    assert main(["cv", str(train), *TINY_OPTS, "--cv", "3", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["layer"] == "auto" and len(row["chosen_per_fold"]) == 3
    assert row["chosen_layer"] in {"stem", "stage1", "stage2", "stage3", "pre_logits"}
    selection = row["selection"]
    assert f"{row['chosen_layer']}/{row['pooling']}" == selection["chosen"]
    assert [r["chosen"] for r in selection["table"]].count(True) == 1 and selection["bias"] >= 0
    assert "one standard error" in selection["rule"]
    model = tmp_path / "auto.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--cv", "3", "-o", str(model)]) == 0
    out = capsys.readouterr().out
    # every layer of the tiny backbone under avg and spp, pre_logits (a vector) once: 4 x 2 + 1
    assert ("--layers auto: 9 feature sets scored by logreg with its default parameters on 9 stratified folds "
            "(3-fold CV repeated 3 times, as below 500 images):") in out
    assert "within 1 se" in out and model.is_file()
    assert re.search(r"chose \S+/(avg|spp): the (best by mean|simplest candidate within one standard error)", out)


def test_cli_advise_json_keys(tmp_path, capsys, monkeypatch):
    """Check that 'featx advise --json' has the documented keys (similarity measure stubbed)."""
    from featx import advise as advise_module

    monkeypatch.setattr(advise_module, "imagenet_shift", lambda *a, **k: 0.05)
    train, _ = _split_folders(tmp_path)
    assert main(["advise", str(train), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["similarity"] == "similar" and report["quadrant"] == "small data, similar to ImageNet"
    assert {"images_per_class", "similarity_score", "recommendation"} <= set(report)


@pytest.mark.parametrize("shift", [0.05, 0.9])
def test_cli_advise_recommends_command_on_the_given_data(tmp_path, capsys, monkeypatch, shift):
    """Check that the command 'featx advise' recommends names the user's DATA argument (quoted), not 'DATA'."""
    from featx import advise as advise_module

    monkeypatch.setattr(advise_module, "imagenet_shift", lambda *a, **k: shift)
    train, _ = _split_folders(tmp_path / "my photos")
    assert main(["advise", str(train)]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recommendation: ")]
    assert f"featx cv '{train}' --layers all" in line and "DATA" not in line


def test_cli_cv_warm_run_imports_neither_torch_nor_sklearn(tmp_path, image_folder):
    """Check that a 'featx cv' the store answers entirely never imports torch or scikit-learn."""
    script = (
        "import json, sys\n"
        "from featx.cli import main\n"
        f"code = main(['cv', {str(image_folder)!r}, '--model', 'featx_tiny_cnn', '--layers', 'stage1,pre_logits',"
        " '--cv', '2', '--device', 'auto', '--json'])\n"
        "heavy = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'sklearn', 'timm', 'torchvision'})\n"
        "print(json.dumps({'code': code, 'heavy': heavy}), file=sys.stderr)\n"
    )
    env = {**os.environ, "FEATX_CACHE": str(tmp_path / "cache")}
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        runs.append((json.loads(done.stdout), json.loads(done.stderr.strip().splitlines()[-1])))
    (cold_rows, cold), (warm_rows, warm) = runs
    assert cold["code"] == warm["code"] == 0
    assert "torch" in cold["heavy"] and warm["heavy"] == []
    assert [row["accuracy_mean"] for row in warm_rows] == [row["accuracy_mean"] for row in cold_rows]
    assert all(row["from_cache"] for row in warm_rows)
def test_cli_finetune_then_predict_and_evaluate(tmp_path, capsys, monkeypatch):
    """Check 'featx finetune' prints epochs and frozen-part timing, a second run computes nothing, and
    the model file works with predict and evaluate."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, val = _split_folders(tmp_path)
    model = tmp_path / "ft.joblib"
    args = ["finetune", str(train), "--model", "featx_tiny_cnn", "--device", "cpu", "--workers", "0",
            "--from", "stage1", "--epochs", "2", "--val-split", "0.34", "-o", str(model)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "epoch   1  train loss" in out and "epoch   2" in out and "val accuracy" in out
    assert "frozen part: 18 images computed, 0 from the store" in out and "saved to" in out
    assert main(args) == 0
    assert "frozen part: 0 images computed, 18 from the store" in capsys.readouterr().out
    assert main(["predict", str(model), str(val)]) == 0
    assert capsys.readouterr().out.count("\n") == 7  # header and six images
    assert main(["evaluate", str(model), str(val), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_images"] == 6
    assert main(["evaluate", str(model), str(train), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_training_images"] == 18  # finetune records its training images


def test_cli_finetune_fp16_on_the_cpu_is_one_line_exit_1(tmp_path, capsys):
    """Check that 'featx finetune --train-precision fp16' on the CPU fails in one line before extracting."""
    train, _ = _split_folders(tmp_path)
    assert main(["finetune", str(train), "--model", "featx_tiny_cnn", "--from", "stage1", "--device", "cpu", "--train-precision", "fp16",
                 "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "ft.joblib")]) == 1
    err = capsys.readouterr().err
    assert "train_precision='fp16' needs CUDA" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir())


def test_cli_finetune_from_pre_logits_is_one_line_exit_1(tmp_path, capsys):
    """Check that fine-tuning from pre_logits is refused in one line that points to 'featx fit'."""
    train, _ = _split_folders(tmp_path)
    assert main(["finetune", str(train), "--model", "featx_tiny_cnn", "--from", "pre_logits",
                 "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "m.joblib")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "featx fit DATA --layers pre_logits" in err


def _large_images(root: Path, n: int = 2) -> Path:
    """``n`` 300×300 PNGs (90000 pixels) in one class folder."""
    folder = root / "class0"
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((300, 300, 3), 40 * i, np.uint8)).save(folder / f"large{i}.png")
    return root


def test_cli_extract_max_pixels_skips_and_names_the_option(tmp_path, capsys, monkeypatch):
    """Check that 'featx extract --max-pixels 10000' skips a 300×300 PNG naming --max-pixels, and 100000 accepts it."""
    data = _large_images(tmp_path / "data")
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    assert main(["extract", str(data), *EXTRACT, "--max-pixels", "10000"]) == 0
    out = capsys.readouterr().out
    assert "2 images: 0 computed, 0 from the store, 2 skipped" in out and "Traceback" not in out
    assert (f"{data / 'class0' / 'large0.png'}' (decompression bomb: 300×300 = 90000 pixels exceeds the limit of "
            "10000): pass --max-pixels 90000 (CLI) or max_pixels=90000 (Python), or more, if you trust this file") in out
    assert main(["extract", str(data), *EXTRACT, "--max-pixels", "100000"]) == 0
    assert "2 images: 2 computed, 0 from the store, 0 skipped" in capsys.readouterr().out


def test_cli_extract_max_pixels_zero_is_one_line(tmp_path, capsys):
    """Check that 'featx extract --max-pixels 0' exits 1 with one line saying a positive integer is expected."""
    data = _large_images(tmp_path / "data", 1)
    assert main(["extract", str(data), *EXTRACT, "--max-pixels", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_pixels must be a positive integer" in err and "got 0" in err


def test_cli_predict_max_pixels_skips_and_names_the_option(tmp_path, capsys, monkeypatch):
    """Check that 'featx predict --max-pixels 10000' reports the 300×300 images as skipped, naming the fix."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", "-o", str(model)]) == 0
    data = _large_images(tmp_path / "large")
    capsys.readouterr()
    assert main(["predict", str(model), str(data), "--max-pixels", "10000"]) == 0
    err = capsys.readouterr().err
    assert "featx: warning: skipped 2 of 2 images:" in err  # the one wording of report_skipped
    assert "pass --max-pixels 90000 (CLI)" in err and "Traceback" not in err
    assert main(["predict", str(model), str(data), "--max-pixels", "100000"]) == 0
    assert "--max-pixels" not in capsys.readouterr().err


# --------------------------------------------------------------------------- skipped images, classes checked first


def _broken_folder(root: Path, n: int = 20, broken: int = 4) -> Path:
    """``n`` small PNGs in two classes, the last ``broken`` of them text under a .png name (each its own bytes)."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        if i >= n - broken:
            (folder / f"{i:02d}.png").write_text(f"not an image {i}")
        else:
            Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return root


def _one_class(root: Path, n: int = 6) -> Path:
    (root / "only").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((32, 32, 3), 10 * i, dtype=np.uint8)).save(root / "only" / f"{i}.png")
    return root


def test_cli_cv_and_compare_report_skipped_images_on_stderr(tmp_path, capsys):
    """Check that 'featx cv' and 'featx compare' name the 4 broken files of 20 on stderr in one wording."""
    data = _broken_folder(tmp_path / "data")
    common = [str(data), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1", "--pool", "avg", "--cv", "3"]
    assert main(["cv", *common]) == 0
    out, err = capsys.readouterr()
    assert "(16 images, 3-fold)" in out
    lines = err.splitlines()
    assert lines[0] == "featx: warning: skipped 4 of 20 images:"
    assert {line.split(": ")[0].strip() for line in lines[1:]} == {
        str(data / f"class{i % 2}" / f"{i:02d}.png") for i in (16, 17, 18, 19)}
    assert len(lines) == 5 and all("not an image" in line for line in lines[1:]), err
    assert main(["compare", *common, "--out", str(tmp_path / "cmp")]) == 0
    assert capsys.readouterr().err.splitlines() == lines


def test_cli_fit_lists_five_skipped_images_and_how_to_see_all(tmp_path, capsys):
    """Check that 'featx fit' lists the first 5 of 7 skipped images and names the command that lists them all."""
    data = _broken_folder(tmp_path / "data", broken=7)
    assert main(["fit", str(data), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1",
                 "-o", str(tmp_path / "m.joblib")]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "featx: warning: skipped 7 of 20 images:" and len(lines) == 7
    assert lines[-1] == (f"  ... and 2 more: 'featx extract {data}' lists them all "
                         "(with --json: its \"skipped\" field)")
    assert main(["extract", str(data), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1",
                 "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["skipped"]) == 7


def test_cli_advise_counts_only_decodable_images(tmp_path, capsys):
    """Check that 'featx advise' counts 16 images of a folder of 20 with 4 broken, and reports the 4."""
    data = _broken_folder(tmp_path / "data")
    assert main(["advise", str(data), "--device", "cpu"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{data}: 16 images, 2 classes, 8 per class")
    assert err.splitlines()[0] == "featx: warning: skipped 4 of 20 images:"


def test_cli_one_class_refused_before_extracting(tmp_path, capsys):
    """Check that 'featx cv', 'fit' and 'advise' refuse one class in one line, before any store is made."""
    data = _one_class(tmp_path / "data")
    message = (f"featx: error: {data} holds one class only ('only', 6 images): a classifier needs at least two "
               "classes to tell apart; add a sub-folder (or 'label' value) per class.\n")
    cache = tmp_path / "c"
    for command in (["cv", str(data), *TINY_OPTS, "--cache", str(cache), "--cv", "3"],
                    ["fit", str(data), *TINY_OPTS, "--cache", str(cache), "-o", str(tmp_path / "m.joblib")],
                    ["advise", str(data), "--device", "cpu"]):
        assert main(command) == 1
        assert capsys.readouterr().err == message
    assert not cache.exists()


def test_cli_cv_class_smaller_than_folds_refused_before_extracting(tmp_path, capsys):
    """Check that 'featx cv --cv 3' with a class of 2 images says so, and how to fix it, before extracting."""
    data = _broken_folder(tmp_path / "data", n=8, broken=0)
    for name in ("04.png", "06.png"):
        (data / "class0" / name).unlink()
    cache = tmp_path / "c"
    assert main(["cv", str(data), *TINY_OPTS, "--cache", str(cache), "--cv", "3"]) == 1
    assert capsys.readouterr().err == (
        f"featx: error: {data}: 1 class has fewer images than the 3 cross-validation folds need (--cv 3): "
        "'class0' (2); add images, lower --cv to 2, or drop that class.\n")
    assert not cache.exists()


# --------------------------------------------------------------------------- progress bars, extraction times, caches


@pytest.fixture
def terminal(capsys, monkeypatch):
    """stderr reads as a terminal (outside CI), as for a person running featx: the bars are drawn."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr("featx.progress.stderr_is_terminal", lambda: True)


def _run_on_pty(args, env) -> tuple[int, str]:
    """Run 'python -m featx ARGS' with stderr on a pseudo-terminal; return the exit code and what stderr showed."""
    import pty
    import select

    controller, terminal_side = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "featx", *args], env=env, stdout=subprocess.DEVNULL,
                            stderr=terminal_side, stdin=subprocess.DEVNULL)
    os.close(terminal_side)
    chunks = []
    while True:
        ready, _, _ = select.select([controller], [], [], 120)
        if not ready:
            proc.kill()
            raise AssertionError("featx printed nothing for 120 s")
        try:
            data = os.read(controller, 65536)
        except OSError:  # EIO: the process closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(controller)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


def test_cli_cv_progress_bar_on_a_terminal_names_what_is_scored_and_a_pipe_gets_none(tmp_path):
    """Check that 'featx cv' on a terminal draws a bar naming each (features, head) it scores, and that a pipe,
    or a terminal under CI=true, gets no bar."""
    train, _ = _split_folders(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(FEATX_CACHE=str(tmp_path / "c"), PYTHONPATH=os.pathsep.join(sys.path))
    args = ["cv", str(train), *TINY_OPTS, "--layers", "stage1,stage2", "--head", "logreg,linear-svm", "--cv", "3"]
    code, shown = _run_on_pty(args, env)
    assert code == 0, shown
    for i, name in enumerate(["stage1/avg logreg", "stage1/avg linear-svm", "stage2/avg logreg",
                              "stage2/avg linear-svm"], 1):
        assert f"cv {name} [{i}/4]" in shown, shown
    assert "/12 " in shown and "\r" in shown  # 4 rows x 3 folds, redrawn in place
    piped = subprocess.run([sys.executable, "-m", "featx", *args], env=env, capture_output=True, text=True)
    assert piped.returncode == 0 and "best: " in piped.stdout
    assert piped.stderr == ""
    code, shown = _run_on_pty(args, {**env, "CI": "true"})
    assert code == 0 and "cv stage1" not in shown and "\r" not in shown


def test_cli_compare_fit_and_fit_auto_bars_name_what_is_scored(tmp_path, capsys, terminal):
    """Check the bars of 'featx compare' (each row), 'featx cv --layers auto' (its outer folds), 'featx fit' (the
    tuning of its features and head) and 'featx fit --auto' (each candidate) on a terminal."""
    train, _ = _split_folders(tmp_path)
    common = [str(train), *TINY_OPTS, "--cache", str(tmp_path / "c")]
    assert main(["compare", *common, "--layers", "stage1,stage2", "--cv", "3", "--out", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "cv stage1/avg logreg [1/2]" in err and "cv stage2/avg logreg [2/2]" in err and "| 0/6 " in err
    assert main(["cv", *common, "--layers", "auto", "--cv", "3"]) == 0
    assert "cv auto logreg (a layer chosen in each fold)" in capsys.readouterr().err
    assert main(["fit", *common, "--layers", "stage2", "--pool", "spp", "-o", str(tmp_path / "m.joblib")]) == 0
    err = capsys.readouterr().err
    assert "tune stage2/spp logreg" in err and "| 0/19 " in err  # 6 C values x 3 folds + the final fit
    assert main(["fit", str(train), "--auto", "--budget", "5m", "--auto-models", "featx_tiny_cnn", "--auto-layers",
                 "stage1/avg,pre_logits/avg", "--auto-tta", "none", "--auto-heads", "logreg,linear-svm", "--cv", "3",
                 "--device", "cpu", "--cache", str(tmp_path / "c"), "-o", str(tmp_path / "a.joblib")]) == 0
    err = capsys.readouterr().err
    assert "auto featx_tiny_cnn stage1/avg tta=none logreg [1/2]" in err and "| 0/6 " in err
    # the second head is tried on the best feature sets: the bar's total grows with it (2 more candidates)
    assert "auto featx_tiny_cnn stage1/avg tta=none linear-svm [3/4]" in err and "/12 [" in err


def test_cli_compare_and_fit_without_a_terminal_draw_no_bar(tmp_path, capsys, monkeypatch):
    """Check that stderr that is no terminal gets no bar: only the warning lines."""
    monkeypatch.delenv("CI", raising=False)
    train, _ = _split_folders(tmp_path)
    common = [str(train), *TINY_OPTS, "--cache", str(tmp_path / "c")]
    assert main(["compare", *common, "--layers", "stage1", "--cv", "3", "--out", str(tmp_path / "o")]) == 0
    assert main(["fit", *common, "--layers", "stage1", "-o", str(tmp_path / "m.joblib")]) == 0
    assert capsys.readouterr().err == ""


def test_cli_compare_says_each_extraction_time_once(tmp_path, capsys):
    """Check that 'featx compare' gives the backbone's extraction time in one line under the table (and in
    --json beside the rows), not as a column repeated on every row."""
    train, _ = _split_folders(tmp_path)
    common = ["compare", str(train), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1,stage2",
              "--cv", "3", "--out", str(tmp_path / "o")]
    assert main(common) == 0
    out = capsys.readouterr().out
    assert "extraction_time" not in out
    [line] = [line for line in out.splitlines() if line.startswith("extraction")]
    assert re.fullmatch(r"extraction \(all layers of a backbone in one pass\): featx_tiny_cnn \d+\.\d s "
                        r"\(18 of 18 images computed\)", line), line
    assert main([*common, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["layer"] for r in report["rows"]] == ["stage1", "stage2"]
    assert all("extraction_time" not in r for r in report["rows"])
    [extraction] = report["extractions"]
    assert extraction["model"] == "featx_tiny_cnn" and extraction["n_computed"] == 0 and extraction["n_images"] == 18


def test_cli_cv_pre_logits_gets_one_row_for_avg_and_spp_and_says_why(tmp_path, capsys):
    """Check that 'featx cv --pool avg,spp' scores pre_logits (a vector) once and says why in one line."""
    train, _ = _split_folders(tmp_path)
    assert main(["cv", str(train), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1,pre_logits",
                 "--pool", "avg,spp", "--cv", "3", "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [(r["layer"], r["pooling"]) for r in rows] == [("stage1", "avg"), ("stage1", "spp"), ("pre_logits", "avg")]
    assert captured.err == ("featx: warning: pre_logits (featx_tiny_cnn) is already a vector: pooling does not apply "
                            "to it, so its spp features are its avg features, scored once as pre_logits/avg.\n")


def test_cli_cache_dir_holds_the_layer_tables_too(tmp_path, capsys, monkeypatch):
    """Check that with --cache DIR and no $FEATX_CACHE the layer table goes under DIR, not ./cache."""
    from featx.backbones import layer_table

    monkeypatch.delenv("FEATX_CACHE")
    monkeypatch.chdir(tmp_path)
    train, _ = _split_folders(tmp_path)
    layer_table.cache_clear()  # measured (and written) again in this run
    assert main(["cv", str(train), *TINY_OPTS, "--cache", str(tmp_path / "mine"), "--layers", "stage1",
                 "--cv", "3"]) == 0
    assert [p.name.split("-")[0] for p in (tmp_path / "mine" / "layers").iterdir()] == ["featx_tiny_cnn"]
    assert not (tmp_path / "cache").exists()


def test_cli_fit_all_images_skipped_says_so_with_the_skipped_report(tmp_path, capsys):
    """Check that 'featx fit' on a folder of broken files lists them and says all were skipped, in one error line."""
    data = _broken_folder(tmp_path / "data", n=8, broken=8)
    assert main(["fit", str(data), *TINY_OPTS, "--cache", str(tmp_path / "c"), "--layers", "stage1",
                 "-o", str(tmp_path / "m.joblib")]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "featx: warning: skipped 8 of 8 images:" and len(lines) == 8
    assert lines[-1].startswith("featx: error: all 8 images were skipped (unreadable or missing, e.g. ")
    assert "nothing to fit a head on" in lines[-1] and "holds no features" not in lines[-1]
    assert not (tmp_path / "m.joblib").exists()


# --------------------------------------------------------------------------- report


def _model_and_mislabelled_val(tmp_path) -> tuple[Path, Path]:
    """A tiny model file, and its validation folder with one image moved into a wrong class folder."""
    train, val = _split_folders(tmp_path)
    model = tmp_path / "m.joblib"
    assert main(["fit", str(train), *TINY_OPTS, "--layers", "stage2", "-o", str(model)]) == 0
    moved = sorted((val / "class0").glob("*.png"))[0]
    moved.rename(val / "class1" / moved.name)
    return model, val


def test_cli_report_writes_the_page_and_prints_the_confusions(tmp_path, capsys, monkeypatch):
    """Check that 'featx report MODEL DATA -o' writes one page with the mistake's thumbnail and prints
    the scores, the confusion and what it wrote."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    model, val = _model_and_mislabelled_val(tmp_path)
    capsys.readouterr()
    page = tmp_path / "out" / "report.html"
    page.parent.mkdir()
    assert main(["report", str(model), str(val), "-o", str(page), "--thumbnail-size", "48"]) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and re.search(r"^class1\s+class0\s+1\s+0\.3333$", out, re.MULTILINE)
    assert re.search(rf"^wrote {re.escape(str(page))} \(1 misclassified images in 1 confusions; \d+ KiB\)$", out,
                     re.MULTILINE)
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/jpeg;base64,") == 1 and "class1 → class0: 1 image" in text
    assert 'width="48" height="48"' in text and list(page.parent.iterdir()) == [page]


def test_cli_report_outputs_are_checked_before_any_work(tmp_path, capsys):
    """Check that report -o, evaluate --report and compare --report in a missing folder, or naming a folder,
    fail in one line before the model or the data are read."""
    missing = tmp_path / "nowhere" / "r.html"
    for argv in (["report", "no-model.joblib", "no-data", "-o", str(missing)],
                 ["evaluate", "no-model.joblib", "no-data", "--report", str(missing)],
                 ["compare", "no-data", "--report", str(missing)]):
        assert main(argv) == 1
        assert f"the folder '{missing.parent}' does not exist" in capsys.readouterr().err
    assert main(["report", "no-model.joblib", "no-data", "-o", str(tmp_path)]) == 1
    assert "is a folder: give a file name in it" in capsys.readouterr().err


def test_cli_report_refuses_a_bad_thumbnail_size(tmp_path, capsys):
    """Check that --thumbnail-size 0 is refused by the parser with the expected value."""
    with pytest.raises(SystemExit):
        main(["report", "m.joblib", str(tmp_path), "--thumbnail-size", "0"])
    assert "expected a whole number >= 1, got '0'" in capsys.readouterr().err


def test_cli_evaluate_report_writes_the_page_and_keeps_its_json(tmp_path, capsys, monkeypatch):
    """Check that 'featx evaluate --report' writes the report page and prints the same JSON as without it."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    model, val = _model_and_mislabelled_val(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(model), str(val), "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    page = tmp_path / "evaluate.html"
    assert main(["evaluate", str(model), str(val), "--json", "--report", str(page)]) == 0
    assert json.loads(capsys.readouterr().out) == plain
    assert "Misclassified images" in page.read_text(encoding="utf-8")


def test_cli_compare_report_writes_plot_and_table(tmp_path, capsys, monkeypatch):
    """Check that 'featx compare --report' writes a page with the comparison's plot and one row per result."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    train, _ = _split_folders(tmp_path)
    page = tmp_path / "compare.html"
    assert main(["compare", str(train), "--models", "featx_tiny_cnn", "--device", "cpu", "--workers", "0",
                 "--layers", "stage1,stage2", "--pool", "avg", "--cv", "3", "--out", str(tmp_path / "results"),
                 "--report", str(page)]) == 0
    assert f"wrote {page}" in capsys.readouterr().out
    text = page.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 1 and f"<h2>Layer comparison: {train}</h2>" in text
    assert len(re.findall(r"<tr><td>featx_tiny_cnn</td>", text)) == 2
def test_cli_threads_option_builds_the_plan_and_refuses_a_bad_value(tmp_path, capsys):
    """Check that --threads none/N/auto reach ExtractOptions.threads and a bad value is one line, exit 1."""
    import argparse

    from featx.cli.arguments import add_extraction_options, extract_options

    parser = argparse.ArgumentParser()
    add_extraction_options(parser, ("threads",))
    assert [extract_options(parser.parse_args(argv)).threads
            for argv in ([], ["--threads", "none"], ["--threads", "3"])] == ["auto", None, 3]
    data = _large_images(tmp_path / "data", 1)
    assert main(["extract", str(data), *EXTRACT, "--threads", "lots"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--threads must be auto, none or a whole number" in err
