import os

import pytest

from featx.paths import atomic_path, atomic_write, default_cache_dir, split_names, temporary_name


def test_split_names_strips_spaces_and_drops_empties():
    """Check that a comma list reads the same with or without spaces, and a sequence stays as given."""
    assert split_names("avg, spp,,max ") == ["avg", "spp", "max"] == split_names("avg,spp,max")
    assert split_names("a+b", sep="+") == ["a", "b"] and split_names(["stage1", "stage2"]) == ["stage1", "stage2"]


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    """Check that an atomic write replaces the old content and leaves no temporary file."""
    target = tmp_path / "report.json"
    target.write_text("old")
    atomic_write(target, b"new", durable=True)
    assert target.read_text() == "new" and os.listdir(tmp_path) == ["report.json"]


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    """Check that an error inside the block keeps the old file whole, removes the temporary and goes on."""
    target = tmp_path / "table.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="half-written"):
        with atomic_path(target) as tmp:
            tmp.write_text("partial")
            raise RuntimeError("half-written")
    assert target.read_text() == "old" and not temporary_name(target).exists()


def test_default_cache_dir_reads_the_environment_at_each_call(monkeypatch, tmp_path):
    """Check that $FEATX_CACHE is read at every call, and ./cache is the fallback."""
    monkeypatch.setenv("FEATX_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("FEATX_CACHE")
    assert str(default_cache_dir()) == "cache"
