"""The cache publishes entries atomically and refuses partial or corrupt ones."""

from __future__ import annotations

import pytest

from jaxpost.runtime import cache
def _build(entry):
    with cache.building_entry(entry) as tmp:
        (tmp / "a.bin").write_bytes(b"x" * 1000)
        (tmp / "b.txt").write_text("hello")


def test_complete_entry_verifies(tmp_path):
    entry = tmp_path / "m"
    _build(entry)
    assert cache.verify_entry(entry) is None
    assert sorted(p.name for p in entry.iterdir()) == ["a.bin", "b.txt", cache.MANIFEST]


def test_truncated_file_is_detected(tmp_path):
    entry = tmp_path / "m"
    _build(entry)
    (entry / "a.bin").write_bytes(b"x" * 999)
    assert "999 bytes" in cache.verify_entry(entry)


def test_same_size_corruption_is_detected(tmp_path):
    entry = tmp_path / "m"
    _build(entry)
    (entry / "a.bin").write_bytes(b"y" * 1000)
    assert "corrupt" in cache.verify_entry(entry)


def test_missing_manifest_means_unfinished(tmp_path):
    entry = tmp_path / "m"
    entry.mkdir()
    (entry / "a.bin").write_bytes(b"x")
    assert "did not finish" in cache.verify_entry(entry)


def test_failed_build_leaves_previous_entry_untouched(tmp_path):
    entry = tmp_path / "m"
    _build(entry)
    with pytest.raises(RuntimeError):
        with cache.building_entry(entry) as tmp:
            (tmp / "a.bin").write_bytes(b"partial")
            raise RuntimeError("killed halfway")
    assert cache.verify_entry(entry) is None
    assert (entry / "a.bin").read_bytes() == b"x" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temporary directory left


def test_cache_root_follows_env(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXPOST_CACHE", str(tmp_path / "c"))
    assert cache.cache_root() == tmp_path / "c"
