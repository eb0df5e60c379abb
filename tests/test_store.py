"""Tests of featx.store: the HDF5 feature store, its journal, its lock and its durability."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import multiprocessing
import os
import pathlib
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import featx.store
import featx.store.mainfile
import featx.store.snapshot
from featx.exceptions import CacheMismatchError, FeatxError, MissingKeysError, StoreError
from featx.store import (
    FeatureSet,
    FeatureStore,
    StoreInputError,
    canonical_json,
    config_hash,
    default_cache_dir,
    list_stores,
    remove_store,
    store_path,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {"backbone": "featx_tiny_cnn", "weights": "seed0", "preprocessing": {"size": 32, "crop": 32}}
ENTRY = ("stage1", "avg")


def make_keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:032x}" for i in range(start, start + n)]


def relu_features(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.maximum(rng.standard_normal((n, d)), 0).astype(np.float32)


def child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.fixture
def store(tmp_path):
    return FeatureStore.open(CONFIG, cache_dir=tmp_path, provenance={"featx": "0.1.0", "torch": "2.5"})


def journal_dir(store: FeatureStore) -> pathlib.Path:
    return store.path.with_name(store.path.name + ".journal")


# ---------------------------------------------------------------------------------- names


def test_canonical_json_is_order_free_and_compact():
    """Check that canonical_json sorts keys at every depth and writes compact ASCII."""
    a = canonical_json({"b": 1, "a": {"y": (1, 2), "x": np.float32(0.5)}, "c": "é"})
    b = canonical_json({"c": "é", "a": {"x": 0.5, "y": [1, 2]}, "b": np.int64(1)})
    assert a == b == '{"a":{"x":0.5,"y":[1,2]},"b":1,"c":"\\u00e9"}'


@pytest.mark.parametrize(
    ("value", "match"),
    [({"s": {1, 2}}, "set"), ({"x": float("nan")}, "finite"), ({1: "a"}, "keys must be strings")],
)
def test_canonical_json_rejects_unstable_values(value, match):
    """Check that values without a stable JSON text are refused with a clear message."""
    with pytest.raises(StoreInputError, match=match):
        canonical_json(value)


def test_config_hash_is_12_hex_of_sha256():
    """Check that config_hash is the first 12 hex characters of sha256(canonical JSON)."""
    expected = hashlib.sha256(b'{"backbone":"x","size":224}').hexdigest()[:12]
    assert config_hash({"size": 224, "backbone": "x"}) == expected


def test_default_cache_dir_reads_env_at_call_time(monkeypatch, tmp_path):
    """Check that FEATX_CACHE is read at each call, and 'cache' is the fallback."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "a"))
    assert default_cache_dir() == tmp_path / "a"
    assert store_path(CONFIG).parent == tmp_path / "a"
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path / "b"))
    assert FeatureStore.open(CONFIG).path.parent == tmp_path / "b"
    monkeypatch.delenv("FEATX_CACHE")
    assert default_cache_dir() == pathlib.Path("cache")


def test_store_path_sanitizes_backbone(tmp_path):
    """Check that the backbone name becomes a safe file name prefix."""
    config = {"backbone": "timm:resnet18/x"}
    assert store_path(config, tmp_path) == tmp_path / f"timm-resnet18-x-{config_hash(config)}.h5"


def test_store_path_requires_backbone(tmp_path):
    """Check that a configuration without a backbone name is refused."""
    with pytest.raises(StoreInputError, match="no backbone name"):
        store_path({"weights": "x"}, tmp_path)


# --------------------------------------------------------------------------------- opening


def test_open_creates_one_file_with_root_attributes(store):
    """Check that open() writes one main file holding the configuration and provenance."""
    assert sorted(p.name for p in store.path.parent.iterdir()) == [store.path.name, store.path.name + ".lock"]
    with h5py.File(store.path, "r") as f:
        assert f.attrs["featx_config"] == canonical_json(CONFIG)
        assert f.attrs["config_hash"] == config_hash(CONFIG)
        assert f.attrs["dtype"] == "float32"
        assert f.attrs["format_version"] == 1
        assert f.attrs["created"].endswith("+00:00") and f.attrs["updated"].endswith("+00:00")
        assert json.loads(f.attrs["provenance"]) == {"featx": "0.1.0", "torch": "2.5"}
    assert store.config == CONFIG and store.provenance["torch"] == "2.5"
    assert store.entries == [] and store.keys.size == 0


