import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_info, threadpool_limits

import featx
from featx import threads
from featx.backbones import load_backbone
from featx.exceptions import FeatxError
from featx.threads import (ThreadPlan, check_threads, extraction_scope, head_limits, leave_blas_at_one, plan,
                           restore_blas, set_wait_policy, torch_threads)


def _blas_threads() -> set[int]:
    return {info["num_threads"] for info in threadpool_info() if info["user_api"] == "blas"}


@pytest.fixture
def blas_at_two():
    """BLAS libraries at 2 threads for the test (whatever the machine's cores), no featx limit left over."""
    restore_blas()
    with threadpool_limits(2, user_api="blas"):
        yield
    restore_blas()


@pytest.fixture
def torch_at_two():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_check_threads_refuses_what_is_not_a_plan():
    """Check that threads accepts auto, None and whole numbers >= 1 and names the choices otherwise."""
    assert [check_threads(v) for v in ("auto", None, 1, 4)] == ["auto", None, 1, 4]
    for bad in (0, -1, True, 1.5, "two"):
        with pytest.raises(FeatxError, match="threads must be 'auto', None"):
            check_threads(bad)


def test_plan_user_overrides_win():
    """Check that a number gives the forward pass that many torch threads and leaves BLAS alone, and None touches nothing."""
    assert plan(3) == ThreadPlan(torch=3, blas_after=None)
    assert plan(None) == ThreadPlan(torch=None, blas_after=None)
    assert plan("auto", torch_default=2).blas_after == 1


def test_torch_threads_spinning_waits_on_a_busy_machine_get_one_thread():
    """Check that auto keeps torch's default with passive waits and drops to one thread when spinners would meet a full machine."""
    assert torch_threads(default=2, cores=2, passive=True, load=8.0) == 2
    assert torch_threads(default=2, cores=2, passive=False, load=8.0) == 1
    assert torch_threads(default=2, cores=2, passive=False, load=0.5) == 2
    assert torch_threads(default=8, cores=2, passive=True, load=0.0) == 2  # capped by the cores we may use


def test_extraction_scope_restores_the_callers_torch_threads(torch_at_two):
    """Check that the scope sets the planned torch threads and gives the caller's count back, also after an error."""
    with extraction_scope(1) as used:
        assert torch.get_num_threads() == 1 and used.torch == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError, match="boom"), extraction_scope(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with extraction_scope(None):
        assert torch.get_num_threads() == 2


def test_extract_runs_the_network_on_the_planned_threads(tiny, torch_at_two):
    """Check that featx.extract runs the forward pass on the threads its options say and restores torch's count."""
    backbone = load_backbone(tiny, weights=None)
    seen = []
    backbone.module.register_forward_pre_hook(lambda module, args: seen.append(torch.get_num_threads()))
    images = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    featx.extract(images, backbone=backbone, layers="stage1", device="cpu", threads=1)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2
    seen.clear()
    featx.extract(images, backbone=backbone, layers="stage1", device="cpu", threads=None)
    assert set(seen) == {2}


def test_head_limits_restores_blas_threads(blas_at_two):
    """Check that featx's heads run with one BLAS thread and the counts come back after."""
    with head_limits():
        assert _blas_threads() == {1}
    assert _blas_threads() == {2}


def test_cnnfeatures_auto_leaves_blas_at_one_until_restore(tiny, blas_at_two):
    """Check that CNNFeatures(threads='auto') leaves BLAS at one thread for the next estimator and restore_blas undoes it."""
    X = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    featx.CNNFeatures(tiny, weights=None, layer="stage1", device="cpu", cache=None).fit_transform(X)
    assert _blas_threads() == {1}
    assert restore_blas() is True and _blas_threads() == {2}
    assert restore_blas() is False


def test_cnnfeatures_threads_override_leaves_blas_alone(tiny, blas_at_two):
    """Check that a number or None for threads leaves the process's BLAS threads as the user set them."""
    X = np.random.default_rng(0).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    for value in (1, None):
        featx.CNNFeatures(tiny, weights=None, layer="stage1", device="cpu", cache=None, threads=value).fit_transform(X)
        assert _blas_threads() == {2}


def test_leave_blas_at_one_keeps_a_count_the_user_sets_after_it(blas_at_two):
    """Check that a second call does not undo a BLAS count the user chose after the first one."""
    assert leave_blas_at_one() is True
    with threadpool_limits(2, user_api="blas"):
        assert leave_blas_at_one() is False
        assert _blas_threads() == {2}
    restore_blas()


def test_set_wait_policy_leaves_a_users_value_and_a_loaded_torch(monkeypatch):
    """Check that the wait policy is set only when neither the user nor an already loaded torch decided it."""
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert set_wait_policy() is False and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    monkeypatch.delenv("OMP_WAIT_POLICY")
    assert "torch" in sys.modules and set_wait_policy() is False and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setenv("FEATX_THREADS", "none")
    assert set_wait_policy() is False and "OMP_WAIT_POLICY" not in os.environ
    monkeypatch.delenv("FEATX_THREADS")
    assert set_wait_policy() is True and os.environ["OMP_WAIT_POLICY"] == threads.WAIT_POLICY


def test_import_featx_sets_the_wait_policy_before_torch_loads():
    """Check that in a fresh process 'import featx' sets OMP_WAIT_POLICY=PASSIVE, and a user's value stays."""
    code = "import os, featx, torch; print(os.environ.get('OMP_WAIT_POLICY'))"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "FEATX_THREADS")}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "PASSIVE"
    run = subprocess.run([sys.executable, "-c", code], env={**env, "OMP_WAIT_POLICY": "ACTIVE"}, capture_output=True,
                         text=True, check=True)
    assert run.stdout.strip() == "ACTIVE"
