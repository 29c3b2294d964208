"""Building an index with Ray (`sharedctx.distributed`) on a local two-CPU cluster with a tiny model.

The invariant: content addressing makes the build independent of partitioning, so a distributed build equals the
single-process `ContextIndex.add_many` of the same files (same chunk keys, same node tensors, same document
records); a re-run encodes nothing; a batch that fails is retried by Ray and nothing is lost; merging refuses a
shard of another model or configuration.
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from sharedctx.distributed import build_index
from sharedctx.errors import StoreMismatchError
from sharedctx.index import ContextIndex, DocumentTable
from sharedctx.index.store import TreeStore
from sharedctx.testing import make_llm

# the actors unpickle this module's factories: send them by value (the workers need not import the tests)
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyModel:
    """A picklable factory of the tiny model; with ``fail_marker``, the first batch encoded anywhere fails
    (raises, or with ``kill`` ends the actor's process), once across all actors and restarts."""

    def __init__(self, seed: int = 0, fail_marker: str | None = None, kill: bool = False, poison: str | None = None, **cfg) -> None:
        self.seed, self.fail_marker, self.kill, self.poison, self.cfg = seed, fail_marker, kill, poison, cfg

    def __call__(self):
        torch.set_num_threads(1)
        llm = make_llm("llama", seed=self.seed, **self.cfg)
        if self.fail_marker is not None:
            encode, marker, kill = llm.encoder.encode_chunks, self.fail_marker, self.kill

            def flaky(chunks, *a, **k):
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
                except FileExistsError:
                    return encode(chunks, *a, **k)
                if kill:
                    os._exit(1)
                raise RuntimeError("injected failure of an encoding actor")

            llm.encoder.encode_chunks = flaky
        if self.poison is not None:  # every batch holding a chunk with this text fails, however often it is retried
            encode, poison, tok = llm.encoder.encode_chunks, self.poison, llm.tokenizer

            def poisoned(chunks, *a, **k):
                if any(poison in tok.decode(c.tolist()) for c in chunks):
                    raise RuntimeError("injected permanent failure")
                return encode(chunks, *a, **k)

            llm.encoder.encode_chunks = poisoned
        return llm


TOL = {"rtol": 1e-5, "atol": 1e-6}


@pytest.fixture(scope="module")
def cluster():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8)))) for _ in range(300)]
    root = tmp_path_factory.mktemp("corpus")
    for i in range(5):
        lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(15, 30))]
        (root / f"doc{i}.txt").write_text("\n".join(lines) + "\n")
    (root / "copy_of_doc0.txt").write_text((root / "doc0.txt").read_text())  # every chunk repeated
    (root / "binary.bin").write_bytes(b"\x00\x01\x02")  # not text: skipped
    return root


@pytest.fixture(scope="module")
def single(corpus, tmp_path_factory):
    """The reference: the same files added by one process."""
    directory = tmp_path_factory.mktemp("single") / "index"
    with ContextIndex(TinyModel()(), directory) as index:
        report = index.add_many([corpus], show_progress=False)
    assert report.documents == 6 and len(report.skipped) == 1
    return directory


def contents(directory: Path) -> tuple[dict, dict]:
    """Every chunk's tensors and every document record of an index on disk."""
    table = DocumentTable(directory)
    manifest = table.manifest()
    store = TreeStore(directory / "nodes", fingerprint=manifest["fingerprint"], signature=manifest["signature"])
    chunks = {}
    for key in store.chunk_keys():
        nodes = store.get_chunk(key)
        chunks[key] = {(lv, ix, kind): getattr(st, kind) for (lv, ix), st in nodes.items() for kind in ("keys", "values", "key")
                       if getattr(st, kind) is not None}
    docs = {}
    for doc_id in table.ids():
        d = table.get(doc_id)
        docs[doc_id] = (d.text, d.ids, d.offsets, d.bounds, d.root_keys, d.chunk_keys, d.source)
    store.close()
    table.close()
    return chunks, docs


def assert_same(a: Path, b: Path) -> None:
    """Same chunk keys, document records and node states: exactly the same keys, and states equal up to the float
    rounding that batching chunks differently gives (padding and batch size change the matmul's reduction order)."""
    chunks_a, docs_a = contents(a)
    chunks_b, docs_b = contents(b)
    assert chunks_a.keys() == chunks_b.keys() and len(chunks_a) > 10
    for key in chunks_a:
        assert chunks_a[key].keys() == chunks_b[key].keys()
        for name in chunks_a[key]:
            torch.testing.assert_close(chunks_a[key][name], chunks_b[key][name], **TOL)
    assert docs_a.keys() == docs_b.keys()
    for doc_id in docs_a:
        for x, y in zip(docs_a[doc_id], docs_b[doc_id]):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(x, y, **(TOL if x.is_floating_point() else {"rtol": 0, "atol": 0}))
            else:
                assert x == y


def test_distributed_build_equals_single_process_and_rerun_encodes_nothing(cluster, corpus, single, tmp_path):
    store = tmp_path / "index"
    report = build_index([corpus], store, model=TinyModel(), num_actors=2, batch_chunks=4)
    assert report.documents == 6 and [p for p, _ in report.skipped] == [str(corpus / "binary.bin")] and not report.failed
    n_chunks = len(contents(single)[0])
    assert report.chunks_encoded == n_chunks  # the copy of doc0 reuses every chunk of doc0
    assert_same(single, store)
    assert not (store / "shards").exists()  # this run's shards were merged and removed

    again = build_index([corpus], store, model=TinyModel(), num_actors=2, batch_chunks=4)
    assert again.chunks_encoded == 0 and all(r.unchanged for r in again.added)
    assert_same(single, store)
    with ContextIndex(TinyModel()(), store) as index:  # the result is an ordinary index
        assert len(index) == 6 and index.retrieve("the words")