def test_open_reopens_an_existing_store(store):
    """Check that opening the same configuration again finds the written rows."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 3))})
    again = FeatureStore.open(CONFIG, cache_dir=store.path.parent)
    assert again.path == store.path and again.keys.tolist() == make_keys(2)


def test_open_rejects_unknown_dtype(tmp_path):
    """Check that a dtype other than float32/float16 is refused."""
    with pytest.raises(StoreInputError, match="unsupported store dtype 'float64'"):
        FeatureStore.open(CONFIG, cache_dir=tmp_path, dtype="float64")


def test_open_config_mismatch_names_existing_and_requested(store):
    """Check that a store holding another configuration is refused, naming each difference."""
    other = {**CONFIG, "weights": "seed1", "preprocessing": {"size": 64, "crop": 32}}
    shutil.copy(store.path, store_path(other, store.path.parent))
    with pytest.raises(CacheMismatchError, match="weights: existing \"seed0\" but \"seed1\" was requested") as info:
        FeatureStore.open(other, cache_dir=store.path.parent)
    assert 'preprocessing.size: existing 32 but 64 was requested' in str(info.value)
    assert "crop" not in str(info.value)


def test_open_dtype_mismatch(store):
    """Check that asking float16 of a float32 store is refused with both values."""
    with pytest.raises(CacheMismatchError, match="dtype: existing 'float32' but 'float16' was requested"):
        FeatureStore.open(CONFIG, cache_dir=store.path.parent, dtype="float16")


def test_init_missing_store_says_how_to_create(tmp_path):
    """Check that opening a path without a store names it and says how to make one."""
    with pytest.raises(StoreError, match=r"no feature store at .*nope\.h5.*featx extract"):
        FeatureStore(tmp_path / "nope.h5")


def test_init_rejects_files_that_are_not_stores(tmp_path):
    """Check that a non-HDF5 file and an HDF5 file without featx attributes are refused."""
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(StoreError, match="not a featx feature store: it cannot be read as HDF5"):
        FeatureStore(tmp_path / "text.h5")
    with h5py.File(tmp_path / "plain.h5", "w-") as f:
        f["x"] = np.arange(3)
    with pytest.raises(StoreError, match="not a featx feature store: it lacks the attribute"):
        FeatureStore(tmp_path / "plain.h5")


def test_close_then_use_raises(store):
    """Check that a closed store refuses to be used, and says how to reopen it."""
    with store:
        pass
    with pytest.raises(StoreError, match="is closed; open it again"):
        store.read(make_keys(1), *ENTRY)


def test_import_does_not_load_torch():
    """Check that importing featx.store does not import torch."""
    code = "import sys, featx.store; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- read/write


@pytest.mark.parametrize("consolidated", [False, True])
def test_read_round_trip_in_asked_order_with_duplicates(store, consolidated):
    """Check that read returns float32 rows in the order asked, duplicates included."""
    keys = make_keys(20)
    X = relu_features(20, 6)
    store.write(keys[:12], {ENTRY: X[:12]})
    store.write(keys[12:], {ENTRY: X[12:].astype(np.float64)})
    if consolidated:
        store.consolidate()
    order = [19, 0, 5, 5, 12, 3, 19]
    got = store.read([keys[i] for i in order], *ENTRY)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, X[order])
    assert store.read([], *ENTRY).shape == (0, 6)
    assert store.keys.tolist() == keys


def test_read_set_returns_keys_layer_and_pooling(store):
    """Check that read_set wraps the rows with their keys, layer and pooling."""
    keys = make_keys(3)
    store.write(keys, {ENTRY: relu_features(3, 4)})
    fs = store.read_set(keys[::-1], *ENTRY)
    assert isinstance(fs, FeatureSet)
    assert fs.keys.tolist() == keys[::-1] and (fs.layer, fs.pooling) == ENTRY
    np.testing.assert_array_equal(fs.X, relu_features(3, 4)[::-1])


def test_read_missing_keys_says_how_many_and_how_to_fix(store):
    """Check that reading absent keys names how many of how many, the first ones, and the fix."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    asked = make_keys(6)
    with pytest.raises(MissingKeysError, match=r"4 of 6 keys have no features for stage1/avg") as info:
        store.read(asked, *ENTRY)
    message = str(info.value)
    assert asked[2] in message and asked[5] not in message and "featx extract" in message


