"""Where a backbone's weights come from: a seeded random init, a state-dict file or a download.

The helpers every model family shares: how a weights argument is named in feature stores
(:func:`local_weights_name`, :func:`file_weights_name`), how a state-dict file is read and
fitted to a network (:func:`load_weights_file`), and how a missing network is told apart from a
missing file (:func:`reachable`, :func:`offline_error`). torch is imported where it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from featx.exceptions import WeightsUnavailableError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "RANDOM_INIT",
    "file_weights_name",
    "is_weights_file",
    "load_into",
    "load_state_dict_file",
    "load_weights_file",
    "local_weights_name",
    "offline_error",
    "reachable",
    "seeded",
]

#: The weights name recorded for a seeded random init (``weights=None``).
RANDOM_INIT = "random-init:seed0"
_SEED = 0


@contextlib.contextmanager
def seeded():
    """Seed the CPU generator for a random init, restoring the caller's state afterwards.

    Examples
    --------
    >>> import torch
    >>> with seeded():
    ...     a = torch.rand(2)
    >>> with seeded():
    ...     b = torch.rand(2)
    >>> torch.equal(a, b)
    True
    """
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_SEED)
        yield


def is_weights_file(weights: object) -> bool:
    """Whether a ``weights`` argument names a state-dict file rather than a weights name.

    A path object, or a string with a path separator or a ``.pth``/``.pt``/``.bin`` suffix.

    Examples
    --------
    >>> is_weights_file("resnet18.pth"), is_weights_file("IMAGENET1K_V2"), is_weights_file(None)
    (True, False, False)
    """
    return isinstance(weights, os.PathLike) or (
        isinstance(weights, str) and (os.sep in weights or weights.endswith((".pth", ".pt", ".bin")))
    )


def _offline_forced() -> bool:
    return os.environ.get("FEATX_OFFLINE", "").lower() in {"1", "true", "yes"}


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether the host of ``url`` accepts a TCP connection within ``timeout`` seconds.

    Always ``False`` when the environment variable ``FEATX_OFFLINE`` is ``1``, ``true`` or ``yes``.

    Examples
    --------
    >>> from unittest import mock
    >>> with mock.patch.dict(os.environ, {"FEATX_OFFLINE": "1"}):
    ...     reachable("https://download.pytorch.org/models/resnet18-f37072fd.pth")
    False
    """
    if _offline_forced():
        return False
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def offline_error(what: str, name: str, url: str) -> WeightsUnavailableError:
    """The error for weights ``what`` of backbone ``name`` that only ``url`` has, with no network.

    Examples
    --------
    >>> str(offline_error("ResNet18_Weights.IMAGENET1K_V1", "resnet18", "https://x"))[:60]
    "The weights ResNet18_Weights.IMAGENET1K_V1 of 'resnet18' mus"
    """
    return WeightsUnavailableError(
        f"The weights {what} of {name!r} must be downloaded from {url}, but there is no network. "
        f"Either pass weights=PATH (a state-dict file saved on this machine), or use a backbone whose "
        f"weights work offline: efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2 "
        f"(see 'featx models')."
    )


def _missing_file(path: Path, backbone: str) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"Weights file {str(path)!r} for {backbone!r} does not exist: pass the path of a state-dict "
        f"file saved with torch.save(model.state_dict(), PATH), \"DEFAULT\", or None."
    )


def file_weights_name(path: Path, backbone: str) -> str:
    """Name a weights file by its content, so a changed file never reuses old features.

    Raises
    ------
    WeightsUnavailableError
        If ``path`` is not a file.

    Examples
    --------
    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "net.pth"
    >>> _ = path.write_bytes(b"weights")
    >>> file_weights_name(path, "resnet18")
    'file:net.pth:sha256=9a129038d9a00aed'
    """
    if not path.is_file():
        raise _missing_file(path, backbone)
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"file:{path.name}:sha256={digest.hexdigest()[:16]}"


def local_weights_name(weights: object, backbone: str) -> str | None:
    """The recorded name of weights that need no zoo: a random init or a state-dict file.

    Returns
    -------
    str or None
        :data:`RANDOM_INIT` for ``None``, :func:`file_weights_name` for a file
        (:func:`is_weights_file`), and ``None`` for a weights name, which the family resolves.

    Examples
    --------
    >>> local_weights_name(None, "resnet18"), local_weights_name("DEFAULT", "resnet18")
    ('random-init:seed0', None)
    """
    if weights is None:
        return RANDOM_INIT
    if is_weights_file(weights):
        return file_weights_name(Path(weights), backbone)
    return None


def load_state_dict_file(path: Path, backbone: str) -> dict:
    """Read a state dict saved with ``torch.save`` (``weights_only=True``; a nested one is unwrapped).

    Raises
    ------
    WeightsUnavailableError
        If the file is missing, unreadable, or holds no state dict.

    Examples
    --------
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "net.pth"
    >>> torch.save({"model": {"fc.bias": torch.zeros(2)}}, path)
    >>> load_state_dict_file(path, "resnet18")
    {'fc.bias': tensor([0., 0.])}
    """
    import torch

    if not path.is_file():
        raise _missing_file(path, backbone)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors all mean the same thing to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsUnavailableError(
            f"Cannot read weights file {str(path)!r} for {backbone!r} ({reason}). Expected a state dict "
            f"saved with torch.save(model.state_dict(), PATH); featx loads it with weights_only=True."
        ) from exc
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise WeightsUnavailableError(
            f"Weights file {str(path)!r} holds a {type(state).__name__}, not a state dict; save it with "
            f"torch.save(model.state_dict(), PATH)."
        )
    return dict(state)


def load_into(module: nn.Module, state: Mapping, source: str, backbone: str) -> None:
    """Load ``state`` into ``module``, refusing any missing or unexpected key.

    Raises
    ------
    WeightsUnavailableError
        Naming ``source`` (the file or weights name) and the first keys that do not fit.

    Examples
    --------
    >>> from torch import nn
    >>> load_into(nn.Linear(2, 2), {"weight": nn.Linear(2, 2).weight}, "'a.pth'", "net")
    Traceback (most recent call last):
    ...
    featx.exceptions.WeightsUnavailableError: Weights 'a.pth' do not fit 'net': 1 missing keys (e.g. ['bias']) and 0 unexpected keys (e.g. []). Use a state dict saved from the same architecture.
    """
    result = module.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"Weights {source} do not fit {backbone!r}: {len(result.missing_keys)} missing keys "
            f"(e.g. {result.missing_keys[:3]}) and {len(result.unexpected_keys)} unexpected keys "
            f"(e.g. {result.unexpected_keys[:3]}). Use a state dict saved from the same architecture."
        )


def load_weights_file(module: nn.Module, path: Path, backbone: str, *, source: str | None = None) -> None:
    """Read the state-dict file ``path`` into ``module`` (:func:`load_state_dict_file`, :func:`load_into`).

    ``source`` names the weights in errors; by default, the file's path.

    Examples
    --------
    >>> import tempfile, torch
    >>> from torch import nn
    >>> path = Path(tempfile.mkdtemp()) / "linear.pth"
    >>> torch.save(nn.Linear(2, 2).state_dict(), path)
    >>> net = nn.Linear(2, 2)
    >>> load_weights_file(net, path, "linear")
    >>> torch.equal(net.weight, torch.load(path)["weight"])
    True
    """
    load_into(module, load_state_dict_file(path, backbone), source or repr(str(path)), backbone)
