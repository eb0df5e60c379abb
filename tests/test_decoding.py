import numpy as np
import torch
from torch.utils.data import DataLoader

from featx.backbones import load_backbone
from featx.decoding import ImageDataset, ThreadedLoader, make_loader
from featx.images import open_source

from conftest import TINY


def _batches(loader):
    return [(b.indices.tolist(), b.pixels, b.errors) for b in loader]


def test_make_loader_decodes_in_threads_on_cpu_and_in_processes_when_asked(image_folder):
    """Check that 'auto' on a CPU decodes in this process's threads, a worker count in a DataLoader, same pixels."""
    source = open_source(str(image_folder))
    preprocess = load_backbone(TINY, lazy=True).preprocess
    common = dict(decoder="pil", max_pixels=10**8, batch_size=5, device=torch.device("cpu"))
    threaded = make_loader(source, range(len(source)), preprocess, num_workers="auto", **common)
    assert isinstance(threaded, ThreadedLoader) and threaded.threads == torch.get_num_threads()
    assert len(threaded) == 3
    plain = make_loader(source, range(len(source)), preprocess, num_workers=0, **common)
    assert isinstance(plain, DataLoader)
    got, expected = _batches(threaded), _batches(plain)
    assert [g[0] for g in got] == [e[0] for e in expected] == [list(range(0, 5)), list(range(5, 10)), [10, 11]]
    for (_, pixels, errors), (_, reference, _) in zip(got, expected):
        assert errors == [] and pixels.dtype == torch.uint8 and pixels.shape[1:] == reference.shape[1:]
        assert torch.equal(pixels, reference)


def test_threaded_loader_reports_bad_images_and_decode_time(tmp_path, image_folder):
    """Check that a bad file comes back as its message, in order, and every batch says how long decoding took."""
    bad = image_folder / "class0" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    source = open_source(str(image_folder))
    position = [str(p) for p in source].index(str(bad))
    preprocess = load_backbone(TINY, lazy=True).preprocess
    batches = list(ThreadedLoader(ImageDataset(source, range(len(source)), preprocess), batch_size=4, threads=2))
    errors = [e for b in batches for e in b.errors]
    assert [i for i, _ in errors] == [position] and "broken.jpg" in errors[0][1]
    kept = np.concatenate([b.indices.numpy() for b in batches])
    assert sorted(kept.tolist() + [position]) == list(range(len(source)))
    assert all(b.decode_seconds > 0 and not b.in_workers for b in batches)


def test_make_loader_keeps_in_memory_images_on_one_thread(images):
    """Check that arrays and PIL images are decoded by one thread (an object listed twice is never shared)."""
    arrays, _ = images
    preprocess = load_backbone(TINY, lazy=True).preprocess
    loader = make_loader(list(arrays), range(len(arrays)), preprocess, decoder="pil", max_pixels=10**8, batch_size=5,
                         num_workers="auto", device=torch.device("cpu"))
    assert isinstance(loader, ThreadedLoader) and loader.threads == 1
    assert sum(len(b.indices) for b in loader) == len(arrays)