def test_read_unknown_entry_lists_entries_held(store):
    """Check that an entry the store lacks is reported with the entries it holds."""
    store.write(make_keys(1), {ENTRY: np.ones((1, 4)), ("stage2", "max"): np.ones((1, 2))})
    with pytest.raises(MissingKeysError, match=r"holds no features for layer 'stage1' with pooling 'max'.*"
                       r"It holds: stage1/avg, stage2/max"):
        store.read(make_keys(1), "stage1", "max")
    with pytest.raises(MissingKeysError, match="Did you mean 'stage2/max'"):
        store.dim("stage3", "max")


def test_write_float16_store(tmp_path):
    """Check that a float16 store keeps float16 on disk and reads back float32."""
    store = FeatureStore.open(CONFIG, cache_dir=tmp_path, dtype="float16")
    X = relu_features(5, 8) * 100
    store.write(make_keys(5), {ENTRY: X})
    expected = X.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(store.read(make_keys(5), *ENTRY), expected)
    store.consolidate()
    with h5py.File(store.path, "r") as f:
        assert f["features/stage1/avg/data"].dtype == np.float16
    got = store.read(make_keys(5), *ENTRY)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_write_float16_overflow_is_refused(tmp_path):
    """Check that values beyond the float16 range are refused rather than stored as inf."""
    store = FeatureStore.open(CONFIG, cache_dir=tmp_path, dtype="float16")
    with pytest.raises(StoreInputError, match="beyond the float16 range.*dtype='float32'"):
        store.write(make_keys(1), {ENTRY: np.full((1, 2), 1e6)})


def test_write_new_entry_for_existing_keys(store):
    """Check that a layer added later for stored keys is its own entry, old entries untouched."""
    keys = make_keys(4)
    store.write(keys, {ENTRY: relu_features(4, 4, 1)})
    store.consolidate()
    store.write(keys[1:3], {("blocks.4", "avg"): relu_features(2, 7, 2)})
    assert store.entries == [("blocks.4", "avg"), ENTRY]
    for _ in range(2):
        np.testing.assert_array_equal(store.read(keys[2:0:-1], "blocks.4", "avg"), relu_features(2, 7, 2)[::-1])
        np.testing.assert_array_equal(store.read(keys, *ENTRY), relu_features(4, 4, 1))
        assert store.contains(keys, "blocks.4", "avg").tolist() == [False, True, True, False]
        assert store.dim("blocks.4", "avg") == 7
        store.consolidate()
    with h5py.File(store.path, "r") as f:
        assert f["features/blocks.4/avg/keys"].shape == (2,)


def test_missing_lists_keys_lacking_an_entry_in_given_order(store):
    """Check that missing() returns unique keys lacking any entry, in first-given order."""
    keys = make_keys(5)
    store.write(keys[:4], {ENTRY: np.ones((4, 2))})
    store.write(keys[:2], {("stage2", "avg"): np.ones((2, 3))})
    asked = [keys[4], keys[3], keys[0], keys[4], keys[1], keys[2]]
    assert store.missing(asked, [ENTRY]) == [keys[4]]
    assert store.missing(asked, [ENTRY, ("stage2", "avg")]) == [keys[4], keys[3], keys[2]]
    assert store.missing(asked, [("stage9", "avg")]) == [keys[4], keys[3], keys[0], keys[1], keys[2]]
    assert store.missing(asked, []) == []


def test_write_keeps_first_copy_of_a_key_repeated_in_a_batch(store):
    """Check that a key given twice in one batch is stored once, with its first row."""
    k = make_keys(1)[0]
    store.write([k, k], {ENTRY: np.array([[1.0, 2.0], [3.0, 4.0]])})
    store.consolidate()
    np.testing.assert_array_equal(store.read([k], *ENTRY), [[1.0, 2.0]])
    assert store.info()["entries"][0]["n"] == 1