def test_dataset_of_texts(cluster, corpus, tmp_path):
    texts = [{"doc_id": p.name, "text": p.read_text()} for p in sorted(corpus.glob("doc*.txt"))]
    store = tmp_path / "index"
    report = build_index(ray.data.from_items(texts), store, model=TinyModel(), num_actors=1)
    assert report.documents == 5 and not report.failed
    reference = tmp_path / "reference"
    with ContextIndex(TinyModel()(), reference) as index:
        for row in texts:
            index.add_text(row["text"], doc_id=row["doc_id"])
    assert_same(reference, store)


@pytest.mark.parametrize("kill", [False, True], ids=["raises", "dies"])
def test_failed_actor_is_retried_and_nothing_is_lost(cluster, corpus, single, tmp_path, kill):
    marker = tmp_path / "failed-once"
    store = tmp_path / "index"
    report = build_index([corpus], store, model=TinyModel(fail_marker=str(marker), kill=kill), num_actors=1, batch_chunks=4)
    assert marker.exists()  # the failure did happen
    assert report.documents == 6 and not report.failed
    assert_same(single, store)


def test_merge_refuses_a_shard_of_another_model(single, tmp_path):
    index = ContextIndex(TinyModel()(), tmp_path / "target")
    other = TinyModel(seed=1)()  # another base model
    shard = TreeStore(tmp_path / "shard", fingerprint=other.fingerprint, signature=other.config.lower_signature())
    shard.close()
    with pytest.raises(StoreMismatchError, match="another|built by base model"):
        index.merge([tmp_path / "shard"])
    bigger = TinyModel(chunk_size=64)()  # the same base model, another lower-side configuration
    with pytest.raises(StoreMismatchError):
        index.merge([_copy_as(bigger, tmp_path / "other-index")])
    assert len(index.store) == 0 and len(index) == 0
    # an index shard of the same model merges: its chunks and its documents
    report = index.merge([single])
    assert report.chunks_added == len(contents(single)[0]) and report.documents_added == 6 and len(index) == 6
    index.close()
    assert_same(single, tmp_path / "target")


def _copy_as(llm, directory: Path) -> Path:
    with ContextIndex(llm, directory) as index:
        index.add_text("a few words for a document of another configuration\n")
    return directory


def test_merge_checks_each_entry(single, tmp_path):
    from sharedctx.index.store import MAGIC

    llm = TinyModel()()
    shard = TreeStore(tmp_path / "shard", fingerprint=llm.fingerprint, signature=llm.config.lower_signature())
    source = TreeStore(single / "nodes", fingerprint=llm.fingerprint, signature=llm.config.lower_signature())
    keys = source.chunk_keys()[:3]
    for key in keys:
        shard.blobs.set_raw(key, source.blobs.get_raw(key))
    blob = bytearray(shard.blobs.get_raw(keys[0]))
    blob[-1] ^= 0xFF  # corrupt one entry
    shard.blobs.set_raw(keys[0], bytes(blob))
    assert bytes(blob[:4]) == MAGIC
    source.close()
    shard.close()
    with ContextIndex(llm, tmp_path / "target") as index:
        report = index.merge([tmp_path / "shard"])
        assert report.chunks_added == 2 and [k for _, k, _ in report.refused] == [keys[0]]
        assert keys[0] not in index.store and keys[1] in index.store


def test_cli_add_ray_lists_files_that_failed_and_keeps_the_rest(cluster, corpus, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from sharedctx import distributed
    from sharedctx.cli import main

    real = distributed.build_index
    seen = {}

    def build(paths, store, **options):  # the CLI's own model would be the default one: build with the tiny one
        seen.update(options)
        return real(paths, store, **{**options, "model": TinyModel(poison="§"), "max_retries": 0, "batch_chunks": 2})

    monkeypatch.setattr(distributed, "build_index", build)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.setdefault("init", kw))  # the module's cluster is running
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    files = tmp_path / "files"
    shutil.copytree(corpus, files)
    (files / "poison.txt").write_text("a line that cannot be encoded §\n")
    store = tmp_path / "index"
    code = main(["index", "add", "--ray", "--ray-address", "auto", "--ray-actors", "1", "--store", str(store), "--json", str(files)])
    out = json.loads(capsys.readouterr().out)
    assert code == 1 and seen["init"]["address"] == "auto" and seen["num_actors"] == 1
    failed = {f["path"] for f in out["failed"]}
    assert str((files / "poison.txt").resolve()) in failed and out["documents"] >= 1
    assert out["documents"] + len(failed) == 7 and [s["path"] for s in out["skipped"]] == [str(files / "binary.bin")]
    with ContextIndex(TinyModel()(), store) as index:  # what was kept is whole
        assert {d.doc_id for d in index.documents()} == {str(p.resolve()) for p in files.glob("*.txt")} - failed
        for doc in index.live.all():
            assert all(key in index.store for key in doc.chunk_keys)


def test_cli_merge(single, tmp_path, capsys):
    from sharedctx.cli import main

    target = tmp_path / "target"
    with ContextIndex(TinyModel()(), target) as index:
        index.add_text("one small document\n", doc_id="small")
    assert main(["index", "merge", "--store", str(target), str(single)]) == 0
    assert "6 documents added" in capsys.readouterr().out
    other = _copy_as(TinyModel(chunk_size=64)(), tmp_path / "other")
    assert main(["index", "merge", "--store", str(target), str(other)]) == 2
    assert "built by base model" in capsys.readouterr().err
    with ContextIndex(TinyModel()(), target) as index:
        assert len(index) == 7
