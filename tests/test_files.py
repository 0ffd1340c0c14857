"""Durable atomic writes (cnn_mellin.files)."""

from __future__ import annotations

import os

import pytest

from cnn_mellin.files import atomic_path, write_bytes_atomic, write_text_atomic


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_text_atomic_replaces_the_file_and_leaves_nothing_beside_it(tmp_path):
    target = tmp_path / "a.ini"
    target.write_text("old\n")
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.ini"]
    # a plain open() would give the file the same permissions
    assert target.stat().st_mode & 0o777 == 0o666 & ~_umask()
    write_bytes_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"


def test_write_text_atomic_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_text_atomic("here.txt", "x")
    assert (tmp_path / "here.txt").read_text() == "x"
    assert [p.name for p in tmp_path.iterdir()] == ["here.txt"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary_one(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old\n")
    with pytest.raises(TypeError):
        write_text_atomic(target, b"bytes are not text")  # fails inside the write
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_rename_removes_the_temporary_file(tmp_path):
    target = tmp_path / "folder"
    target.mkdir()
    (target / "inside").write_text("keep")
    with pytest.raises(OSError):
        write_text_atomic(target, "a file cannot replace a non-empty folder")
    assert (target / "inside").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_atomic_path_renames_on_success_and_removes_on_error(tmp_path):
    target = tmp_path / "model.pt"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".tmp") and tmp.exists()
        assert target.read_bytes() == b"old"  # untouched until the block ends
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("writer failed")
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]

    fresh = tmp_path / "fresh.txt"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(fresh) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert not fresh.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
