"""Sharded extraction and the merge of shard stores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, make_images
from featx.cli import main
from featx.exceptions import CacheMismatchError, FeatxError
from featx.extraction import extract
from featx.images import content_key, open_source
from featx.shards import check_shard, in_shard, merge_stores, parse_shard, shard_path, sibling_shards
from featx.store import FeatureStore, list_stores

# One batch per run: the CPU kernels for a batch of one image round differently (1e-8 here) from
# those of larger batches, whose results do not depend on what else is in the batch.
OPTIONS = dict(backbone=TINY, layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu", batch_size=32,
               num_workers=0, progress=False)


def _rows(store) -> dict:
    keys = list(store.keys)
    return {entry: (keys, store.read(keys, *entry)) for entry in store.entries}


def _assert_same(merged: FeatureStore, single: FeatureStore) -> None:
    got, want = _rows(merged), _rows(single)
    assert got.keys() == want.keys()
    for entry, (keys, values) in want.items():
        assert got[entry][0] == keys
        np.testing.assert_array_equal(got[entry][1], values)


@pytest.fixture
def source():
    arrays, labels = make_images(n_per_class=6, n_classes=3)
    return open_source(arrays, labels=labels)


def test_in_shard_partitions_keys_deterministically(source):
    """Check that the parts of N are disjoint, cover every key, and depend on the key alone."""
    keys = [content_key(item) for item in source]
    masks = np.array([in_shard(keys, (part, 3)) for part in range(3)])
    assert (masks.sum(axis=0) == 1).all()
    assert masks.sum(axis=1).min() >= 1
    np.testing.assert_array_equal(in_shard(keys[::-1], (1, 3)), masks[1][::-1])
    assert not in_shard([None], (0, 1)).any()


@pytest.mark.parametrize(
    "text, match",
    [("3", "expects I/N"), ("1-3", "expects I/N"), ("a/3", "expects I/N"), ("3/3", "numbered from 0"),
     ("0/0", "at least 1"), ("-1/3", "expects I/N")],
)
def test_parse_shard_refuses_bad_values(text, match):
    """Check that --shard values other than I/N with 0 <= I < N are refused with the rule."""
    with pytest.raises(FeatxError, match=match):
        parse_shard(text)


def test_check_shard_accepts_pairs_only():
    """Check that a shard is a pair of integers."""
    assert check_shard([1, 2]) == (1, 2)
    for bad in ((1.5, 2), ("1", 2), (1,), (True, 2)):
        with pytest.raises(FeatxError, match="pair of integers"):
            check_shard(bad)


def test_shards_merged_equal_a_single_run(tmp_path, source):
    """Check that 3 shards merged give the single run's store, key for key and value for value."""
    cache = tmp_path / "shards"
    results = [extract(source, store=cache, shard=(part, 3), **OPTIONS) for part in range(3)]
    assert sum(r.n_computed for r in results) == len(source)
    assert min(r.n_computed for r in results) >= 2  # no batch of a single image (see OPTIONS)
    assert [len(r.kept) for r in results] == [r.n_computed for r in results]
    main_path = results[0].store.path.with_name(results[0].store.path.name.split(".shard-")[0] + ".h5")
    assert results[0].store.path == shard_path(main_path, (0, 3))
    shards = sibling_shards(main_path)
    assert [p.name.split(".")[-2] for p in shards] == ["shard-0000-of-0003", "shard-0001-of-0003",
                                                      "shard-0002-of-0003"]
    assert list_stores(cache) == []  # shard stores are not main stores
    report = merge_stores(shards, cache)
    assert report["output"] == str(main_path) and report["n_keys"] == len(source)
    single = extract(source, store=tmp_path / "single", **OPTIONS)
    merged = FeatureStore(main_path)
    _assert_same(merged, single.store)
    assert merged.verify()["ok"]
    assert merged.info()["journal_segments"] == 0
    assert merge_stores(shards, cache)["rows_copied"] == 0  # merging again copies nothing
    again = extract(source, store=cache, **OPTIONS)  # the merged store is the main store: nothing to compute
    assert again.n_computed == 0
    np.testing.assert_array_equal(again["stage2/spp"], single["stage2/spp"])