def test_write_rejects_dim_change(store):
    """Check that writing another dim for an existing entry names both dims."""
    store.write(make_keys(1), {ENTRY: np.ones((1, 4))})
    with pytest.raises(StoreInputError, match=r"holds 4-dimensional features \(existing\) but 5 columns"):
        store.write(make_keys(1, 1), {ENTRY: np.ones((1, 5))})


@pytest.mark.parametrize(
    ("keys", "features", "match"),
    [
        (make_keys(2), {ENTRY: np.ones((3, 4))}, r"have shape \(3, 4\) but 2 keys were given"),
        (make_keys(2), {ENTRY: np.ones(2)}, r"expected an array of shape \(2, dim\)"),
        (make_keys(2), {ENTRY: np.array([[1.0, np.nan], [np.inf, 0.0]])}, "1 NaN and 1 infinite values"),
        (make_keys(1), {("a/b", "avg"): np.ones((1, 2))}, "invalid layer name 'a/b'"),
        (make_keys(1), {("stage1", ""): np.ones((1, 2))}, "invalid pooling name ''"),
        (make_keys(1), {"stage1": np.ones((1, 2))}, r"an entry is a \(layer, pooling\) pair"),
        (["ABC"], {ENTRY: np.ones((1, 2))}, "1 of 1 keys are not content keys.*'ABC'"),
        (["g" * 32], {ENTRY: np.ones((1, 2))}, "32 lowercase hex"),
        ("a" * 32, {ENTRY: np.ones((1, 2))}, "not one string"),
        (make_keys(1), {}, "non-empty mapping"),
        (make_keys(1), {ENTRY: np.array([["a", "b"]])}, "expected real numbers"),
    ],
)
def test_write_rejects_bad_input(store, keys, features, match):
    """Check that bad keys, names, shapes and values are refused and nothing is written."""
    with pytest.raises(StoreInputError, match=match):
        store.write(keys, features)
    assert store.entries == [] and not journal_dir(store).exists()


# -------------------------------------------------------------------------- consolidation


def test_consolidate_merges_empties_journal_and_is_idempotent(store):
    """Check that consolidate merges the journal into one sorted, chunked file, and repeats safely."""
    rng = np.random.default_rng(0)
    keys = [f"{k:032x}" for k in rng.choice(10**9, 100, replace=False)]
    X = relu_features(100, 1280)
    for start in range(0, 100, 25):
        store.write(keys[start : start + 25], {ENTRY: X[start : start + 25]})
    assert len(list(journal_dir(store).iterdir())) == 4
    store.consolidate()
    assert not journal_dir(store).exists()
    inode = store.path.stat().st_ino
    store.consolidate()
    assert store.path.stat().st_ino == inode
    with h5py.File(store.path, "r") as f:
        group = f["features/stage1/avg"]
        on_disk = group["keys"][...]
        assert on_disk.dtype == np.dtype("S32") and (on_disk[1:] > on_disk[:-1]).all()
        data = group["data"]
        assert data.maxshape == (None, 1280) and 64 * 1024 <= data.chunks[0] * 1280 * 4 <= 1024 * 1024
        assert dict(group.attrs) == {"layer": "stage1", "pooling": "avg", "dim": 1280}
        assert f.attrs["updated"] >= f.attrs["created"]
    np.testing.assert_array_equal(store.read(keys, *ENTRY), X)
    assert store.info()["journal_segments"] == 0 and store.verify()["ok"]


def test_reader_sees_journal_before_consolidation(store):
    """Check that another reader sees committed batches that are still in the journal."""
    store.write(make_keys(3), {ENTRY: relu_features(3, 4)})
    reader = FeatureStore(store.path)
    assert reader.info()["journal_segments"] == 1
    np.testing.assert_array_equal(reader.read(make_keys(3), *ENTRY), relu_features(3, 4))


