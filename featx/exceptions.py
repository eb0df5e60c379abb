"""The one error hierarchy of featx.

Every error featx raises on purpose is a :class:`FeatxError`. Subclasses also inherit the
builtin exception they mean, so ``except ValueError`` keeps working for callers who do not know
featx. The CLI catches :class:`FeatxError` only: anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = [
    "CacheMismatchError",
    "EvaluationError",
    "FeatxError",
    "FeatxWarning",
    "FinetuneError",
    "ImageDecodeError",
    "MissingKeysError",
    "ModelFileError",
    "NotFittedError",
    "RayUnavailableError",
    "StoreError",
    "StoreInputError",
    "UnknownHeadError",
    "UnknownLayerError",
    "UnknownModelError",
    "UnknownPoolingError",
    "WeightsUnavailableError",
    "suggest",
]


class FeatxError(Exception):
    """Base class of every error featx raises on purpose."""


class FeatxWarning(UserWarning):
    """Something featx could not do that costs no result: a report computed but not kept, for one.

    The ``featx`` command prints each as one line, ``featx: warning: ...``, on stderr.
    """


class UnknownModelError(FeatxError, ValueError):
    """A backbone name that is not in the registry."""


class UnknownHeadError(FeatxError, ValueError):
    """A head name that is not one of featx.heads.HEADS."""


class EvaluationError(FeatxError, ValueError):
    """Features, labels or settings that a head cannot be fitted or evaluated with."""


class UnknownLayerError(FeatxError, ValueError):
    """A layer alias or node name that the backbone does not have."""


class UnknownPoolingError(FeatxError, ValueError):
    """A pooling method that featx does not implement."""


class WeightsUnavailableError(FeatxError, RuntimeError):
    """Pretrained weights that cannot be loaded (offline, missing package, bad file)."""


class ImageDecodeError(FeatxError, ValueError):
    """An image that cannot be decoded; the message names the file and the reason."""


class StoreError(FeatxError, OSError):
    """A feature store that cannot be read or written."""


class StoreInputError(FeatxError, ValueError):
    """Arguments a feature store cannot accept: bad key, entry name, dtype, shape or values."""


class CacheMismatchError(FeatxError, ValueError):
    """A feature store written with another extraction configuration than the one requested."""


class ModelFileError(FeatxError, ValueError):
    """A model file that cannot be used: not a featx model, another version, or a backbone it cannot build."""


class FinetuneError(FeatxError, ValueError):
    """A fine-tuning request featx cannot carry out: a layer it cannot split after, bad options."""


class RayUnavailableError(FeatxError, ImportError):
    """Ray is not installed; the message names the extra that brings it."""


class MissingKeysError(FeatxError, KeyError):
    """Rows asked of a feature store that it does not hold."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0]) if self.args else ""


def __getattr__(name: str):
    # scikit-learn's NotFittedError, re-exported lazily: importing sklearn costs a second, and
    # torch-free modules such as featx.store import this one.
    if name == "NotFittedError":
        from sklearn.exceptions import NotFittedError

        return NotFittedError
    raise AttributeError(f"module 'featx.exceptions' has no attribute {name!r}")


def suggest(name: str, choices: Iterable[str]) -> str:
    """Return ``" Did you mean 'x'?"`` for the closest choice, or an empty string."""
    close = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""
