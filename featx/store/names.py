"""What a store is called and what it holds: configurations as canonical JSON, file names, keys, entries.

Nothing here touches a file: these are the names, checks and constants the other modules of
:mod:`featx.store` share (see the package docstring for the on-disk layout).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import pathlib
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from featx.exceptions import StoreInputError
from featx.paths import default_cache_dir

__all__ = [
    "CLAIMS_SUFFIX",
    "DTYPES",
    "FORMAT_VERSION",
    "JOURNAL_SUFFIX",
    "KEY_LEN",
    "LOCK_SUFFIX",
    "STORE_NAME",
    "Entry",
    "canonical_json",
    "check_entry",
    "check_name",
    "claims_dir",
    "config_diff",
    "config_hash",
    "entry_label",
    "file_stem",
    "flatten_config",
    "isin_sorted",
    "journal_dir",
    "key_array",
    "lock_file",
    "store_path",
    "utcnow",
]

#: Version of the on-disk format; a store written with a higher one is refused.
FORMAT_VERSION = 1
#: How features may be stored on disk (reads always return float32).
DTYPES = ("float32", "float16")
#: Length of a content key: 32 lowercase hex characters, stored as ``S32``.
KEY_LEN = 32
#: The name of a main file: ``<backbone>-<hash12>.h5``.
STORE_NAME = re.compile(r"^(?P<backbone>.+)-(?P<hash>[0-9a-f]{12})\.h5$")
JOURNAL_SUFFIX = ".journal"
LOCK_SUFFIX = ".lock"
CLAIMS_SUFFIX = ".claims"

Entry = tuple[str, str]


# --------------------------------------------------------------------------------------------
# configurations


def _plain(obj: Any, where: str) -> Any:
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise StoreInputError(
                    f"{where}: configuration keys must be strings, got {key!r} "
                    f"({type(key).__name__}); convert it with str()"
                )
            out[key] = _plain(value, f"{where}.{key}")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, np.ndarray):
        return _plain(obj.tolist(), where)
    if isinstance(obj, np.generic):
        return _plain(obj.item(), where)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise StoreInputError(
                f"{where}: {obj!r} cannot be part of a configuration; use a finite number or a string"
            )
        return obj
    raise StoreInputError(
        f"{where}: cannot describe a configuration with a {type(obj).__name__} ({obj!r}); "
        "use strings, numbers, booleans, None, lists and dicts with string keys"
    )


def canonical_json(obj: Any) -> str:
    """Return the canonical JSON text of a configuration: same value, same text, on every run.

    Keys are sorted, separators are compact, text is ASCII; tuples become lists, numpy scalars
    and arrays become Python numbers and lists, paths become strings.

    Parameters
    ----------
    obj : mapping, list, str, int, float, bool or None
        The value to describe. Mapping keys must be strings; floats must be finite.

    Returns
    -------
    str
        The JSON text.

    Raises
    ------
    StoreInputError
        If the value holds something JSON cannot describe stably (a set, an object, NaN).

    Examples
    --------
    >>> from featx.store import canonical_json
    >>> canonical_json({"size": (224, 224), "backbone": "resnet18"})
    '{"backbone":"resnet18","size":[224,224]}'
    """
    return json.dumps(
        _plain(obj, "config"), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def config_hash(config: Mapping) -> str:
    """Return the 12 hex characters of ``sha256(canonical_json(config))``.

    Parameters
    ----------
    config : mapping
        The extraction configuration.

    Returns
    -------
    str
        Twelve lowercase hex characters; equal configurations give equal hashes.

    Raises
    ------
    StoreInputError
        If ``config`` is not a mapping or cannot be described canonically.

    Examples
    --------
    >>> from featx.store import config_hash
    >>> config_hash({"backbone": "resnet18", "size": 224}) == config_hash({"size": 224, "backbone": "resnet18"})
    True
    >>> len(config_hash({"backbone": "resnet18"}))
    12
    """
    if not isinstance(config, Mapping):
        raise StoreInputError(f"the configuration must be a mapping (dict), got {type(config).__name__}")
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()[:12]


def flatten_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to one level with dotted keys, so that two configurations compare field by field.

    Examples
    --------
    >>> flatten_config({"backbone": "resnet18", "preprocessing": {"size": 224, "crop": 224}})
    {'backbone': 'resnet18', 'preprocessing.size': 224, 'preprocessing.crop': 224}
    >>> flatten_config({})
    {'(config)': {}}
    """
    if isinstance(obj, dict) and obj:
        out = {}
        for key, value in obj.items():
            out.update(flatten_config(value, f"{prefix}.{key}" if prefix else key))
        return out
    return {prefix or "(config)": obj}


