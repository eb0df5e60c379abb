"""Small foundations every layer uses: name lists and files replaced atomically.

This module imports neither torch nor scikit-learn.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write", "default_cache_dir", "fsync_dir", "split_names", "temporary_name",
           "using_cache_dir"]

_CACHE_DIR: contextvars.ContextVar[Path | None] = contextvars.ContextVar("featx_cache_dir", default=None)


def split_names(value, *, sep: str = ",") -> list[str]:
    """A ``sep``-separated string or a sequence of names, as a list (spaces around names dropped).

    Examples
    --------
    >>> split_names("stage4+pre_logits, stage5,")
    ['stage4+pre_logits', 'stage5']
    >>> split_names(("avg", "spp"))
    ['avg', 'spp']
    """
    if isinstance(value, str):
        return [v.strip() for v in value.split(sep) if v.strip()]
    return [str(v) for v in value]


def temporary_name(path: str | os.PathLike) -> Path:
    """Where a new version of ``path`` is written before it replaces it: ``<name>.tmp-<pid>`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename inside ``folder`` durable; an error (a full or failing disk) is raised, not hidden."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, durable: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    Readers see the old file or the new one, never half of one. On any error the temporary file
    is removed and the error goes on. ``durable=True`` also fsyncs the file and its folder, so
    the new version survives a power cut once the block has ended.

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "table.json"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("{}")
    >>> target.read_text(), sorted(p.name for p in target.parent.iterdir())
    ('{}', ['table.json'])
    """
    path = Path(path)
    tmp = temporary_name(path)
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    if durable:
        fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through :func:`atomic_path` (str as UTF-8).

    Examples
    --------
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "a.txt"
    >>> atomic_write(target, "hello"); target.read_text()
    'hello'
    """
    with atomic_path(path, durable=durable) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


@contextlib.contextmanager
def using_cache_dir(folder: str | os.PathLike) -> Iterator[Path]:
    """Within this block, :func:`default_cache_dir` is ``folder`` (``$FEATX_CACHE`` does not count).

    The ``featx`` command runs a command given ``--cache DIR`` inside it, so that what featx keeps
    beside the stores (the layer tables of ``featx.backbones.layers``) goes under DIR too, not to
    ``./cache``. The previous folder is restored on leaving; threads and asyncio tasks started
    outside keep theirs (a context variable).

    Examples
    --------
    >>> with using_cache_dir("/tmp/featx-run"):
    ...     default_cache_dir()
    PosixPath('/tmp/featx-run')
    """
    token = _CACHE_DIR.set(Path(folder).expanduser())
    try:
        yield _CACHE_DIR.get()
    finally:
        _CACHE_DIR.reset(token)


def default_cache_dir() -> Path:
    """Return the folder where stores go: ``$FEATX_CACHE`` if set, else ``cache`` in the CWD.

    Inside :func:`using_cache_dir` it is that block's folder. The environment variable is read
    at every call, so it can be changed while running.

    Returns
    -------
    Path
        The cache folder (it may not exist yet).

    Examples
    --------
    >>> import os
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"FEATX_CACHE": "/tmp/featx-cache"}):
    ...     default_cache_dir()
    PosixPath('/tmp/featx-cache')
    >>> with mock.patch.dict(os.environ):
    ...     _ = os.environ.pop("FEATX_CACHE", None)
    ...     default_cache_dir()
    PosixPath('cache')
    """
    scoped = _CACHE_DIR.get()
    if scoped is not None:
        return scoped
    env = os.environ.get("FEATX_CACHE")
    return Path(env).expanduser() if env else Path("cache")
