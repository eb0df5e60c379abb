"""The thread plan: how many threads featx's work uses, and what it leaves behind.

Two cores shared with other work is the normal case. Three things were measured to go wrong
there (2-core machines, other jobs keeping the load at 3 to 16; ``docs/guide.md`` has the figures):

- **OpenMP threads that spin.** torch's OpenMP runtime (libgomp) keeps its threads spinning
  at every barrier; when another job holds one of the cores, each of the network's hundreds of
  parallel regions waits for a thread that is not running: a forward pass with 2 threads took
  3-4× the time of one with 1 thread. With ``OMP_WAIT_POLICY=PASSIVE`` a waiting thread
  sleeps instead, and 2 threads were as fast as 1 under that load (and faster when idle).
  libgomp reads the variable once, when it is loaded (``import torch``), so
  :func:`set_wait_policy` sets it when featx is imported, unless the user set it or torch is
  already loaded.
- **BLAS threads in small heads.** A ``LogisticRegression`` on 200 × 1280 features took 50×
  longer with OpenBLAS's 2 threads than with 1 under load, and 2.6× longer idle: its calls are
  too small to share. featx's own heads and cross-validation run with one BLAS thread
  (:func:`head_limits`), and :class:`~featx.transformers.CNNFeatures` leaves the process's
  BLAS at one thread for the estimator that follows it in a Pipeline (:func:`leave_blas_at_one`,
  undone by :func:`restore_blas`).
- **torch's thread count.** The forward pass runs with :func:`torch_threads` threads inside
  :func:`extraction_scope`, which gives the caller's count back afterwards.

``threads`` (a field of :class:`~featx.options.ExtractOptions`, a parameter of
:class:`~featx.transformers.CNNFeatures`, ``--threads`` on the command line) chooses the plan:
``"auto"`` (the above), a whole number N (the forward pass on N torch threads; BLAS is left as
the user has it), or ``None`` (featx changes no thread setting).

This module imports neither torch nor scikit-learn at import time.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from featx.exceptions import FeatxError

__all__ = [
    "ThreadPlan",
    "available_cores",
    "check_threads",
    "extraction_scope",
    "head_limits",
    "leave_blas_at_one",
    "plan",
    "restore_blas",
    "set_wait_policy",
    "torch_threads",
    "wait_policy_passive",
]

#: The OpenMP wait policy featx asks for, and the variable it is read from.
WAIT_POLICY = "PASSIVE"

# What set_wait_policy found when featx was imported: whether it set the variable itself.
_WAIT_POLICY_SET_BY_FEATX = False
# The threadpoolctl limiter leave_blas_at_one installed (its restore() undoes it), or None.
_BLAS_LEFT = None


def check_threads(value):
    """``value`` if it is a valid ``threads`` setting: ``"auto"``, ``None`` or a whole number ≥ 1.

    Examples
    --------
    >>> check_threads("auto"), check_threads(2), check_threads(None)
    ('auto', 2, None)
    >>> check_threads(0)
    Traceback (most recent call last):
    ...
    featx.exceptions.FeatxError: threads must be 'auto', None (featx changes no thread setting) or a whole number >= 1 (torch threads of the forward pass), got 0.
    """
    if value == "auto" or value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FeatxError(f"threads must be 'auto', None (featx changes no thread setting) or a whole number >= 1 "
                         f"(torch threads of the forward pass), got {value!r}.")
    return value


def set_wait_policy() -> bool:
    """Ask OpenMP runtimes loaded from now on to let waiting threads sleep (``OMP_WAIT_POLICY=PASSIVE``).

    Done once, when featx is imported: only if ``OMP_WAIT_POLICY`` is not set already (the
    user's value wins), ``FEATX_THREADS`` is not ``"none"`` (the opt-out of every thread setting)
    and torch is not loaded yet (its OpenMP runtime has read the variable by then). It also
    reaches scikit-learn's OpenMP runtime if that loads later, and child processes.

    Returns
    -------
    bool
        Whether featx set the variable.
    """
    global _WAIT_POLICY_SET_BY_FEATX
    if ("OMP_WAIT_POLICY" in os.environ or os.environ.get("FEATX_THREADS", "").lower() == "none"
            or "torch" in sys.modules):
        return False
    os.environ["OMP_WAIT_POLICY"] = WAIT_POLICY
    _WAIT_POLICY_SET_BY_FEATX = True
    return True


def wait_policy_passive() -> bool:
    """Whether torch's OpenMP threads sleep when they wait.

    True when ``OMP_WAIT_POLICY`` was ``PASSIVE`` before torch was imported; featx cannot tell
    afterwards, so a variable set after ``import torch`` reads as what it says.
    """
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == WAIT_POLICY


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    """What one run of featx's work uses.

    Attributes
    ----------
    torch : int or None
        torch intra-op threads of the forward pass; None leaves torch's count as it is.
    blas_after : int or None
        BLAS threads :class:`~featx.transformers.CNNFeatures` leaves the process at; None: untouched.

    featx's own heads and cross-validation run on one BLAS and OpenMP thread whatever the plan
    (:func:`head_limits`): that is also what keeps their reports identical from run to run.
    """

    torch: int | None
    blas_after: int | None


def torch_threads(*, default: int, cores: int | None = None, passive: bool | None = None,
                  load: float | None = None) -> int:
    """The torch threads of an ``"auto"`` forward pass.

    With passive OpenMP waits, torch's own default (capped by the cores this process may use):
    a thread that waits gives its core away, so an extra thread costs little under load and
    helps when the machine is idle. With spinning waits (``OMP_WAIT_POLICY`` was not passive when
    torch was loaded), one thread when the machine's load already fills its cores, since then
    every barrier would wait for a descheduled spinner.

    Examples
    --------
    >>> torch_threads(default=2, cores=2, passive=True, load=5.0)
    2
    >>> torch_threads(default=2, cores=2, passive=False, load=5.0), torch_threads(default=2, cores=2, passive=False, load=0.3)
    (1, 2)
    """
    cores = available_cores() if cores is None else cores
    passive = wait_policy_passive() if passive is None else passive
    n = max(1, min(default, cores))
    if passive:
        return n
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # no load average on this system
            load = 0.0
    return 1 if load >= cores else n


def plan(threads="auto", *, torch_default: int | None = None) -> ThreadPlan:
    """The plan for a ``threads`` setting.

    Parameters
    ----------
    threads : "auto", int or None
        See the module docstring.
    torch_default : int, optional
        torch's thread count before featx changes it (read from torch when needed).

    Returns
    -------
    ThreadPlan

    Examples
    --------
    >>> plan(3)
    ThreadPlan(torch=3, blas_after=None)
    >>> plan(None)
    ThreadPlan(torch=None, blas_after=None)
    >>> plan("auto", torch_default=1).blas_after
    1
    """
    threads = check_threads(threads)
    if threads is None:
        return ThreadPlan(torch=None, blas_after=None)
    if threads != "auto":
        return ThreadPlan(torch=threads, blas_after=None)
    if torch_default is None:
        import torch

        torch_default = torch.get_num_threads()
    return ThreadPlan(torch=torch_threads(default=torch_default), blas_after=1)


@contextlib.contextmanager
def extraction_scope(threads="auto") -> Iterator[ThreadPlan]:
    """Run featx's forward passes with the planned torch threads; the caller's count comes back after.

    Examples
    --------
    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with extraction_scope(1) as used:
    ...     torch.get_num_threads()
    1
    >>> torch.get_num_threads() == before
    True
    """
    import torch

    before = torch.get_num_threads()
    chosen = plan(threads, torch_default=before)
    if chosen.torch is None or chosen.torch == before:
        yield chosen
        return
    torch.set_num_threads(chosen.torch)
    try:
        yield chosen
    finally:
        torch.set_num_threads(before)


def head_limits(n: int = 1):
    """A context in which BLAS and OpenMP libraries use ``n`` threads (featx's heads and CV).

    The counts found are restored when it exits (threadpoolctl).
    """
    from threadpoolctl import threadpool_limits  # a scikit-learn dependency

    return threadpool_limits(n)


def leave_blas_at_one() -> bool:
    """Limit the process's BLAS libraries to one thread, and leave them so (until :func:`restore_blas`).

    What :class:`~featx.transformers.CNNFeatures` with ``threads="auto"`` does after a
    transform: the scikit-learn estimator that follows it in a Pipeline fits a few hundred or
    thousand rows, for which one BLAS thread is faster than several, and far faster on a
    busy machine. Once installed, later calls change nothing (a count the user sets in between
    stays theirs) until :func:`restore_blas` undoes it.

    Returns
    -------
    bool
        Whether a limit was installed for the first time by this call.
    """
    global _BLAS_LEFT
    from threadpoolctl import ThreadpoolController  # a scikit-learn dependency

    if _BLAS_LEFT is not None:
        return False
    _BLAS_LEFT = ThreadpoolController().limit(limits=1, user_api="blas")
    return True


def restore_blas() -> bool:
    """Give the BLAS libraries back the thread counts :func:`leave_blas_at_one` found.

    Returns
    -------
    bool
        Whether there was a limit to undo.

    Examples
    --------
    >>> restore_blas()
    False
    """
    global _BLAS_LEFT
    if _BLAS_LEFT is None:
        return False
    _BLAS_LEFT.restore_original_limits()
    _BLAS_LEFT = None
    return True