def test_reader_notices_a_replaced_main_file(store):
    """Check that a reader with cached indexes sees rows another instance consolidated."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    store.consolidate()
    reader = FeatureStore(store.path)
    assert reader.contains(make_keys(3), *ENTRY).tolist() == [True, True, False]
    store.write(make_keys(1, 2), {ENTRY: np.full((1, 4), 2.0)})
    store.consolidate()
    assert reader.contains(make_keys(3), *ENTRY).tolist() == [True, True, True]
    np.testing.assert_array_equal(reader.read(make_keys(1, 2), *ENTRY), np.full((1, 4), 2.0))


def test_journal_only_store_opens_and_consolidates(store):
    """Check that a store whose main file is gone is rebuilt from its journal."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    store.path.unlink()
    reader = FeatureStore(store.path)
    assert reader.config == CONFIG and reader.keys.tolist() == make_keys(2)
    reader.consolidate()
    assert store.path.is_file() and FeatureStore(store.path).verify()["ok"]


def test_leftover_temp_file_is_ignored_and_reported(store):
    """Check that a killed writer's temporary file breaks nothing and is removed by the next writer."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    leftover = journal_dir(store) / ".tmp-seg-00000000000000000001-0000001-000000.npz"
    leftover.write_bytes(b"PK\x03\x04 half a batch")
    reader = FeatureStore(store.path)
    np.testing.assert_array_equal(reader.read(make_keys(2), *ENTRY), np.ones((2, 4)))
    report = reader.verify()
    assert report["ok"] and any("leftover temporary file" in w for w in report["warnings"])
    store.write(make_keys(1, 2), {ENTRY: np.ones((1, 4))})
    assert not leftover.exists()


def test_truncated_segment_does_not_break_reads_and_is_reported(store):
    """Check that a damaged committed segment is skipped by readers and reported by verify."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    good = next(journal_dir(store).iterdir())
    bad = journal_dir(store) / "seg-99999999999999999999-0000001-000000.npz"
    bad.write_bytes(good.read_bytes()[:100])
    reader = FeatureStore(store.path)
    np.testing.assert_array_equal(reader.read(make_keys(2), *ENTRY), np.ones((2, 4)))
    report = reader.verify()
    assert not report["ok"]
    assert any(bad.name in p and "delete it" in p for p in report["problems"])
    assert report["entries"] == {"stage1/avg": {"n": 2, "dim": 4}}
    store.consolidate()
    assert [p.name for p in journal_dir(store).iterdir()] == [bad.name]
    np.testing.assert_array_equal(FeatureStore(store.path).read(make_keys(2), *ENTRY), np.ones((2, 4)))


def test_verify_reports_a_damaged_main_file(store):
    """Check that verify finds unsorted keys and NaN written into the main file by someone else."""
    store.write(make_keys(3), {ENTRY: np.ones((3, 4))})
    store.consolidate()
    with h5py.File(store.path, "a") as f:
        keys = f["features/stage1/avg/keys"]
        keys[0], keys[1] = keys[1], keys[0]
        f["features/stage1/avg/data"][2, 1] = np.nan
    problems = FeatureStore(store.path).verify()["problems"]
    assert any("not sorted" in p for p in problems) and any("1 NaN" in p for p in problems)


# -------------------------------------------------------------------------------- failures


def test_write_no_space_left_leaves_store_unchanged(store, monkeypatch):
    """Check that ENOSPC while writing a batch raises StoreError and keeps the previous content."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})

    def full_disk(file, *args, **kwargs):
        file.write(b"PK\x03\x04partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", full_disk)
    with pytest.raises(StoreError, match=r"no space left on device .* store .* is unchanged"):
        store.write(make_keys(2, 2), {ENTRY: np.zeros((2, 4))})
    monkeypatch.undo()
    assert all(p.name.startswith("seg-") for p in journal_dir(store).iterdir())
    reader = FeatureStore(store.path)
    assert reader.keys.tolist() == make_keys(2) and reader.verify()["ok"]
    np.testing.assert_array_equal(reader.read(make_keys(2), *ENTRY), np.ones((2, 4)))


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def _hdf5_no_space(*args, **kwargs):
    raise OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')")


@pytest.mark.parametrize(
    ("target", "fake"), [((os, "fsync"), _no_space), ((h5py.Dataset, "__setitem__"), _hdf5_no_space)]
)
def test_consolidate_no_space_left_leaves_store_unchanged(store, monkeypatch, target, fake):
    """Check that ENOSPC while consolidating raises StoreError, keeps main file and journal, removes the temp file."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    store.consolidate()
    store.write(make_keys(2, 2), {ENTRY: np.zeros((2, 4))})
    inode = store.path.stat().st_ino
    monkeypatch.setattr(*target, fake)
    with pytest.raises(StoreError, match="no space left on device while writing the consolidated store"):
        store.consolidate()
    monkeypatch.undo()
    assert store.path.stat().st_ino == inode
    assert [p.name for p in store.path.parent.iterdir() if ".tmp-" in p.name] == []
    reader = FeatureStore(store.path)
    assert reader.info()["journal_segments"] == 1 and reader.verify()["ok"]
    np.testing.assert_array_equal(reader.read(make_keys(4), *ENTRY), [[1.0] * 4] * 2 + [[0.0] * 4] * 2)


