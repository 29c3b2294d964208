"""recipes/device/gpu_session.py, the script a lent GPU runs, end to end on the CPU with a tiny model."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np

from conftest import byte_tokenizer, tiny_model
from sharedctx.training.data import build_shards

SCRIPT = Path(__file__).resolve().parents[1] / "recipes" / "device" / "gpu_session.py"

RECIPE = """
holdout = ["a.txt", "b.txt"]
context_chunks = [1, 2]
window = 96
tasks = { lm = 0.5, passkey = 0.5 }
task_chunks = [1, 1]
steps = 4
warmup = 1
lr = 1e-2
gate_lr = 5e-2
checkpoint_every = 0
seed = 1

[sharedctx]
injection_layers = 2
chunk_size = 64
tree_height = 2
node_keep = 8
policy = "right"
upper_lora_rank = 2
"""


def _script():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_session_trains_saves_and_measures_on_the_cpu(tmp_path, one_thread):
    model_dir = tmp_path / "model"
    tiny_model("llama", num_hidden_layers=4, max_position_embeddings=2048).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    rng = np.random.default_rng(0)
    words = ["stone", "river", "lamp", "green", "north", "bell", "seven", "quiet"]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 700)))
    build_shards([corpus], byte_tokenizer(), tmp_path / "shards", holdout=["doc2.txt"])
    held = tmp_path / "heldout"
    held.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (held / name).write_text(" ".join(rng.choice(words, 300)))
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "out"
    session = _script().main([
        "--recipe", str(recipe), "--model", str(model_dir), "--data", str(tmp_path / "shards"), "--heldout", str(held),
        "--heldout-files", "a.txt", "b.txt", "--out", str(out), "--device", "cpu", "--train-seconds", "60",
        "--ppl-lengths", "512", "--ppl-window", "256", "--ppl-windows", "1", "--score-last", "64",
        "--passkey-lengths", "256", "--passkey-trials", "1", "--long-files", "b.txt", "c.txt", "missing.txt", "--long-lengths", "512",
    ])
    assert session["training"]["steps"] == 4
    assert {p.name for p in (out / "adapter").iterdir()} >= {"adapter.safetensors", "sharedctx_adapter.json", "training_summary.json"}
    saved = json.loads((out / "session.json").read_text())
    assert [(r["file"], r["control_file"]) for r in saved["ppl"]] == [("a.txt", "b.txt"), ("b.txt", "a.txt"), ("b.txt", "c.txt")]
    # c.txt is not in the recipe's holdout: never measured as if it were unseen
    assert saved["skipped"][0]["file"] == "missing.txt" and "unreadable" in saved["skipped"][0]["reason"]
    assert saved["skipped"][1:] == [{"eval": "ppl", "file": "c.txt", "length": 512, "reason": "the recipe trains on it (not in its holdout)"}]
    assert set(saved["sources"]) == {"a.txt", "b.txt", "c.txt"}
    assert set(saved["ppl"][0]["modes"]) == {"adapter", "control", "window"}
    assert set(saved["passkey"]) == {"right", "lexical"}
    assert saved["timings"]["total_s"] > 0 and (out / "train_log.jsonl").is_file() and (out / "recipe_as_run.toml").is_file()
    # the adapter the session wrote loads on a fresh copy of the base and carries the recipe's shape options
    from sharedctx import SharedLLM

    llm = SharedLLM.from_pretrained(model_dir, adapter=out / "adapter")
    assert llm.config.upper_lora_rank == 2 and llm.adapter_trained
