"""SIGINT and SIGTERM stop a long ``featx`` command at a safe point, and it says how to resume."""

from __future__ import annotations

import contextlib
import signal
import sys

__all__ = ["interrupted", "interruptible"]


@contextlib.contextmanager
def interruptible():
    """SIGINT and SIGTERM stop a run the same way; yields the ``stop`` check for featx.extract.

    The handler raises KeyboardInterrupt at once, and also records the signal: if the exception
    lands where Python ignores it (a finaliser), the run still stops at the next batch.
    """
    received = []

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = {signum: signal.signal(signum, handler) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: bool(received)
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


def interrupted(kept: str) -> int:
    """Say on stderr what an interrupted run kept (``kept``) and how to resume; returns exit code 130."""
    print(f"featx: interrupted: {kept}; run the same command again to resume.", file=sys.stderr)
    return 130