# -------------------------------------------------------------------------------- writers

def start_forked(target, *args):
    """Run ``target(out, *args)`` in a forked process; return it and a reader of the lines it writes to ``out``."""
    read_fd, write_fd = os.pipe()
    child = multiprocessing.get_context("fork").Process(target=_forked_main, args=(target, write_fd, *args))
    child.start()
    os.close(write_fd)
    return child, os.fdopen(read_fd)


def _forked_main(target, write_fd, *args):
    with os.fdopen(write_fd, "w", buffering=1) as out:
        target(out, *args)


def batch(i: int) -> tuple[list[str], dict]:
    rng = np.random.default_rng(i)
    keys = [f"{i:016x}{j:016x}" for j in range(8)]
    return keys, {ENTRY: relu_features(8, 16, i), ("blocks.4", "max"): rng.random((8, 3), dtype=np.float32)}


def read_line(lines, child) -> str:
    line = lines.readline()
    assert line, f"the child process ended early (exit code {child.join(5) or child.exitcode})"
    return line.strip()


def check_batches(store: FeatureStore, committed) -> None:
    for i in committed:
        keys, features = batch(i)
        for (layer, pooling), expected in features.items():
            np.testing.assert_array_equal(store.read(keys, layer, pooling), expected, err_msg=f"batch {i}")


def write_batches(out, path, start, consolidate_every=3):
    store = FeatureStore(path)
    with store.writer():
        for i in itertools.count(start):
            store.write(*batch(i))
            print(i, file=out)
            if i % consolidate_every == consolidate_every - 1:
                store.consolidate()


def write_one_key(out, path, lock_timeout):
    try:
        FeatureStore(path, lock_timeout=lock_timeout).write(["f" * 32], {ENTRY: np.ones((1, 4))})
    except StoreError as exc:
        print(exc, file=out)
        os._exit(3)
    print("written", file=out)


def test_writer_lock_blocks_a_second_process(store):
    """Check that a second process times out on the lock with a clear error, then writes once it is free."""
    with store.writer():
        blocked, blocked_out = start_forked(write_one_key, store.path, 0.2)
        blocked.join(30)
        waiting, waiting_out = start_forked(write_one_key, store.path, 30.0)
        time.sleep(0.3)
        assert waiting.is_alive()
    message = blocked_out.read()
    assert blocked.exitcode == 3, message
    assert f"another process (pid {os.getpid()} on" in message and "lock_timeout" in message
    waiting.join(30)
    assert waiting.exitcode == 0 and waiting_out.read().strip() == "written"
    assert store.contains(["f" * 32], *ENTRY).tolist() == [True]


def test_writer_is_reentrant_within_a_process(store):
    """Check that nested writer() blocks and a second instance in the same process do not deadlock."""
    other = FeatureStore(store.path, lock_timeout=0.1)
    with store.writer(), store.writer():
        store.write(make_keys(1), {ENTRY: np.ones((1, 2))})
        other.write(make_keys(1, 1), {ENTRY: np.ones((1, 2))})
        other.consolidate()
    assert store.keys.tolist() == make_keys(2)


