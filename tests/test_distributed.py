"""The Ray engine: extraction on a local Ray cluster, and the error without Ray."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import TINY, make_images
from featx.cli import main
from featx.distributed import RayEngine, RayUnavailableError, require_ray
from featx.exceptions import FeatxError, ImageDecodeError
from featx.extraction import extract
from featx.images import open_source

OPTIONS = dict(backbone=TINY, layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="auto", batch_size=4,
               progress=False)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local 2-CPU Ray cluster for the module's tests, shut down after them."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _all_rows(store) -> dict:
    keys = list(store.keys)
    return {entry: (keys, store.read(keys, *entry)) for entry in store.entries}


@pytest.fixture
def one_torch_thread():
    """Run the test with one torch thread, as a one-CPU actor does (the thread count can change rounding)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_ray_engine_equals_single_process_row_for_row(tmp_path, ray_cluster, image_folder, one_torch_thread):
    """Check that extraction on 2 Ray actors gives the single-process store, key for key and bit for bit."""
    source = open_source(str(image_folder))
    local = extract(source, store=tmp_path / "local", num_workers=0, **OPTIONS)
    engine = RayEngine(workers=2, block_size=4)  # 3 blocks of one batch each over 2 actors
    distributed = extract(source, store=tmp_path / "ray", engine=engine, **OPTIONS)
    assert distributed.n_computed == len(source) == 12
    assert distributed.store.config == local.store.config  # same configuration, same store name
    assert distributed.store.path.name == local.store.path.name
    want, got = _all_rows(local.store), _all_rows(distributed.store)
    assert got.keys() == want.keys()
    for entry, (keys, values) in want.items():
        assert got[entry][0] == keys
        np.testing.assert_array_equal(got[entry][1], values)
    for key in local:
        np.testing.assert_array_equal(distributed[key], local[key])
    assert extract(source, store=tmp_path / "ray", engine="ray", **OPTIONS).n_computed == 0  # nothing left to do


def test_ray_engine_skips_bad_images_and_raises_when_asked(tmp_path, ray_cluster):
    """Check that a bad image is reported from a Ray actor, or stops the run with its name."""
    arrays, labels = make_images(n_per_class=2, n_classes=2)
    items = list(arrays)
    items[2] = np.zeros((4, 4, 3), dtype=object)  # cannot be decoded
    source = open_source(items, labels=labels)
    with pytest.raises(ImageDecodeError):
        extract(source, store=tmp_path / "a", engine=RayEngine(workers=1), on_error="raise", **OPTIONS)
    result = extract(source, store=tmp_path / "b", engine=RayEngine(workers=1), on_error="skip", **OPTIONS)
    assert len(result.kept) == 3 and [position for position in result.skipped_positions] == [2]


def test_cli_extract_and_cv_on_ray(tmp_path, ray_cluster, capsys, monkeypatch, image_folder):
    """Check 'featx extract --engine ray --workers 2' and 'featx cv --engine ray' on the local cluster."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "c"))
    options = ["--model", TINY, "--layers", "stage2", "--pool", "avg", "--batch-size", "4"]
    assert main(["extract", str(image_folder), *options, "--engine", "ray", "--workers", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_computed"] == 12
    assert main(["cv", str(image_folder), *options, "--engine", "ray", "--cv", "3", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["layer"] == "stage2" and 0 <= row["accuracy_mean"] <= 1


def test_ray_missing_names_the_extra(monkeypatch, tmp_path, capsys, image_folder):
    """Check that without Ray, --engine ray and engine='ray' fail with the extra to install."""
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(RayUnavailableError, match=r'pip install "featx\[ray\]"'):
        require_ray()
    with pytest.raises(FeatxError, match=r'pip install "featx\[ray\]"'):
        extract(open_source(str(image_folder)), store=tmp_path, engine="ray", **OPTIONS)
    assert main(["extract", str(image_folder), "--model", TINY, "--engine", "ray"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "featx[ray]"' in err


def test_ray_engine_options_are_checked(tmp_path, capsys, image_folder):
    """Check that bad engine options and Ray options without --engine ray are refused clearly."""
    with pytest.raises(FeatxError, match="positive number of Ray actors"):
        RayEngine(workers=0).resolve_device()
    with pytest.raises(FeatxError, match="does not fit gpus_per_worker"):
        RayEngine().resolve_device("cuda")
    with pytest.raises(FeatxError, match="Unknown engine"):
        extract(open_source(str(image_folder)), store=tmp_path, engine="spark", **OPTIONS)
    with pytest.raises(FeatxError, match="writes to a feature store"):
        extract(open_source(str(image_folder)), engine="ray", **OPTIONS)
    assert main(["extract", str(image_folder), "--model", TINY, "--address", "auto"]) == 1
    assert "--address is an option of the Ray engine" in capsys.readouterr().err


def test_import_featx_does_not_import_ray():
    """Check that importing featx, its CLI, extraction and this module leaves Ray unimported."""
    import subprocess

    code = ("import sys, featx, featx.cli, featx.extraction, featx.shards, featx.distributed; "
            "featx.cli.build_parser(); print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_ray_engine_applies_max_pixels(tmp_path, ray_cluster):
    """Check that max_pixels travels to the Ray actors: a 300×300 PNG above it is skipped there, naming the fix."""
    from PIL import Image

    path = tmp_path / "large.png"
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(path)
    result = extract([str(path)], store=tmp_path / "s", engine=RayEngine(workers=1), on_error="skip",
                     max_pixels=10_000, **OPTIONS)
    assert len(result.skipped) == 1 and "pass --max-pixels 90000 (CLI)" in result.skipped[0][1]