def test_cnnfeatures_reads_a_merged_store_without_the_network(tmp_path, source, monkeypatch):
    """Check that CNNFeatures on the cache folder of merged shards reads them and never runs the loop."""
    import featx.extraction
    from featx.transformers import CNNFeatures

    cache = tmp_path / "c"
    parts = [extract(source, store=cache, shard=(part, 2), **OPTIONS) for part in range(2)]
    merge_stores([p.store.stores[0].path for p in parts], cache)
    single = extract(source, store=tmp_path / "single", **OPTIONS)

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran, but every feature is in the merged store")

    monkeypatch.setattr(featx.extraction, "iter_batches", no_network)
    features = CNNFeatures(TINY, layer="stage2", pooling="spp", cache=cache, prefetch="none", device="cpu",
                           num_workers=0).fit().transform(source)
    np.testing.assert_array_equal(features, single["stage2/spp"])


def test_shard_result_reads_its_part(tmp_path, source):
    """Check that a shard run's result holds the features of its own part, equal to a single run's."""
    single = extract(source, store=tmp_path / "single", **OPTIONS)
    part = extract(source, store=tmp_path / "shards", shard=(1, 2), **OPTIONS)
    members = np.flatnonzero(in_shard(single.keys, (1, 2)))
    np.testing.assert_array_equal(part.kept, members)
    np.testing.assert_array_equal(part["pre_logits/avg"], single["pre_logits/avg"][members])
    assert part.summary().startswith(f"shard 1/2: {len(members)} of {len(source)} images belong to it")


def test_shard_rerun_computes_nothing_held_by_any_shard(tmp_path, source):
    """Check that a re-run shard, or a shard of another N, skips keys that any shard or the main store holds."""
    cache = tmp_path / "c"
    first = extract(source, store=cache, shard=(0, 2), **OPTIONS)
    assert first.n_computed > 0
    assert extract(source, store=cache, shard=(0, 2), **OPTIONS).n_computed == 0
    extract(source, store=cache, shard=(1, 2), **OPTIONS)
    for part in range(3):  # another split: every key is held by a shard of the 2-way split
        assert extract(source, store=cache, shard=(part, 3), **OPTIONS).n_computed == 0
    assert extract(source, store=cache, **OPTIONS).n_computed == len(source)  # the main store was never merged
    assert extract(source, store=cache, shard=(0, 5), **OPTIONS).n_computed == 0  # the main store is looked up


def test_merge_refuses_shards_of_another_configuration(tmp_path, source):
    """Check that shards of different configurations are refused, naming both stores and the fields."""
    cache = tmp_path / "c"
    fp32 = {**OPTIONS, "precision": "fp32"}  # 'auto' is bf16 on CPUs with native bf16
    a = extract(source, store=cache, shard=(0, 2), **fp32)
    b = extract(source, store=cache, shard=(1, 2), dtype="float16", **fp32)
    c = extract(source, store=cache, shard=(1, 2), **{**OPTIONS, "precision": "bf16"})
    pa, pb, pc = (r.store.stores[0].path for r in (a, b, c))
    with pytest.raises(CacheMismatchError, match=r"(?s)dtype: \"float32\" in .*shard-0000.* but \"float16\" in"):
        merge_stores([pa, pb], tmp_path / "out")
    with pytest.raises(CacheMismatchError, match=r"(?s)precision: \"fp32\" in .* but \"bf16\" in") as info:
        merge_stores([pa, pc], tmp_path / "out")
    assert pa.name in str(info.value) and pc.name in str(info.value)
    assert not (tmp_path / "out").exists()


def test_merge_refuses_output_of_another_configuration_and_non_stores(tmp_path, source):
    """Check that merging into a store of another configuration, into a shard, or from a non-store is refused."""
    a = extract(source, store=tmp_path / "a", shard=(0, 2), **OPTIONS)
    other = extract(source, store=tmp_path / "b", dtype="float16", **OPTIONS)
    shard = a.store.stores[0].path
    with pytest.raises(CacheMismatchError, match="another configuration"):
        merge_stores([shard], other.store.path)
    with pytest.raises(FeatxError, match="is one of the shards"):
        merge_stores([shard], shard)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(FeatxError, match="not a featx feature store"):
        merge_stores([tmp_path / "junk.h5"], tmp_path / "out")
    with pytest.raises(FeatxError, match="holds no shard stores"):
        merge_stores([tmp_path / "b"], tmp_path / "out")