def config_diff(existing: Mapping, requested: Mapping) -> list[str]:
    """One line per field in which an existing configuration differs from a requested one.

    Examples
    --------
    >>> config_diff({"backbone": "resnet18", "size": 224}, {"backbone": "resnet18", "size": 256})
    ['size: existing 224 but 256 was requested']
    >>> config_diff({"size": 224}, {"size": 224.0, "crop": 200})
    ['crop: existing nothing but 200 was requested', 'size: existing 224 but 224.0 was requested']
    """
    old, new = flatten_config(dict(existing)), flatten_config(dict(requested))
    absent = object()
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, absent), new.get(key, absent)
        if a != b or type(a) is not type(b):
            a_text = "nothing" if a is absent else json.dumps(a)
            b_text = "nothing" if b is absent else json.dumps(b)
            lines.append(f"{key}: existing {a_text} but {b_text} was requested")
    return lines


def utcnow() -> str:
    """The current time as ISO-8601 UTC, to the second: how the store dates what it writes."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------------------------
# file names


def file_stem(backbone: str) -> str:
    """The backbone name as it appears in a store's file name.

    Examples
    --------
    >>> file_stem("timm:resnet18"), file_stem("::")
    ('timm-resnet18', 'backbone')
    """
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", backbone).strip("-.")
    return stem or "backbone"


def store_path(config: Mapping, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return the path of the store of a configuration: ``<cache_dir>/<backbone>-<hash12>.h5``.

    Parameters
    ----------
    config : mapping
        The extraction configuration; it must have a ``"backbone"`` string.
    cache_dir : str or path-like, default=None
        The folder of the stores; ``None`` means :func:`default_cache_dir`.

    Returns
    -------
    pathlib.Path
        The path; characters that do not belong in a file name (``:`` for instance) become ``-``.

    Raises
    ------
    StoreInputError
        If the configuration has no backbone name.

    Examples
    --------
    >>> from featx.store import config_hash, store_path
    >>> config = {"backbone": "timm:resnet18", "size": 224}
    >>> path = store_path(config, cache_dir="/data/cache")
    >>> path.name == f"timm-resnet18-{config_hash(config)}.h5"
    True
    """
    if not isinstance(config, Mapping):
        raise StoreInputError(f"the configuration must be a mapping (dict), got {type(config).__name__}")
    backbone = config.get("backbone")
    if not isinstance(backbone, str) or not backbone:
        raise StoreInputError(
            f"the configuration has no backbone name (config['backbone'] is {backbone!r}); "
            "expected a string such as 'resnet18' or 'timm:efficientnet_b0'"
        )
    folder = pathlib.Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return folder / f"{file_stem(backbone)}-{config_hash(config)}.h5"


def journal_dir(path: pathlib.Path) -> pathlib.Path:
    """The journal folder of the store whose main file is ``path``.

    Examples
    --------
    >>> journal_dir(pathlib.Path("cache/resnet18-0123456789ab.h5")).name
    'resnet18-0123456789ab.h5.journal'
    """
    return path.with_name(path.name + JOURNAL_SUFFIX)


def lock_file(path: pathlib.Path) -> pathlib.Path:
    """The writer-lock file of the store whose main file is ``path``.

    Examples
    --------
    >>> lock_file(pathlib.Path("cache/resnet18-0123456789ab.h5")).name
    'resnet18-0123456789ab.h5.lock'
    """
    return path.with_name(path.name + LOCK_SUFFIX)


def claims_dir(path: pathlib.Path) -> pathlib.Path:
    """The folder where concurrent extractions into the store ``path`` claim their work.

    Examples
    --------
    >>> claims_dir(pathlib.Path("cache/resnet18-0123456789ab.h5")).name
    'resnet18-0123456789ab.h5.claims'
    """
    return path.with_name(path.name + CLAIMS_SUFFIX)


# --------------------------------------------------------------------------------------------
# entries and keys


