"""The training loop on tiny models: loss goes down, only the adapter changes, resume is exact, recipes parse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer, make_llm, tiny_model, word_shards

from sharedctx.training.trainer import (
    TrainConfig,
    Trainer,
    collate,
    load_recipe,
    lr_factor,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SMALL = dict(injection_layers=2, chunk_size=32, tree_height=3, node_keep=4, policy="right")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return word_shards(tmp_path_factory, held="held out " * 200)


def _config(tmp_path, **kw):
    base = dict(out_dir=str(tmp_path / "run"), sharedctx=SMALL, context_chunks=[1, 2], window=48, steps=4, warmup=1, lr=1e-2, gate_lr=5e-2, checkpoint_every=0, progress=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def test_steps_reduce_loss_and_touch_only_the_adapter(tmp_path, shards):
    llm = make_llm(**SMALL)
    trainer = Trainer(_config(tmp_path, steps=12, warmup=0, min_lr_ratio=1.0, lr=3e-2, gate_lr=1e-1), llm=llm, shards=shards)
    base_before = {n: p.detach().clone() for n, p in llm.base.named_parameters() if "cross" not in n}
    inj_before = {n: p.detach().clone() for n, p in llm.injection.named_parameters()}
    rows = [trainer.sample_example("lm")]
    losses = []
    for _ in range(12):
        loss, n = trainer.micro_step(rows)
        trainer.opt.step()
        trainer.opt.zero_grad()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.05, losses
    for n, p in llm.base.named_parameters():
        if "cross" not in n:
            assert torch.equal(p, base_before[n]), n
    changed = [n for n, p in llm.injection.named_parameters() if not torch.equal(p, inj_before[n])]
    assert any(n.endswith("gate") for n in changed) and any("q_proj" in n for n in changed)


def test_mixed_tasks_and_batches(tmp_path, shards):
    trainer = Trainer(_config(tmp_path, tasks={"lm": 1, "passkey": 1, "kv": 1}, batch_size=2, grad_accum=2, task_chunks=[1, 1], steps=3), llm=make_llm(**SMALL), shards=shards)
    summary = trainer.fit()
    assert summary["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    meta = json.loads((tmp_path / "run" / "adapter" / "sharedctx_adapter.json").read_text())
    assert meta["trained"] is True and meta["config"]["chunk_size"] == 32


def test_collate_pads_labels_and_mask():
    from sharedctx.training.data import Example

    a = Example(torch.arange(5), torch.tensor([5, 6, 7]), torch.tensor([-100, 6, 7]))
    b = Example(torch.arange(4), torch.tensor([8, 9]), torch.tensor([-100, 9]))
    ids, labels, mask, ctx = collate([a, b], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 0]] and labels.tolist() == [[-100, 6, 7], [-100, 9, -100]] and mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def test_checkpoint_resume_is_exact(tmp_path, shards):
    straight = Trainer(_config(tmp_path / "a", steps=4), llm=make_llm(**SMALL), shards=shards)
    straight.fit()
    first = Trainer(_config(tmp_path / "b", steps=4), llm=make_llm(**SMALL), shards=shards)
    first.train_step()
    first.train_step()
    first.save_checkpoint()
    resumed = Trainer(_config(tmp_path / "b", steps=4), llm=make_llm(**SMALL), shards=shards)
    assert resumed.resume() and resumed.step == 2
    resumed.fit()
    for (n, p), (_, q) in zip(straight.llm.injection.named_parameters(), resumed.llm.injection.named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    log_a = [json.loads(x)["loss"] for x in (tmp_path / "a" / "run" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x)["loss"] for x in (tmp_path / "b" / "run" / "train_log.jsonl").read_text().splitlines()]
    assert log_a[2:] == log_b


def test_checkpoint_is_safetensors_and_json_and_a_planted_pickle_is_refused(tmp_path, shards):
    import pickle

    trainer = Trainer(_config(tmp_path / "c", steps=4), llm=make_llm(**SMALL), shards=shards)
    trainer.train_step()
    path = trainer.save_checkpoint()
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "tensors.safetensors"]
    # a pickle planted where the old format lived is refused, not loaded (unpickling would run its code)
    ran = tmp_path / "ran"
    (trainer.out / "checkpoint.pt").write_bytes(pickle.dumps(ran))  # loading it would not even be needed to fail
    fresh = Trainer(_config(tmp_path / "c", steps=4), llm=make_llm(**SMALL), shards=shards)
    with pytest.raises(ValueError, match="pickled checkpoint"):
        fresh.resume()
    (trainer.out / "checkpoint.pt").unlink()
    # and one planted inside the checkpoint folder too
    (path / "extra.pt").write_bytes(pickle.dumps(ran))
    with pytest.raises(ValueError, match="unexpected files"):
        fresh.resume()
    (path / "extra.pt").unlink()
    assert fresh.resume() and fresh.step == 1


def test_init_adapter_starts_from_saved_weights(tmp_path, shards):
    first = Trainer(_config(tmp_path / "a", steps=2), llm=make_llm(**SMALL), shards=shards)
    first.fit()
    saved = {n: p.detach().clone() for n, p in first.llm.injection.named_parameters()}
    # fine-tune under another policy: the weights start where the first run ended
    second = Trainer(_config(tmp_path / "b", steps=1, init_adapter=str(tmp_path / "a" / "run" / "adapter"), sharedctx={**SMALL, "policy": "lexical"}),
                     llm=make_llm(**{**SMALL, "policy": "lexical"}), shards=shards)
    for n, p in second.llm.injection.named_parameters():
        assert torch.equal(p, saved[n]), n
    assert second.fit()["steps"] == 1
    # a first phase: stops at step 1 of a 4-step schedule, and resuming finishes the schedule
    phase = Trainer(_config(tmp_path / "d", steps=4, stop_at_step=1), llm=make_llm(**SMALL), shards=shards)
    assert phase.fit()["steps"] == 1
    rest = Trainer(_config(tmp_path / "d", steps=4), llm=make_llm(**SMALL), shards=shards)
    assert rest.resume() and rest.fit()["steps"] == 4
    other = make_llm(**{**SMALL, "injection_layers": 1})
    with pytest.raises(Exception, match="injection_layers"):
        Trainer(_config(tmp_path / "c", init_adapter=str(tmp_path / "a" / "run" / "adapter")), llm=other, shards=shards)


def test_lr_schedule():
    assert lr_factor(0, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(9, warmup=10, total=100, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(10, warmup=10, total=100, min_ratio=0.1) == pytest.approx(1.0)
    assert lr_factor(100, warmup=10, total=100, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(55, warmup=10, total=100, min_ratio=0.0) == pytest.approx(0.5)


def test_recipes_parse_in_every_format(tmp_path):
    data = {"out_dir": "out", "data": "shards", "steps": 7, "window": 64, "tasks": {"lm": 0.5, "passkey": 0.5}, "sharedctx": {"chunk_size": 256}}
    (tmp_path / "r.json").write_text(json.dumps(data))
    (tmp_path / "r.toml").write_text('out_dir = "out"\ndata = "shards"\nsteps = 7\nwindow = 64\ntasks = { lm = 0.5, passkey = 0.5 }\n[sharedctx]\nchunk_size = 256\n')
    a, b = load_recipe(tmp_path / "r.json"), load_recipe(tmp_path / "r.toml")
    assert a == b and a.out_dir == str(tmp_path / "out") and a.steps == 7
    assert load_recipe(tmp_path / "r.toml", steps=9, out_dir=None).steps == 9
    try:
        import yaml
    except ImportError:
        with pytest.raises(ImportError, match="pyyaml"):
            (tmp_path / "r.yaml").write_text("steps: 7\n")
            load_recipe(tmp_path / "r.yaml")
    else:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(data))
        assert load_recipe(tmp_path / "r.yaml") == a
    (tmp_path / "bad.json").write_text(json.dumps({"stepz": 3}))
    with pytest.raises(ValueError, match="stepz"):
        load_recipe(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown tasks"):
        TrainConfig(tasks={"lm": 1, "sudoku": 1})


@pytest.mark.parametrize("name", ["smollm2-cpu.toml", "smollm2-cpu-retrieval.toml", "smollm2-cpu-retrieval-lexical.toml", "smollm2-gpu.toml", "smollm2-cpu-reading.toml"])
def test_shipped_recipes_parse(name):
    cfg = load_recipe(RECIPES / name)
    assert cfg.sharedctx["chunk_size"] == 1024 and "books/pride_and_prejudice.txt" in cfg.holdout
    assert cfg.device == ("cuda" if "gpu" in name else "cpu")


def test_recipe_sources_from_the_environment_or_the_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("SHAREDCTX_DATA", str(tmp_path / "corpus"))
    cfg = load_recipe(RECIPES / "smollm2-cpu-reading.toml")
    assert cfg.sources == [str(tmp_path / "corpus")] and cfg.tasks == {"reconstruction": 0.5, "lm": 0.3, "distill": 0.2}
    assert cfg.eval_every and cfg.eval_text in cfg.holdout and cfg.eval_control not in cfg.holdout
    monkeypatch.delenv("SHAREDCTX_DATA")
    assert load_recipe(RECIPES / "smollm2-cpu-reading.toml").sources == ["$SHAREDCTX_DATA"]  # named when needed
    assert load_recipe(RECIPES / "smollm2-cpu-reading.toml", sources=[str(tmp_path)]).sources == [str(tmp_path)]
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), data=str(tmp_path / "none"), sources=["$SHAREDCTX_DATA"], sharedctx=SMALL)
    with pytest.raises(FileNotFoundError, match="SHAREDCTX_DATA"):
        Trainer(cfg, llm=make_llm(**SMALL))


def test_cli_train_writes_an_adapter(tmp_path):
    from sharedctx.cli import main

    model_dir = tmp_path / "base"
    tiny_model().save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some training words here " * 60)
    (corpus / "b.txt").write_text("evaluation words " * 60)
    recipe = {"model": str(model_dir), "out_dir": "run", "data": "shards", "sources": ["corpus"], "holdout": ["b.txt"], "sharedctx": SMALL, "context_chunks": [1, 1], "window": 32, "steps": 2, "warmup": 1}
    (tmp_path / "r.json").write_text(json.dumps(recipe))
    assert main(["train", "--config", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file() and (tmp_path / "run" / "checkpoint" / "tensors.safetensors").is_file()
    # resuming a finished run does no more steps
    assert main(["train", "--config", str(tmp_path / "r.json"), "--no-progress"]) == 0
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 2
    assert main(["train", "--config", str(tmp_path / "r.json"), "--export", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "sharedctx_adapter.json").read_text())["trained"] is True


SHIPPED = Path(__file__).resolve().parents[1] / "sharedctx" / "adapters" / "smollm2-135m-instruct"


@pytest.mark.skipif(not (SHIPPED / "sharedctx_adapter.json").is_file(), reason="no adapter shipped")
def test_shipped_adapter_files_are_complete():
    files = {p.name: p for p in SHIPPED.iterdir()}
    assert {"adapter.safetensors", "sharedctx_adapter.json", "training_config.json", "training_summary.json", "README.md"} <= set(files)
    assert sum(p.stat().st_size for p in files.values()) < 20 * 2**20
    meta = json.loads(files["sharedctx_adapter.json"].read_text())
    train_cfg = json.loads(files["training_config.json"].read_text())
    assert meta["trained"] is True and meta["config"]["chunk_size"] == train_cfg["sharedctx"]["chunk_size"]
    assert any(name.startswith("eval_") and name.endswith(".json") for name in files)
    from safetensors.torch import load_file

    gates = [float(v) for k, v in load_file(str(files["adapter.safetensors"])).items() if k.endswith("gate")]
    assert len(gates) == meta["config"]["injection_layers"] and any(g != 0.0 for g in gates)


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED / "sharedctx_adapter.json").is_file(), reason="no adapter shipped")
def test_default_model_loads_the_shipped_adapter():
    from sharedctx import SharedLLM

    llm = SharedLLM.from_pretrained()
    assert llm.adapter_trained and llm.adapter_path == str(SHIPPED)


def test_trainable_sets_and_the_upper_lora(tmp_path, shards):
    llm = make_llm(**SMALL, upper_lora_rank=2)
    trainer = Trainer(_config(tmp_path, sharedctx={**SMALL, "upper_lora_rank": 2}, steps=3, warmup=0, lr=3e-2), llm=llm, shards=shards)
    lora_ids = {id(p) for p in llm.upper_lora.parameters()}
    assert lora_ids and lora_ids <= {id(p) for p in trainer.params}  # "injection": every adapter parameter
    before = {n: p.detach().clone() for n, p in llm.upper_lora.named_parameters()}
    base_before = {n: p.detach().clone() for n, p in llm.base.named_parameters() if "cross" not in n}
    for _ in range(3):
        trainer.train_step()
    assert any(not torch.equal(p, before[n]) for n, p in llm.upper_lora.named_parameters() if n.endswith("lora_b"))
    for n, p in llm.base.named_parameters():
        if "cross" not in n:
            assert torch.equal(p, base_before[n]), n  # hooks, not edits: the base model's weights never change
    gates_only = Trainer(_config(tmp_path / "g", trainable="gates"), llm=make_llm(**SMALL, upper_lora_rank=2), shards=shards)
    assert all(n.endswith("gate") for n, p in gates_only.llm.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="upper_lora_rank"):
        TrainConfig(trainable="injection+norm")


def test_trainable_from_trains_only_the_upper_blocks(tmp_path, shards):
    llm = make_llm(**SMALL)
    trainer = Trainer(_config(tmp_path, trainable_from=1, steps=4, warmup=0, lr=3e-2, gate_lr=1e-1), llm=llm, shards=shards)
    trained = {n for n, p in llm.adapter_named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("1.") for n in trained)
    before = {n: p.detach().clone() for n, p in llm.adapter_named_parameters()}
    for _ in range(4):
        trainer.train_step()
    after = dict(llm.adapter_named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in before if n.startswith("0."))  # layer 0 stays the identity
    assert float(after["0.gate"]) == 0.0
    assert any(not torch.equal(after[n], before[n]) for n in before if n.startswith("1."))
    for bad in (2, -1):
        with pytest.raises(ValueError, match="trainable_from"):
            _config(tmp_path, trainable_from=bad)


def test_shards_that_train_on_a_held_out_file_are_refused(tmp_path, shards):
    trained = shards.documents("train")[0]["name"]
    with pytest.raises(ValueError, match="holds out"):
        Trainer(_config(tmp_path, holdout=[trained]), llm=make_llm(**SMALL), shards=shards)