def test_shard_needs_a_store(source):
    """Check that shard= without a store says to pass one."""
    with pytest.raises(FeatxError, match="writes to a feature store"):
        extract(source, shard=(0, 2), **OPTIONS)


EXTRACT = ["--model", TINY, "--layers", "stage2,pre_logits", "--pool", "avg,spp", "--batch-size", "4",
           "--workers", "0", "--device", "cpu"]


def test_cli_shard_merge_verify_then_cv_reads_merged(tmp_path, capsys, monkeypatch, image_folder):
    """Check 'featx extract --shard' over 3 parts, 'featx cache merge', verify, and cv on the merged store."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEATX_CACHE", str(cache))
    computed = 0
    for part in range(3):
        assert main(["extract", str(image_folder), *EXTRACT, "--shard", f"{part}/3", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["shard"] == [part, 3]
        computed += report["n_computed"]
    assert computed == 12
    shards = sorted(str(p) for p in cache.glob("*.shard-*.h5"))
    assert main(["cache", "merge", *shards, "-o", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "merged 3 stores" in out and "12 images" in out
    [merged] = list_stores(cache)
    assert merged["n_keys"] == 12
    assert main(["cache", "verify", merged["path"]]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")
    assert main(["cv", str(image_folder), *EXTRACT, "--cv", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {row["layer"] for row in rows} == {"stage2", "pre_logits"}
    assert main(["extract", str(image_folder), *EXTRACT, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_computed"] == 0  # cv computed nothing either: all merged


@pytest.mark.parametrize("value, match", [("2/2", "numbered from 0"), ("x", "expects I/N")])
def test_cli_shard_bad_value_is_one_line_exit_1(value, match, capsys, image_folder):
    """Check that a bad --shard is one error line and exit code 1."""
    assert main(["extract", str(image_folder), *EXTRACT, "--shard", value]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and match in err


def test_cli_cache_merge_needs_output_and_shards(capsys, tmp_path):
    """Check that 'featx cache merge' without shards or -o says what is missing."""
    assert main(["cache", "merge", "-o", str(tmp_path)]) == 1
    assert "needs the shard stores" in capsys.readouterr().err
    assert main(["cache", "merge", str(tmp_path / "a.h5")]) == 1
    assert "needs -o OUT" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_shards_run_concurrently_then_merge_equal_a_single_run(tmp_path, image_folder):
    """Check that 3 'featx extract --shard' processes at once, merged, equal one single-process run."""
    import os
    import subprocess
    import sys

    options = [*EXTRACT[:-6], "--batch-size", "32", "--workers", "0", "--device", "cpu"]  # one batch per part
    env = {**os.environ, "FEATX_CACHE": str(tmp_path / "shared")}
    procs = [
        subprocess.Popen([sys.executable, "-m", "featx", "extract", str(image_folder), *options, "--shard", f"{i}/3"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(3)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert out.startswith("shard ")
    report = merge_stores([tmp_path / "shared"], tmp_path / "shared")
    assert report["n_keys"] == 12 and len(report["shards"]) == 3
    single = extract(open_source(str(image_folder)), store=tmp_path / "single", backbone=TINY,
                     layers=["stage2", "pre_logits"], pooling=["avg", "spp"], device="cpu", batch_size=32,
                     num_workers=0, progress=False)
    got, want = _rows(FeatureStore(report["output"])), _rows(single.store)
    assert got.keys() == want.keys()
    for entry, (keys, values) in want.items():
        assert got[entry][0] == keys
        # JPEG bytes (so keys and parts) depend on the codec build: a part of one image runs a
        # batch of one, which the CPU kernels round differently (1e-8); exact equality is above.
        np.testing.assert_allclose(got[entry][1], values, rtol=0, atol=1e-6)
