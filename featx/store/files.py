"""How the store replaces and removes its files, and what a failed write becomes.

A main file is only ever replaced whole, through :func:`featx.paths.atomic_path` with
``durable=True`` (temporary file beside it, fsync, ``os.replace``, fsync of the folder, the
temporary file removed on any error). A write that fails raises a
:class:`~featx.exceptions.StoreError` that says the store is unchanged and, for a full disk,
how to make room. An interrupted replacement leaves ``<main file>.tmp-<pid>`` behind
(:func:`temporary_files`): readers ignore it, the next writer removes it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import pathlib
from collections.abc import Iterator

from featx.exceptions import FeatxError, StoreError
from featx.paths import atomic_path

__all__ = ["is_no_space", "replace_durably", "temporary_files", "unlink_quietly", "write_failed"]


def unlink_quietly(path: pathlib.Path) -> None:
    """Remove a file if it is there.

    Examples
    --------
    >>> import tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "gone"
    >>> unlink_quietly(path); path.exists()
    False
    """
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def temporary_files(path: pathlib.Path) -> list[pathlib.Path]:
    """The temporary files ``<main file>.tmp-*`` that interrupted writes of a main file left beside it.

    Examples
    --------
    >>> import tempfile
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "a-0123456789ab.h5.tmp-42").write_bytes(b"")
    >>> [p.name for p in temporary_files(folder / "a-0123456789ab.h5")]
    ['a-0123456789ab.h5.tmp-42']
    """
    return sorted(path.parent.glob(glob.escape(path.name) + ".tmp-*"))


def is_no_space(exc: BaseException) -> bool:
    """Whether an error (from the OS or from HDF5) means that the disk is full.

    Examples
    --------
    >>> import errno
    >>> is_no_space(OSError(errno.ENOSPC, "No space left on device")), is_no_space(OSError("denied"))
    (True, False)
    """
    text = str(exc)
    no_space = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT)
    return no_space or "No space left" in text or "errno = 28" in text


def write_failed(exc: BaseException, what: str, path: pathlib.Path) -> StoreError:
    """The StoreError for a failed write of ``what`` to the store ``path``: nothing was committed.

    Examples
    --------
    >>> import errno
    >>> error = write_failed(OSError(errno.ENOSPC, "No space left"), "a batch", pathlib.Path("c/s.h5"))
    >>> str(error).split(" (")[0]
    'no space left on device while writing a batch to c'
    """
    if is_no_space(exc):
        return StoreError(
            f"no space left on device while writing {what} to {path.parent} ({exc}). Nothing was "
            f"committed and the store {path.name} is unchanged (the partial file was removed); free "
            "some disk space or point FEATX_CACHE / cache_dir at a larger disk, then run again "
            "(completed batches are kept)"
        )
    return StoreError(
        f"could not write {what} to {path.parent} ({exc}). Nothing was committed and the store "
        f"{path.name} is unchanged; check that the folder exists and is writable"
    )


@contextlib.contextmanager
def replace_durably(path: pathlib.Path, what: str) -> Iterator[pathlib.Path]:
    """Yield a temporary path that replaces the main file ``path`` durably when the block ends.

    The caller opens the file itself inside the block (h5py writes the temporary path).
    An ``OSError`` in the block, or while committing, becomes :func:`write_failed`'s StoreError
    (a StoreError raised in the block goes on unchanged); the temporary file is removed.

    Examples
    --------
    >>> import tempfile
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "s.h5"
    >>> with replace_durably(path, "a new store") as tmp:
    ...     _ = tmp.write_bytes(b"new")
    >>> path.read_bytes(), [p.name for p in path.parent.iterdir()]
    (b'new', ['s.h5'])
    """
    try:
        with atomic_path(path, durable=True) as tmp:
            yield tmp
    except OSError as exc:
        if isinstance(exc, FeatxError):
            raise
        raise write_failed(exc, what, path) from exc
