"""TreeStore: checked bytes only, never pickle; private directory; eviction; corruption; full disk; binding."""

from __future__ import annotations

import errno
import os
import pickle
import stat

import diskcache
import pytest
import torch

from sharedctx.index.store import (
    SafeDisk,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    TreeStore,
    chunk_key,
    pack,
    unpack,
)
from sharedctx.tree import NodeStates

SIG = {"injection_layers": 2, "chunk_size": 64, "tree_height": 3, "node_keep": 4, "sampling": "end"}


def nodes(seed: int = 0, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    out = {(0, 0): NodeStates(None, None, torch.randn(48, generator=g))}
    for level in (1, 2):
        for index in range(2**level):
            out[(level, index)] = NodeStates(torch.randn(2, 2, n, 8, generator=g), torch.randn(2, 2, n, 8, generator=g), torch.randn(48, generator=g))
    return out


def same(a, b) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        for kind in ("keys", "values", "key"):
            x, y = getattr(a[k], kind), getattr(b[k], kind)
            if (x is None) != (y is None) or (x is not None and not torch.equal(x, y)):
                return False
    return True


def store_files(directory):
    return [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs if f.endswith(".val")]


class Boom:
    """Unpickling this creates a marker file: proof that something was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pack_roundtrip_and_corruption_detected():
    blob = pack({"a": torch.arange(6.0)}, {"kind": "x"})
    tensors, meta = unpack(blob)
    assert torch.equal(tensors["a"], torch.arange(6.0)) and meta == {"kind": "x"}
    flipped = bytearray(blob)
    flipped[-3] ^= 1
    for bad in (bytes(flipped), blob[: len(blob) // 2], b"PK\x03\x04" + blob[4:], b""):
        with pytest.raises(StoreError):
            unpack(bad)


def test_chunk_key_depends_on_model_options_and_tokens():
    ids = torch.arange(10)
    k = chunk_key("fp", SIG, ids)
    assert k == chunk_key("fp", dict(reversed(list(SIG.items()))), ids.clone())
    assert k != chunk_key("fp2", SIG, ids)
    assert k != chunk_key("fp", {**SIG, "node_keep": 8}, ids)
    assert k != chunk_key("fp", SIG, ids.flip(0))


def test_hit_miss_roundtrip_and_private_directory(tmp_path):
    store = TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o700
    key = store.key(torch.arange(64))
    assert store.get_chunk(key) is None
    store.put_chunk(key, nodes(), n_tokens=64)
    assert key in store and same(store.get_chunk(key), nodes())
    assert store.stats["hits"] == 1 and store.stats["misses"] == 1 and store.stats["writes"] == 1
    assert store.chunk_keys() == [key] and len(store) == 1
    store.close()
    again = TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG)
    assert same(again.get_chunk(key), nodes())


def test_refuses_other_model_or_options(tmp_path):
    TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG).close()
    with pytest.raises(StoreMismatchError, match="another store directory"):
        TreeStore(tmp_path / "s", fingerprint="other", signature=SIG)
    with pytest.raises(StoreMismatchError, match="node_keep"):
        TreeStore(tmp_path / "s", fingerprint="fp", signature={**SIG, "node_keep": 8})


def test_pickle_planted_in_store_is_refused_not_loaded(tmp_path):
    store = TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG)
    key = store.key(torch.arange(64))
    marker = tmp_path / "pwned"
    # what an attacker (or a careless tool) writes with stock diskcache: a pickled value, small and large
    raw = diskcache.Cache(str(tmp_path / "s"))
    raw.set(key, Boom(str(marker)))
    big = store.key(torch.arange(65))
    raw.set(big, [Boom(str(marker))] + [b"x" * 100_000])  # large: pickled into a file
    raw.set(("pickled", "key"), b"v")  # a pickled key
    raw.close()
    assert store.get_chunk(key) is None and store.get_chunk(big) is None
    assert not marker.exists()
    assert store.stats["refused"] == 2
    assert key not in store and big not in store  # dropped: the next build writes a good entry
    assert store.chunk_keys() == []  # listing never decodes the pickled key
    assert not marker.exists()
    with pytest.raises(TypeError, match="pickle"):
        store.blobs._cache.set("chunk/x", {"not": "bytes"})


def test_corrupt_and_truncated_entries_are_dropped(tmp_path):
    store = TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG)
    keys = [store.key(torch.arange(i, i + 64)) for i in range(3)]
    for i, k in enumerate(keys):
        store.put_chunk(k, nodes(i, n=64), n_tokens=64)  # large enough to live in files
    files = sorted(store_files(tmp_path / "s"))
    assert len(files) == 3
    with open(files[0], "r+b") as f:
        f.truncate(100)
    with open(files[1], "r+b") as f:
        f.seek(2000)
        f.write(b"\xff\xfe")
    got = [store.get_chunk(k) for k in keys]
    assert sum(g is None for g in got) == 2 and store.stats["corrupt"] == 2
    assert sum(k in store for k in keys) == 1


def test_size_limit_evicts(tmp_path):
    store = TreeStore(tmp_path / "s", size_limit=300_000, fingerprint="fp", signature=SIG)
    for i in range(40):
        store.put_chunk(store.key(torch.arange(i, i + 64)), nodes(i, n=64), n_tokens=64)  # ~35 kB each
    assert store.stats["volume_bytes"] <= 300_000 + 40_000
    assert 0 < len(store) < 40


def test_full_disk_leaves_nothing_half_written(tmp_path, monkeypatch):
    store = TreeStore(tmp_path / "s", fingerprint="fp", signature=SIG)
    key = store.key(torch.arange(64))

    def full(self, full_path, iterator, mode, encoding=None):
        os.makedirs(os.path.dirname(full_path), exist_ok=True)
        with open(full_path, mode) as f:
            f.write(next(iter(iterator))[:1000])  # part of the value reached the disk, then it filled up
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(diskcache.Disk, "_write", full)
    with pytest.raises(StoreFullError, match="no space left"):
        store.put_chunk(key, nodes(n=64), n_tokens=64)
    monkeypatch.undo()
    assert key not in store and store_files(tmp_path / "s") == []
    store.put_chunk(key, nodes(n=64), n_tokens=64)
    assert same(store.get_chunk(key), nodes(n=64))


def test_safe_disk_is_the_only_disk(tmp_path):
    store = TreeStore(tmp_path / "s")
    assert isinstance(store.blobs._cache.disk, SafeDisk)
    with pytest.raises(ValueError, match="not bound"):
        store.key(torch.arange(3))
    assert pickle.dumps  # the module under test never imports pickle for loading