def test_sigkill_at_random_moments_never_corrupts(store):
    """Check that a writer killed at random moments leaves a valid store holding every reported batch."""
    rng = np.random.default_rng(1234)
    committed: list[int] = []
    for _ in range(8):
        child, lines = start_forked(write_batches, store.path, committed[-1] + 1 if committed else 0)
        for _ in range(int(rng.integers(1, 6))):
            committed.append(int(read_line(lines, child)))
        time.sleep(float(rng.uniform(0, 0.02)))
        child.kill()
        child.join(30)
        committed.extend(int(line) for line in lines)
    reader = FeatureStore(store.path)
    report = reader.verify()
    assert report["ok"], report["problems"]
    check_batches(reader, committed)
    reader.consolidate()
    assert sorted(p.name for p in store.path.parent.iterdir()) == [store.path.name, store.path.name + ".lock"]
    assert FeatureStore(store.path).verify()["ok"]
    check_batches(FeatureStore(store.path), committed)


def block_at_replace(out, path, n_call):
    """Write A, consolidate, write B, consolidate; hang at the n-th os.replace (a rename about to commit)."""
    calls = itertools.count(1)
    real_replace = os.replace

    def replace(src, dst):
        if next(calls) == n_call:
            print("blocked", file=out)
            time.sleep(60)
        real_replace(src, dst)

    os.replace = replace
    store = FeatureStore(path)
    for i in (0, 1):
        store.write(*batch(i))
        print(i, file=out)
        store.consolidate()


@pytest.mark.parametrize(("n_call", "committed"), [(1, []), (2, [0]), (3, [0]), (4, [0, 1])])
def test_sigkill_just_before_a_commit(store, n_call, committed):
    """Check that a writer killed just before renaming a segment or a new main file leaves the last committed state."""
    child, lines = start_forked(block_at_replace, store.path, n_call)
    reported = []
    for line in lines:
        if line.strip() == "blocked":
            break
        reported.append(int(line))
    child.kill()
    child.join(30)
    assert reported == committed
    reader = FeatureStore(store.path)
    report = reader.verify()
    assert report["ok"] and any("leftover temporary file" in w for w in report["warnings"]), report
    check_batches(reader, committed)
    assert len(reader.keys) == 8 * len(committed)
    reader.consolidate()
    assert sorted(p.name for p in store.path.parent.iterdir()) == [store.path.name, store.path.name + ".lock"]
    check_batches(FeatureStore(store.path), committed)


def test_reader_during_writes_sees_consistent_rows(store):
    """Check that a reader running while another process writes and consolidates always reads correct rows."""
    child, lines = start_forked(write_batches, store.path, 0, 2)
    reader = FeatureStore(store.path)
    committed: list[int] = []
    deadline = time.monotonic() + 1.0
    try:
        while time.monotonic() < deadline or len(committed) < 6:
            committed.append(int(read_line(lines, child)))
            check_batches(reader, committed[-3:])
            assert reader.contains(batch(committed[0])[0], *ENTRY).all()
    finally:
        child.kill()
        child.join(30)


