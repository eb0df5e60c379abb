import pytest
import torch

from featx.devices import check_resolved, device_type, resolve, resolve_decoder, resolve_precision
from featx.exceptions import FeatxError
from featx.options import ExtractOptions


def test_resolve_makes_device_precision_and_decoder_concrete():
    """Check that resolve gives a torch.device and concrete precision and decoder, and is idempotent."""
    resolved = resolve(ExtractOptions(device="cpu"))
    assert resolved.device == torch.device("cpu") and resolved.decoder == "pil"
    assert resolved.precision in ("fp32", "bf16") and resolve(resolved) == resolved
    assert resolve(ExtractOptions(device="auto"), torch.device("cpu")).device == torch.device("cpu")


def test_check_resolved_names_what_is_missing():
    """Check that the loop's guard refuses options that still say 'auto', naming the fix."""
    with pytest.raises(FeatxError, match=r"iter_batches needs resolved options .* featx.devices.resolve\(options\)"):
        check_resolved(ExtractOptions(device="cpu"), "iter_batches")
    check_resolved(resolve(ExtractOptions(device="cpu")), "iter_batches")


def test_device_kind_resolution_without_torch_devices():
    """Check precision and decoder resolution for device types given as strings, and fp16 refused on the CPU."""
    assert device_type("cuda:1") == "cuda" and device_type("cpu") == "cpu"
    assert resolve_precision("auto", "cuda") == "fp16" and resolve_decoder("auto", "cuda") == "torch"
    with pytest.raises(FeatxError, match="precision='fp16' is not supported on the CPU"):
        resolve_precision("fp16", "cpu")
