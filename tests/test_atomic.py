"""Files written whole or not at all, with the user's usual permissions."""

from __future__ import annotations

import os

import pytest

from jaxpost.runtime.atomic import atomic_file, write_atomic


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_file_replaces_the_target_when_the_body_finishes(tmp_path, umask_022):
    target = tmp_path / "sub" / "out.txt"
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("new")
        assert not target.exists()  # nothing visible until the body is done
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o644  # not the temporary file's 0600
    assert os.listdir(target.parent) == ["out.txt"]


def test_atomic_file_leaves_the_target_as_it_was_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="stopped"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["out.txt"]
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "absent.txt") as tmp:
            tmp.write_text("half")
            raise RuntimeError("stopped")
    assert os.listdir(tmp_path) == ["out.txt"]


def test_write_atomic_writes_text_and_bytes(tmp_path, umask_022):
    text = write_atomic(tmp_path / "a" / "t.txt", "é\r\nline\n")
    assert text == tmp_path / "a" / "t.txt"
    assert text.read_bytes() == "é\r\nline\n".encode("utf-8")  # UTF-8, newlines as given
    data = bytes(range(256))
    binary = write_atomic(tmp_path / "b.bin", data)
    assert binary.read_bytes() == data
    assert binary.stat().st_mode & 0o777 == 0o644
    write_atomic(binary, b"shorter")
    assert binary.read_bytes() == b"shorter"
    assert sorted(os.listdir(tmp_path)) == ["a", "b.bin"]
