"""Precomputed distillation teachers on tiny models: shards equal the on-the-fly teacher, a run reading them gives the
on-the-fly losses, an interrupted precomputation resumes to the same shards, and shards that are damaged, planted or
made for another model or teacher are refused (or rewritten)."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import make_llm, word_shards

from sharedctx.errors import TeacherMismatchError, TeacherShardError
from sharedctx.training import teacher as teacher_mod
from sharedctx.training.objectives import scored_positions, teacher_topk
from sharedctx.training.teacher import precompute_teacher
from sharedctx.training.teacher_store import MANIFEST, TeacherStore, teacher_key
from sharedctx.training.trainer import TrainConfig, Trainer

SMALL = {"injection_layers": 2, "chunk_size": 64, "tree_height": 3, "node_keep": 4, "policy": "right"}
MIX = {"distill": 1.0, "lm": 0.5, "reconstruction": 0.5}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return word_shards(tmp_path_factory)


def _config(tmp_path, **kw):
    cfg = {
        "out_dir": str(tmp_path / "run"), "sharedctx": SMALL, "context_chunks": [1, 2], "window": 40, "steps": 8, "warmup": 1, "lr": 1e-2,
        "gate_lr": 5e-2, "checkpoint_every": 0, "progress": False, "seed": 5, "recon_span": 6, "distill_top_k": 8, "tasks": MIX, "batch_size": 2,
    }
    cfg.update(kw)
    return TrainConfig(**cfg)


def _precompute(tmp_path, shards, out, *, llm=None, **kw):
    opts = {k: kw.pop(k) for k in ("examples", "shard_examples") if k in kw}
    return precompute_teacher(_config(tmp_path, **kw), out, llm=llm or make_llm(**SMALL), shards=shards, progress=False, **opts)


def _manifest(out):
    return json.loads((out / MANIFEST).read_text())


def test_precomputed_shards_equal_the_on_the_fly_teacher(tmp_path, shards):
    out = tmp_path / "teacher"
    summary = _precompute(tmp_path, shards, out, shard_examples=3)
    assert summary["complete"] and summary["steps"] == 8 and summary["examples"] >= 4 and summary["shards"] >= 2
    store = TeacherStore(out)
    assert len(store) == summary["examples"]
    # the trainer's own draws, replayed: every distill example is in the shards, with the teacher computed now
    replay = Trainer(_config(tmp_path), llm=make_llm(**SMALL), shards=shards)
    seen = 0
    for _ in range(8):
        replay.llm.train()
        for row in replay.next_batch():
            if row.task != "distill":
                continue
            stored, fresh = store.get(row), teacher_topk(replay.llm, row, 8)
            mask = scored_positions(row.labels[None])[0]
            assert stored.indices.shape == fresh.indices.shape == (1, 40, 8)
            assert torch.equal(stored.indices[0, mask], fresh.indices[0, mask])
            torch.testing.assert_close(stored.logprobs[0, mask], fresh.logprobs[0, mask], atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(stored.log_tail[0, mask], fresh.log_tail[0, mask], atol=1e-6, rtol=1e-6)
            seen += 1
    assert seen == summary["examples"]
    # a window of other tokens is a miss
    row.input_ids[3] = (row.input_ids[3] + 1) % 250
    assert store.get(row) is None and teacher_key(row) not in {k for e in _manifest(out)["shards"] for k in e["keys"]}


def test_a_run_from_shards_gives_the_on_the_fly_losses_and_logs_hits_and_misses(tmp_path, shards):
    fly = Trainer(_config(tmp_path / "fly"), llm=make_llm(**SMALL), shards=shards)
    fly.fit()
    _precompute(tmp_path, shards, tmp_path / "all")
    full = Trainer(_config(tmp_path / "full", teacher_dir=str(tmp_path / "all")), llm=make_llm(**SMALL), shards=shards)
    summary = full.fit()
    # the first few distill examples only: the rest are misses, computed on the fly
    part = _precompute(tmp_path, shards, tmp_path / "part", examples=2)
    partial = Trainer(_config(tmp_path / "partial", teacher_dir=str(tmp_path / "part")), llm=make_llm(**SMALL), shards=shards)
    partial.fit()

    def log(name):
        return [json.loads(x) for x in (tmp_path / name / "run" / "train_log.jsonl").read_text().splitlines()]

    ref = log("fly")
    distill = sum(2 for r in ref if r["task"] == "distill")
    assert distill >= 4 and "teacher_hits" not in ref[0]
    for name in ("full", "partial"):
        rows = log(name)
        assert [r["task"] for r in rows] == [r["task"] for r in ref]
        for a, b in zip(ref, rows):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, a["step"])
        assert all(("teacher_hits" in r) == (r["task"] == "distill") for r in rows)
    assert summary["teacher"] == {"hits": distill, "misses": 0} == full.teacher_counts
    assert partial.teacher_counts == {"hits": part["examples"], "misses": distill - part["examples"]} and part["examples"] >= 2
    assert sum(r.get("teacher_misses", 0) for r in log("partial")) == distill - part["examples"]


def test_an_interrupted_precomputation_resumes_to_the_same_shards(tmp_path, shards, monkeypatch):
    straight = tmp_path / "straight"
    _precompute(tmp_path, shards, straight, shard_examples=2)
    out = tmp_path / "resumed"
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise KeyboardInterrupt  # stopped in the middle of a shard
        return teacher_topk(*args, **kwargs)

    monkeypatch.setattr(teacher_mod, "teacher_topk", failing)
    with pytest.raises(KeyboardInterrupt):
        _precompute(tmp_path, shards, out, shard_examples=2)
    monkeypatch.undo()
    written = _manifest(out)["shards"]
    assert len(written) == 2
    (out / "teacher-00002.safetensors").write_bytes(b"torn: half a shard, never listed")  # a torn last write
    summary = _precompute(tmp_path, shards, out, shard_examples=2)
    assert summary["kept"] == 4 and summary["computed"] == summary["examples"] - 4 and summary["complete"]
    a, b = _manifest(straight), _manifest(out)
    assert [(e["file"], e["sha256"], e["keys"], e["steps"]) for e in a["shards"]] == [(e["file"], e["sha256"], e["keys"], e["steps"]) for e in b["shards"]]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())
    # a finished folder resumes to nothing more
    again = _precompute(tmp_path, shards, out, shard_examples=2)
    assert again["computed"] == 0 and again["examples"] == summary["examples"]


def test_damaged_or_planted_shards_are_refused_by_the_trainer_and_rewritten_by_a_resume(tmp_path, shards):
    out = tmp_path / "teacher"
    _precompute(tmp_path, shards, out, shard_examples=2)
    before = _manifest(out)["shards"]
    shard = out / before[1]["file"]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit of a log-probability
    shard.write_bytes(bytes(data))
    with pytest.raises(TeacherShardError, match="damaged"):
        Trainer(_config(tmp_path, teacher_dir=str(out)), llm=make_llm(**SMALL), shards=shards)
    summary = _precompute(tmp_path, shards, out, shard_examples=2)
    assert summary["rewritten"] == len(before) - 1 and summary["kept"] == 2
    assert [e["sha256"] for e in _manifest(out)["shards"]] == [e["sha256"] for e in before]
    # a pickle in place of a shard: its checksum differs, so it is never loaded
    ran = tmp_path / "ran"
    shard.write_bytes(pickle.dumps(ran))
    with pytest.raises(TeacherShardError, match="damaged"):
        TeacherStore(out)
    _precompute(tmp_path, shards, out, shard_examples=2)
    assert TeacherStore(out) and not ran.exists()
    # a pickle planted beside the shards: refused by both, and left where it is
    (out / "teacher.pkl").write_bytes(pickle.dumps(ran))
    with pytest.raises(TeacherShardError, match="not teacher shards"):
        Trainer(_config(tmp_path, teacher_dir=str(out)), llm=make_llm(**SMALL), shards=shards)
    with pytest.raises(TeacherShardError, match="not teacher shards"):
        _precompute(tmp_path, shards, out, shard_examples=2)
    assert (out / "teacher.pkl").exists()
    with pytest.raises(TeacherShardError, match="no teacher shards"):
        Trainer(_config(tmp_path, teacher_dir=str(tmp_path / "nowhere")), llm=make_llm(**SMALL), shards=shards)


def test_shards_of_another_model_or_teacher_are_refused(tmp_path, shards):
    out = tmp_path / "teacher"
    _precompute(tmp_path, shards, out, examples=2)
    with pytest.raises(TeacherMismatchError, match="fingerprint"):
        Trainer(_config(tmp_path, teacher_dir=str(out)), llm=make_llm(seed=1, **SMALL), shards=shards)
    for change, field in (({"distill_top_k": 4}, "top_k"), ({"distill_tail": "renormalise"}, "tail"), ({"window": 48}, "window"),
                          ({"context_chunks": [2, 2]}, "context_chunks")):
        with pytest.raises(TeacherMismatchError, match=field):
            Trainer(_config(tmp_path, teacher_dir=str(out), **change), llm=make_llm(**SMALL), shards=shards)
    with pytest.raises(TeacherMismatchError, match="chunk_size"):
        small = {**SMALL, "chunk_size": 32}
        Trainer(_config(tmp_path, teacher_dir=str(out), sharedctx=small), llm=make_llm(**small), shards=shards)
    # another recipe's draws: a trainer only warns (its lookups miss), a resumed precomputation refuses to mix them
    assert Trainer(_config(tmp_path, teacher_dir=str(out), seed=6), llm=make_llm(**SMALL), shards=shards).teachers is not None
    with pytest.raises(TeacherMismatchError, match="seed"):
        _precompute(tmp_path, shards, out, seed=6)
    with pytest.raises(ValueError, match="no distill"):
        _precompute(tmp_path, shards, tmp_path / "lm", tasks={"lm": 1.0})


def test_recipe_field_and_command_line(tmp_path, capsys):
    from pathlib import Path

    from sharedctx.cli import main
    from sharedctx.training.recipe import load_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "results" / "teacher" / "distill_cpu.toml"
    cfg = load_recipe(recipe)
    assert cfg.tasks == {"distill": 1.0} and cfg.teacher_dir is None and cfg.window == 256
    (tmp_path / "r.json").write_text(json.dumps({"tasks": {"lm": 1.0}, "teacher_dir": "teacher"}))
    assert load_recipe(tmp_path / "r.json").teacher_dir == str(tmp_path / "teacher")  # resolved against the recipe
    assert main(["train", "teacher", "--config", str(tmp_path / "r.json")]) == 2  # refused before loading a model
    assert "no distill weight" in capsys.readouterr().err
    assert main(["train"]) == 2 and "--config" in capsys.readouterr().err
