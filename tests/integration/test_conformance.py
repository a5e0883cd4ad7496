"""The storage layer behaves the same on local disk, file://, memory:// and s3:// (moto)."""

from __future__ import annotations

import pytest

from reckpt.errors import CheckpointNotFoundError
from reckpt.storage.core import Storage, storage_for


def test_write_read_exists(root: str) -> None:
    st = storage_for(root)
    path = Storage.join(root, "a", "b.bin")
    assert not st.exists(path)
    st.makedirs(Storage.join(root, "a"))
    st.write_bytes(path, b"payload")
    assert st.exists(path) and st.isfile(path) and not st.isdir(path)
    assert st.read_bytes(path) == b"payload"
    assert st.size(path) == 7


def test_ls_returns_sorted_basenames(root: str) -> None:
    st = storage_for(root)
    st.makedirs(Storage.join(root, "d"))
    for name in ("z", "a", "m"):
        st.write_bytes(Storage.join(root, "d", name), name.encode())
    assert st.ls(Storage.join(root, "d")) == ["a", "m", "z"]
    assert st.ls(Storage.join(root, "missing")) == []


def test_walk_files_relative(root: str) -> None:
    st = storage_for(root)
    st.write_bytes(Storage.join(root, "x", "one"), b"1")
    st.write_bytes(Storage.join(root, "x", "sub", "two"), b"2")
    assert st.walk_files(Storage.join(root, "x")) == ["one", "sub/two"]


def test_atomic_replace_and_rename(root: str) -> None:
    st = storage_for(root)
    path = Storage.join(root, "doc.json")
    st.write_bytes_atomic(path, b"old")
    st.write_bytes_atomic(path, b"new")
    assert st.read_bytes(path) == b"new"
    assert [n for n in st.ls(root) if n.startswith("doc.json.tmp")] == []
    st.write_bytes(Storage.join(root, "dir1", "f"), b"f")
    st.rename(Storage.join(root, "dir1"), Storage.join(root, "dir2"))
    assert st.read_bytes(Storage.join(root, "dir2", "f")) == b"f"
    assert not st.exists(Storage.join(root, "dir1", "f"))


def test_rm_recursive_and_missing(root: str) -> None:
    st = storage_for(root)
    st.write_bytes(Storage.join(root, "t", "a"), b"a")
    st.write_bytes(Storage.join(root, "t", "b", "c"), b"c")
    st.rm(Storage.join(root, "t"), recursive=True)
    assert not st.exists(Storage.join(root, "t", "a"))
    st.rm(Storage.join(root, "never"))  # a missing path is not an error


def test_read_missing_names_path(root: str) -> None:
    st = storage_for(root)
    with pytest.raises(CheckpointNotFoundError, match="nope"):
        st.read_bytes(Storage.join(root, "nope"))


def test_atomic_rename_only_on_posix(root: str) -> None:
    st = storage_for(root)
    assert st.atomic_rename == (not root.startswith(("memory://", "s3://")))


def test_explicit_storage_options_reach_s3(s3_server: dict[str, str]) -> None:
    """Endpoint and credentials passed explicitly instead of through the environment."""
    opts = {"endpoint_url": s3_server["endpoint"], "key": "testing", "secret": "testing"}
    path = f"s3://{s3_server['bucket']}/explicit/x"
    st = storage_for(path, opts)
    st.write_bytes(path, b"ok")
    assert storage_for(path, opts).read_bytes(path) == b"ok"
