"""The benchmark scripts run end to end in --quick mode on a tiny random model and the texts the project ships, the
results page reads their JSON, and a missing corpus is named with the ways to give it."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """``(model_dir, out_dir)``: a tiny 5-layer llama with a byte tokenizer saved to disk, and an output folder."""
    from conftest import byte_tokenizer, tiny_model

    root = tmp_path_factory.mktemp("bench")
    model = tiny_model("llama", num_hidden_layers=5, max_position_embeddings=2048)
    model.save_pretrained(root / "model")
    byte_tokenizer().save_pretrained(root / "model")
    sys.path.insert(0, str(BENCH))
    yield root / "model", root / "out"
    sys.path.remove(str(BENCH))


def _args(bench, *extra: str) -> list[str]:
    model, out = bench
    return ["--quick", "--model", str(model), "--chunk-size", "64", "--threads", "1", "--out", str(out), *extra]


def test_finding_quick(bench):
    import bench_finding

    systems = ["sharedctx_latent", "sharedctx_text", "bm25", "full", "streaming"]
    r = bench_finding.main(_args(bench, "--lengths", "384", "--tasks", "passkey", "vt", "--systems", *systems, "--max-new-tokens", "3"))
    assert {t["system"] for t in r["trials"]} == set(systems)
    assert all(0.0 <= t["score"] <= 1.0 and t["first_token_s"] <= t["total_s"] for t in r["trials"])
    assert r["adapter"] == {"path": None, "trained": False, "sha256": None}
    assert set(r["accuracy"]["full"]) == {"passkey", "vt"}
    assert (bench[1] / "finding_quick.png").is_file()


def test_efficiency_quick(bench):
    import bench_efficiency

    r = bench_efficiency.main(_args(bench, "--lengths", "384", "--systems", "full", "streaming", "sharedctx_latent", "sharedctx_store", "--max-new-tokens", "3"))
    assert set(r["table"]) == {"full", "streaming", "sharedctx_latent", "sharedctx_store"}
    assert r["table"]["sharedctx_store"]["384"]["build_s"] > 0
    assert "full_over_sharedctx_store_ttft" in r["ratios"]
    assert (bench[1] / "efficiency_quick.png").is_file()


def test_ppl_quick(bench):
    import bench_ppl

    r = bench_ppl.main(_args(bench, "--lengths", "768", "--windows", "1"))
    modes = r["results"][0]["modes"]
    assert set(modes) == {"adapter", "control", "window", "full", "streaming"}
    # the identity adapter reads nothing: injecting any context leaves the window's perplexity unchanged
    assert modes["adapter"]["ppl"] == pytest.approx(modes["window"]["ppl"], rel=1e-4)
    assert modes["control"]["ppl"] == pytest.approx(modes["window"]["ppl"], rel=1e-4)


def test_ppl_long_held_out_code_and_joined_controls(bench):
    import bench_ppl

    quick = argparse.Namespace(data=None, quick=True)
    text, info = bench_ppl.read_text("stdlib:code", quick)
    assert info["python"] == sys.version.split()[0] and info["modules"][0] == "_pydecimal.py"
    assert "class Decimal" in text and len(text) > 400_000  # long enough for 128K tokens of the default model
    with pytest.raises(FileNotFoundError, match="books/no_such_book.txt: no such file in the benchmark corpus"):
        bench_ppl.read_text("books/no_such_book.txt", quick)
    # (that none of stdlib:code is in the training corpus is checked by tests/test_data.py where the corpus is present)
    from sharedctx.training.data import DEFAULT_HOLDOUT

    assert set(bench_ppl.CONTROLS) >= set(DEFAULT_HOLDOUT)
    # a control text longer than one file joins the next one; the JSON names every part and the source
    r = bench_ppl.main(_args(bench, "--lengths", "768", "--windows", "1", "--files", "stdlib:code", "--modes", "adapter", "control", "window"))
    row = r["results"][0]
    assert row["file"] == "stdlib:code" and row["control_file"] == "stdlib:code-control"
    assert r["sources"]["stdlib:code"]["sha256"] == info["sha256"]
    assert set(row["modes"]) == {"adapter", "control", "window"}


def test_ablations_quick(bench):
    import bench_ablations

    r = bench_ablations.main(_args(bench, "--lengths", "512", "--only", "policy", "budget", "injection_layers", "--tasks", "passkey"))
    labels = {row["label"]: row for row in r["rows"]}
    assert "not_run" in labels["M=8"]  # more layers than the tiny model has, recorded rather than dropped
    assert labels["M=2"]["config"]["injection_layers"] == 2
    assert labels["max 512 states"]["needle_trials"] == 1
    assert (bench[1] / "ablations_quick.json").is_file()


def test_report_covers_every_benchmark(bench):
    import report

    test_files = {p.name for p in bench[1].glob("*_quick.json")}
    if not test_files:
        pytest.skip("runs after the quick benchmarks of this module")
    text = report.table(bench[1], "_quick")
    for name, kind in (("finding_quick.json", "finding things"), ("efficiency_quick.json", "time to first token"),
                       ("ppl_quick.json", "PPL of the last"), ("ablations_quick.json", "ablation"),
                       ("selection_quick.json", "chunk selection"), ("lexicon_quick.json", "lexical ranking"),
                       ("rewording_quick.json", "top-1 chunk accuracy")):
        if name in test_files:
            assert kind in text
    assert text.count("\n") > 5
    assert json.loads((bench[1] / "ppl_quick.json").read_text())["command"].startswith(Path(sys.argv[0]).name)


def test_tasks_hide_their_answers():
    import numpy as np

    sys.path.insert(0, str(BENCH))
    try:
        from _tasks import TASK_NAMES, make_task, score
    finally:
        sys.path.remove(str(BENCH))
    from conftest import byte_tokenizer

    tok = byte_tokenizer()
    filler = np.asarray(tok("It is a truth universally acknowledged. " * 200, add_special_tokens=False)["input_ids"])
    rng = np.random.default_rng(0)
    for name in TASK_NAMES:
        for depth in (0.0, 0.5, 1.0):
            task = make_task(name, tok, rng, length=1500, depth=depth, filler=filler)
            assert all(a in task.context for a in task.answers), name
            assert score(task, " ".join(task.answers)) == 1.0 and score(task, "nothing") == 0.0
            assert abs(len(tok(task.context)["input_ids"]) - 1500) < 80, name


def test_selection_quick(bench):
    import bench_selection

    r = bench_selection.main(_args(bench, "--lengths", "512", "--tasks", "passkey", "niah_single", "--layers", "1"))
    assert r["trials"] and all(t["answer_chunk"] < t["chunks"] for t in r["trials"])
    assert {"design", "mean_l1", "maxleaf_l1", "lexical", "bm25"} <= set(r["summary"])
    for per in r["summary"].values():
        cell = per["512"]
        assert 0.0 <= cell["recall@1"] <= cell["recall@2"] <= cell["recall@8"] <= 1.0
    assert (bench[1] / "selection_quick.png").is_file()


def test_lexicon_quick(bench):
    import bench_lexicon

    model, out = bench
    r = bench_lexicon.main(["--quick", "--model", str(model), "--chunk-size", "64", "--out", str(out)])
    assert r["config"]["corpus"]["folder"].endswith("benchmarks/data") and len(r["config"]["questions"]) >= 20
    assert [x["target_tokens"] for x in r["results"]] == [20_000, 60_000]
    for x in r["results"]:
        assert x["tokens"] >= x["target_tokens"] and x["chunks"] > 100
        assert x["same_rankings"] is True and x["max_abs_score_diff"] == 0.0
        inv = x["inverted"]
        assert inv["query_ms"]["n"] == 2 * len(r["config"]["questions"]) and 0 < inv["query_ms"]["median"] <= inv["query_ms"]["p95"]
        assert inv["add_document"]["documents"] == 2 and inv["delete_document_s"] > 0 and inv["open_s"] > 0
        assert x["index"]["retrieve_ms"]["median"] > 0 and x["index"]["tokens"] >= x["tokens"]
    assert r["growth"]["tokens"] > 2
    assert (out / "lexicon_quick.png").stat().st_size > 1000


def test_rewording_quick(bench):
    import bench_rewording

    pytest.importorskip("sentence_transformers")
    pytest.importorskip("all_minilm_l6_v2")
    r = bench_rewording.main(_args(bench, "--lengths", "512", "--tasks", "passkey", "niah_single"))
    assert r["arms"] == ["lexical_unstemmed", "lexical", "minilm", "hybrid"] and not r["not_run"]
    rw = r["reworded"]
    assert rw["questions"] >= 9 and rw["chunks"] > 1 and rw["skipped"]  # the shipped excerpts hold the opening chapters only
    assert rw["library_agrees"] == {"lexical": f"{rw['questions']}/{rw['questions']}", "hybrid": f"{rw['questions']}/{rw['questions']}"}
    for acc in [rw["accuracy"], r["finding"]["accuracy_all"]]:
        for cell in acc.values():
            assert 0.0 <= cell["top1"] <= cell["recall@3"] <= 1.0 and 0.0 < cell["mrr"] <= 1.0
    assert len(r["finding"]["trials"]) == 2 and all(t["gold"] for t in r["finding"]["trials"])
    assert (bench[1] / "rewording_quick.png").is_file()


def test_offline_tiktoken_serves_a_local_cl100k_as_tiktoken_cache(bench, tmp_path, monkeypatch):
    import hashlib
    import importlib

    import _systems

    site = tmp_path / "site"
    (site / "tiktoken_ext" / "data").mkdir(parents=True)
    (site / "tiktoken_ext" / "data" / "cl100k_base.tiktoken").write_bytes(b"ranks")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    # set (empty) through monkeypatch so the value offline_tiktoken writes is undone after the test: a leaked
    # TIKTOKEN_CACHE_DIR would hide llama-index's own bundled tiktoken cache from later tests
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("SHAREDCTX_HOME", str(tmp_path / "home"))
    cache = _systems.offline_tiktoken()
    name = hashlib.sha1(b"https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken").hexdigest()
    assert cache == str(tmp_path / "home" / "tiktoken") and (tmp_path / "home" / "tiktoken" / name).read_bytes() == b"ranks"
    import os

    assert os.environ["TIKTOKEN_CACHE_DIR"] == cache


def test_corpus_folder_comes_from_data_option_then_environment_then_beside_the_checkout(bench, tmp_path, monkeypatch):
    import _common
    from _common import DATA_ENV, MissingData, data_file, data_root

    (tmp_path / "given" / "books").mkdir(parents=True)
    (tmp_path / "given" / "books" / "emma.txt").write_text("Emma")
    (tmp_path / "env").mkdir()
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    monkeypatch.setattr(_common, "NEIGHBOUR_DATA", tmp_path / "beside")
    full, quick = argparse.Namespace(data=None, quick=False), argparse.Namespace(data=None, quick=True)
    given = argparse.Namespace(data=str(tmp_path / "given"), quick=True)
    assert data_root(given)[0] == tmp_path / "given"  # --data wins, with --quick too
    assert data_root(quick)[0] == _common.SHIPPED_DATA  # a smoke run reads the shipped texts on every machine
    assert data_root(full) == (tmp_path / "env", f"given by ${DATA_ENV}")
    assert data_file("books/emma.txt", given) == tmp_path / "given" / "books" / "emma.txt"
    assert data_file(str(tmp_path / "given" / "books" / "emma.txt"), full).read_text() == "Emma"  # a path as given
    with pytest.raises(MissingData, match=re.escape(f"books/emma.txt: no such file in the benchmark corpus {tmp_path / 'env'}")) as err:
        data_file("books/emma.txt", full)
    assert "--data DIR" in str(err.value) and f"{DATA_ENV}=DIR" in str(err.value) and "--quick" in str(err.value)
    with pytest.raises(MissingData) as err:  # --quick ignores $SHAREDCTX_DATA: the message offers --data only
        data_file("math/none.tex", quick)
    assert "with --data DIR," in str(err.value) and DATA_ENV not in str(err.value)
    monkeypatch.delenv(DATA_ENV)
    assert data_root(full)[0] == tmp_path / "beside"
    with pytest.raises(MissingData, match=re.escape(f"{tmp_path / 'beside'} (no such folder; ../shared/data beside the checkout")):
        data_file("books/emma.txt", full)
    # every text a --quick run reads by default is shipped, and what is shipped stays small
    for name in ("books/pride_and_prejudice.txt", "books/northanger_abbey.txt", "books/emma.txt", _common.FILLER):
        assert (_common.SHIPPED_DATA / name).is_file(), name
    assert sum(p.stat().st_size for p in _common.SHIPPED_DATA.rglob("*") if p.is_file()) < 200_000


def test_a_missing_corpus_ends_a_script_with_its_name_and_the_ways_to_give_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "SHAREDCTX_DATA"}
    env["PYTHONPATH"] = str(BENCH.parent)
    out = subprocess.run([sys.executable, str(BENCH / "bench_core.py"), "--data", str(tmp_path / "nowhere")],
                         env=env, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith(f"error: books/emma.txt: no such file in the benchmark corpus {tmp_path / 'nowhere'} (no such folder; given by --data)")
    assert "--data DIR or SHAREDCTX_DATA=DIR" in out.stderr