def check_name(name: Any, what: str) -> str:
    """Return ``name`` if it can name a layer or a pooling in a store, else raise StoreInputError.

    Examples
    --------
    >>> check_name("blocks.4", "layer")
    'blocks.4'
    >>> check_name("a/b", "layer")
    Traceback (most recent call last):
    ...
    featx.exceptions.StoreInputError: invalid layer name 'a/b': expected a non-empty string without '/', spaces or a leading '.' (dots inside are fine, e.g. 'blocks.4')
    """
    if (
        not isinstance(name, str)
        or not name
        or "/" in name
        or name.startswith(".")
        or any(c.isspace() or not c.isprintable() for c in name)
    ):
        raise StoreInputError(
            f"invalid {what} name {name!r}: expected a non-empty string without '/', spaces or a "
            "leading '.' (dots inside are fine, e.g. 'blocks.4')"
        )
    return name


def check_entry(entry: Any) -> Entry:
    """Return a valid ``(layer, pooling)`` entry as a tuple, else raise StoreInputError.

    Examples
    --------
    >>> check_entry(["stage4", "avg"])
    ('stage4', 'avg')
    """
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
        raise StoreInputError(f"an entry is a (layer, pooling) pair such as ('stage4', 'avg'), got {entry!r}")
    return check_name(entry[0], "layer"), check_name(entry[1], "pooling")


def entry_label(entry: Entry) -> str:
    """How messages name an entry.

    Examples
    --------
    >>> entry_label(("stage4", "avg"))
    'stage4/avg'
    """
    return f"{entry[0]}/{entry[1]}"


def key_array(keys: Any) -> np.ndarray:
    """Return the content keys as a validated ``S32`` array (order and duplicates kept).

    Examples
    --------
    >>> key_array(["a" * 32, "0" * 32]).dtype
    dtype('S32')
    >>> key_array(["not-a-key"])
    Traceback (most recent call last):
    ...
    featx.exceptions.StoreInputError: 1 of 1 keys are not content keys: expected 32 lowercase hex characters, got e.g. 'not-a-key'; pass the content keys featx computed for the images
    """
    if isinstance(keys, (str, bytes)):
        raise StoreInputError(f"keys must be a sequence of content keys, not one string ({keys!r}); wrap it in a list")
    if not isinstance(keys, np.ndarray):
        try:
            keys = list(keys)
        except TypeError as exc:
            raise StoreInputError(f"keys must be a sequence of content keys, got {type(keys).__name__}") from exc
    arr = np.asarray(keys)
    if arr.size == 0:
        return np.empty(0, dtype=f"S{KEY_LEN}")
    if arr.ndim != 1:
        raise StoreInputError(f"keys must be one-dimensional, got an array of shape {arr.shape}")
    if arr.dtype.kind == "O" or arr.dtype.kind == "T":
        arr = np.array([k.decode("ascii", "replace") if isinstance(k, bytes) else k for k in arr.tolist()])
    if arr.dtype.kind not in "US":
        raise StoreInputError(f"keys must be strings of {KEY_LEN} hex characters, got an array of {arr.dtype}")
    lengths = np.char.str_len(arr)
    try:
        raw = arr.astype(f"S{KEY_LEN}")
    except UnicodeEncodeError:
        raw = None
    if raw is not None:
        codes = raw.view(np.uint8).reshape(-1, KEY_LEN)
        hexchar = ((codes >= 48) & (codes <= 57)) | ((codes >= 97) & (codes <= 102))
        bad = ~hexchar.all(axis=1) | (lengths != KEY_LEN)
    else:
        bad = np.array([len(k) != KEY_LEN or re.fullmatch("[0-9a-f]+", str(k)) is None for k in arr.tolist()])
    if bad.any():
        first = arr[np.flatnonzero(bad)[0]]
        first = first.decode("ascii", "replace") if isinstance(first, bytes) else str(first)
        raise StoreInputError(
            f"{int(bad.sum())} of {arr.size} keys are not content keys: expected {KEY_LEN} lowercase hex "
            f"characters, got e.g. {first!r}; pass the content keys featx computed for the images"
        )
    return raw


def isin_sorted(sorted_keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (found, position) of each query key in a sorted unique key array.

    Examples
    --------
    >>> isin_sorted(np.array([b"a", b"c"]), np.array([b"c", b"b"]))
    (array([ True, False]), array([1, 1]))
    """
    if sorted_keys.size == 0 or query.size == 0:
        return np.zeros(query.shape, bool), np.zeros(query.shape, np.intp)
    pos = np.searchsorted(sorted_keys, query)
    clipped = np.minimum(pos, sorted_keys.size - 1)
    return (pos < sorted_keys.size) & (sorted_keys[clipped] == query), clipped
