"""Tests for featx.store.claims: concurrent extractions into one store divide the keys."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from featx.exceptions import StoreError
from featx.store import FeatureStore, WorkShare, remove_store
from featx.store.claims import live_writers
from featx.store.names import claims_dir

ENTRY = ("stage1", "avg")
KEYS = [f"{i:032x}" for i in range(20)]
NEEDS = {key: frozenset([ENTRY]) for key in KEYS}


@pytest.fixture
def store(tmp_path):
    return FeatureStore.open({"backbone": "featx_tiny_cnn"}, cache_dir=tmp_path)


def _share(store, keys=KEYS, **kwargs):
    messages = []
    kwargs.setdefault("chunk", 4)
    share = WorkShare(store, store, keys, {key: NEEDS[key] for key in keys}, notify=messages.append, **kwargs)
    share.messages = messages
    return share


def _commit(store, share, positions):
    keys = [share.keys[p] for p in positions]
    store.write(keys, {ENTRY: np.full((len(keys), 4), 1.0)})
    share.finished(keys)
    return keys


def test_workshare_two_runs_compute_disjoint_keys(store):
    """Check that two runs claiming in turns compute every key exactly once and wait for each other's."""
    a, b = _share(store), _share(store)
    with a, b:
        batches = {id(a): a.batches(2), id(b): b.batches(2)}
        computed = {id(a): [], id(b): []}
        live = [a, b]
        while live:  # one batch each in turn, as two processes would
            for share in list(live):
                positions = next(batches[id(share)], None)
                if positions is None:
                    live.remove(share)
                else:
                    computed[id(share)] += _commit(store, share, positions)
        assert not set(computed[id(a)]) & set(computed[id(b)])
        assert sorted(computed[id(a)] + computed[id(b)]) == KEYS
        assert a.wait() is False and b.wait() is False
        assert len(computed[id(a)]) + a.n_from_others == len(KEYS) == len(computed[id(b)]) + b.n_from_others
    assert not b.last and a.last and not claims_dir(store.path).exists()  # b ends first, a last


def test_workshare_says_once_that_another_run_writes(store):
    """Check that a run says once, naming the other run's pid, that another process writes to the store."""
    a = _share(store)
    with a:
        b = _share(store)
        with b:
            for _ in b.batches(2):
                pass
        assert b.messages == [
            f"another process (pid {os.getpid()} on {a.me.host}, writing since {a.me.since}) is writing to the "
            f"store {store.path}: the images it commits are skipped here"
        ]
        assert a.messages == []


def test_workshare_waits_for_rows_another_run_claimed(store):
    """Check that keys another run claimed are left to it, and counted as its once it commits them."""
    a, b = _share(store, chunk=20), _share(store)
    with a, b:
        [claimed] = list(a.batches(20))
        assert list(b.batches(2)) == []  # everything is claimed by a
        _commit(store, a, claimed)
        assert b.wait() is False
        assert b.n_from_others == len(KEYS)


def test_workshare_computes_claims_released_without_rows(store):
    """Check that keys whose claim is released uncommitted (the other run failed) are computed here."""
    a, b = _share(store, chunk=8), _share(store)
    with b:
        with a:
            first = next(a.batches(8))
            own = [p for batch in b.batches(2) for p in batch]
            assert not set(own) & set(first)
            for start in range(0, len(own), 2):
                _commit(store, b, own[start:start + 2])
        # a ended without committing its claim
        assert b.wait() is True
        rest = [p for batch in b.batches(2) for p in batch]
        assert sorted(rest) == sorted(first)


def test_workshare_takes_over_claims_of_a_dead_process(store, tmp_path):
    """Check that the claims of a process killed mid-chunk are removed and its keys computed here."""
    script = textwrap.dedent(f"""
        import sys, time
        from featx.store import FeatureStore, WorkShare
        store = FeatureStore({str(store.path)!r})
        keys = {KEYS[:10]!r}
        share = WorkShare(store, store, keys, {{k: frozenset([{ENTRY!r}]) for k in keys}}, chunk=10).__enter__()
        next(share.batches(10))
        print("claimed", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "claimed"
        b = _share(store)
        with b:
            own = [p for batch in b.batches(4) for p in batch]
            assert sorted(own) == list(range(10, 20))
            assert f"pid {child.pid} on" in b.messages[0]
            child.kill()
            child.wait()
            assert b.wait() is True
            assert sorted(p for batch in b.batches(4) for p in batch) == list(range(10))
    finally:
        child.kill()
        child.wait()
    assert not claims_dir(store.path).exists()


def test_workshare_takes_over_a_claim_that_commits_nothing(store):
    """Check that a live run that commits nothing for ``timeout`` seconds has its keys computed here, with a message."""
    a, b = _share(store, chunk=20), _share(store, timeout=0.3)
    with a, b:
        next(a.batches(20))
        assert list(b.batches(2)) == []
        start = time.monotonic()
        assert b.wait() is True
        assert time.monotonic() - start >= 0.3
        assert len([p for batch in b.batches(2) for p in batch]) == len(KEYS)
        assert "has committed nothing for 0.3 s: computing its 20 claimed images here" in b.messages[-1]


def test_workshare_stops_waiting_when_asked(store):
    """Check that wait() ends with KeyboardInterrupt when stop() says so, releasing nothing of the other run."""
    a, b = _share(store, chunk=20), _share(store)
    with a, b:
        next(a.batches(20))
        list(b.batches(2))
        with pytest.raises(KeyboardInterrupt):
            b.wait(lambda: True)
        assert len(live_writers(store.path)) == 2


def test_remove_store_waits_for_a_running_extraction(store):
    """Check that remove_store refuses, naming the process, while an extraction writes to the store."""
    share = _share(store)
    with share:
        with pytest.raises(StoreError, match=rf"another process \(pid {os.getpid()} on .* is extracting into the store"):
            remove_store(store.path, lock_timeout=0.2)
        assert store.path.exists()
    remove_store(store.path)
    assert not store.path.exists() and not claims_dir(store.path).exists()