def test_reader_retries_when_consolidation_removes_a_segment_before_main_opens(store, monkeypatch):
    """Check that a segment consolidated away between listing and opening the main file makes the reader read again."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    reader = FeatureStore(store.path)
    listing = reader._segment_names
    calls = []

    def list_then_consolidate():
        names = listing()
        if not calls:
            calls.append(names)
            store.consolidate()
        return names

    monkeypatch.setattr(reader, "_segment_names", list_then_consolidate)
    np.testing.assert_array_equal(reader.read(make_keys(2), *ENTRY), np.ones((2, 4)))
    assert len(calls[0]) == 1 and not journal_dir(store).exists()


def test_reader_retries_when_consolidation_removes_a_segment_before_its_rows_are_read(store, monkeypatch):
    """Check that a segment consolidated away while the reader holds the old main file makes it read again."""
    store.write(make_keys(2), {ENTRY: np.ones((2, 4))})
    store.consolidate()
    store.write(make_keys(1, 2), {ENTRY: np.full((1, 4), 2.0)})
    reader = FeatureStore(store.path)
    journal_rows = featx.store.snapshot.Snapshot.journal_rows
    calls = []

    def consolidate_then_read(view, *args):
        if not calls:
            calls.append(view.segments[0].name)
            store.consolidate()
        return journal_rows(view, *args)

    monkeypatch.setattr(featx.store.snapshot.Snapshot, "journal_rows", consolidate_then_read)
    np.testing.assert_array_equal(reader.read(make_keys(3), *ENTRY), [[1.0] * 4, [1.0] * 4, [2.0] * 4])
    assert calls and not journal_dir(store).exists()


def test_read_direct_path_matches_hdf5_path(store, monkeypatch):
    """Check that reading rows straight from the file gives what HDF5 gives."""
    rng = np.random.default_rng(3)
    keys = [f"{k:032x}" for k in rng.choice(10**12, 300, replace=False)]
    X = relu_features(300, 700)
    store.write(keys, {ENTRY: X})
    store.consolidate()
    with h5py.File(store.path, "r") as f:
        assert featx.store.mainfile.chunk_offsets(f, f["features/stage1/avg/data"]) is not None
    asked = [keys[i] for i in rng.integers(0, 300, 200)] + keys
    direct = FeatureStore(store.path).read(asked, *ENTRY)
    monkeypatch.setattr("featx.store.mainfile.chunk_offsets", lambda f, dset: None)
    through_hdf5 = FeatureStore(store.path).read(asked, *ENTRY)
    np.testing.assert_array_equal(direct, through_hdf5)
    np.testing.assert_array_equal(direct[200:], X)


# ------------------------------------------------------------------------------ the folder


def test_list_stores_and_remove_store(tmp_path):
    """Check that list_stores describes each store in a folder and remove_store removes all its files."""
    a = FeatureStore.open(CONFIG, cache_dir=tmp_path)
    a.write(make_keys(3), {ENTRY: np.ones((3, 4))})
    b = FeatureStore.open({"backbone": "timm:resnet18"}, cache_dir=tmp_path, dtype="float16")
    (tmp_path / "notes.txt").write_text("not a store")
    listed = list_stores(tmp_path)
    assert [(s["backbone"], s["hash"], s["n_keys"], s["entries"], s["journal_segments"]) for s in listed] == [
        ("featx_tiny_cnn", a.config_hash, 3, ["stage1/avg"], 1),
        ("timm:resnet18", b.config_hash, 0, [], 0),
    ]
    assert all(s["size_bytes"] > 0 for s in listed)
    remove_store(a.path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["notes.txt", b.path.name, b.path.name + ".lock"])
    assert [s["backbone"] for s in list_stores(tmp_path)] == ["timm:resnet18"]
    assert list_stores(tmp_path / "absent") == []


def test_remove_store_refuses_what_is_not_a_store(tmp_path):
    """Check that remove_store refuses a missing path and a file that is not a featx store."""
    with pytest.raises(StoreError, match="no feature store at .*nothing removed"):
        remove_store(tmp_path / "absent.h5")
    (tmp_path / "mine.h5").write_text("precious")
    with pytest.raises(StoreError, match="not a featx feature store"):
        remove_store(tmp_path / "mine.h5")
    assert (tmp_path / "mine.h5").read_text() == "precious"


def test_errors_are_featx_errors():
    """Check that the store's input error is a FeatxError and a ValueError."""
    assert issubclass(StoreInputError, FeatxError) and issubclass(StoreInputError, ValueError)


def test_store_wide_float16_map_rows_round_trip(tmp_path):
    """Check that rows as wide as a Lite0 stage4 map (21,952 values) are stored, consolidated and read back."""
    rng = np.random.default_rng(0)
    data = rng.normal(size=(40, 112 * 14 * 14)).astype(np.float16)
    keys = [f"{i:032x}" for i in range(40)]
    store = FeatureStore.open({"backbone": "wide"}, cache_dir=tmp_path, dtype="float16")
    with store.writer():
        for start in range(0, 40, 16):
            store.write(keys[start:start + 16], {("stage4", "map"): data[start:start + 16]})
        store.consolidate()
    picked = [keys[i] for i in (39, 0, 17)]
    np.testing.assert_array_equal(store.read(picked, "stage4", "map"), data[[39, 0, 17]].astype(np.float32))
    assert store.verify()["ok"]
