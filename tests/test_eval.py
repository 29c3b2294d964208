"""Evaluation on tiny models: perplexity computes what it says (against a manual computation), passkey, CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import byte_tokenizer, make_llm, random_ids, tiny_model
from sharedctx.training.evaluate import eval_passkey, eval_ppl, window_starts
from sharedctx.injection import injection_disabled


def _manual_ppl(logits_fn, stretches, score_last):
    nll, n = 0.0, 0
    for ids in stretches:
        logits = logits_fn(ids)  # (T, V) for the scored model input
        logp = torch.log_softmax(logits.float(), -1)
        for t in range(ids.numel() - score_last, ids.numel()):
            nll -= float(logp[t - 1, ids[t]])
            n += 1
    return math.exp(nll / n)


def test_window_starts():
    assert window_starts(1000, 400, 4) == [0, 200, 400, 600]
    assert window_starts(400, 400, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="fewer than"):
        window_starts(100, 400, 2)


def test_eval_ppl_matches_manual_computation():
    llm = make_llm(gates=1.0)  # chunk_size 32
    tokens = random_ids(600, seed=1)
    control = random_ids(300, seed=2)
    total, window, score = 160, 64, 16
    r = eval_ppl(llm, tokens, total_length=total, window=window, score_last=score, n_windows=3, modes=("adapter", "control", "window", "full", "streaming"), control_tokens=control)
    starts = window_starts(600, total, 3)
    assert r["starts"] == starts and r["context_tokens"] == 96
    stretches = [tokens[s : s + total] for s in starts]
    llm.eval()
    with torch.no_grad():
        with injection_disabled():
            want_window = _manual_ppl(lambda ids: llm.base(input_ids=ids[None]).logits[0], [s[-window:] for s in stretches], score)
            want_full = _manual_ppl(lambda ids: llm.base(input_ids=ids[None]).logits[0], stretches, score)
            want_stream = _manual_ppl(lambda ids: llm.base(input_ids=ids[None]).logits[0], [torch.cat([s[:4], s[-window:]]) for s in stretches], score)
        it = iter(stretches)

        def adapter_logits(ids):
            s = next(it)
            return llm(ids[None], context=s[:96], query_length=window - score).logits[0]

        want_adapter = _manual_ppl(adapter_logits, [s[-window:] for s in stretches], score)
        cstarts = window_starts(300, 96, 3)
        cit = iter(cstarts)

        def control_logits(ids):
            c = next(cit)
            return llm(ids[None], context=control[c : c + 96], query_length=window - score).logits[0]

        want_control = _manual_ppl(control_logits, [s[-window:] for s in stretches], score)
    m = r["modes"]
    assert m["window"]["ppl"] == pytest.approx(want_window, rel=1e-4)
    assert m["full"]["ppl"] == pytest.approx(want_full, rel=1e-4)
    assert m["streaming"]["ppl"] == pytest.approx(want_stream, rel=1e-4)
    assert m["adapter"]["ppl"] == pytest.approx(want_adapter, rel=1e-4)
    assert m["control"]["ppl"] == pytest.approx(want_control, rel=1e-4)
    assert m["adapter"]["ppl"] != pytest.approx(m["window"]["ppl"], rel=1e-4)  # gates are open: the context counts
    assert r["adapter_vs_window_pct"] == pytest.approx(100 * (m["adapter"]["ppl"] / m["window"]["ppl"] - 1))
    assert m["adapter"]["tokens"] == 3 * score


def test_identity_adapter_equals_window_alone():
    llm = make_llm()  # gates at 0
    r = eval_ppl(llm, random_ids(400), total_length=160, window=64, score_last=16, n_windows=2, modes=("adapter", "window"))
    assert r["modes"]["adapter"]["ppl"] == pytest.approx(r["modes"]["window"]["ppl"], rel=1e-6)


def test_control_needs_a_text():
    with pytest.raises(ValueError, match="control"):
        eval_ppl(make_llm(), random_ids(400), total_length=160, window=64, score_last=16, modes=("control",))


def test_eval_passkey_structure():
    llm = make_llm(gates=1.0, chunk_size=64)
    r = eval_passkey(llm, lengths=[128], trials=2, modes=("adapter", "full"), max_new_tokens=3)
    for mode in ("adapter", "full"):
        v = r["modes"][mode]["128"]
        assert 0.0 <= v["accuracy"] <= 1.0 and len(v["trials"]) == 2 and set(v["by_depth"]) == {"0.00", "1.00"}
    r = eval_passkey(llm, lengths=[4096], trials=1, modes=("full",), max_new_tokens=2)
    assert "skipped" in r["modes"]["full"]["4096"]


@pytest.fixture
def model_dir(tmp_path):
    tiny_model().save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_cli_eval_ppl_and_passkey(model_dir, tmp_path, capsys):
    from sharedctx.cli import main

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    b.write_text("import os\nprint(os.getcwd())\n" * 16)
    common = ["--model", str(model_dir), "--injection-layers", "2", "--chunk-size", "32", "--json"]
    out = tmp_path / "ppl.json"
    assert main(["eval", "ppl", "--file", str(a), "--file", str(b), "--total-length", "160", "--window", "64", "--score-last", "16", "--windows", "2", "--control", "--out", str(out), *common]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(out.read_text())
    assert [r["file"] for r in payload["results"]] == [str(a), str(b)] and payload["results"][0]["control_file"] == str(b)
    assert set(payload["results"][0]["modes"]) == {"adapter", "control", "window"} and payload["machine"]["torch"]
    assert main(["eval", "passkey", "--length", "96", "--trials", "1", *common]) == 0
    assert json.loads(capsys.readouterr().out)["modes"]["adapter"]["96"]["accuracy"] in (0.0, 1.0)
    assert main(["eval", "ppl", "--file", str(a), "--total-length", "160", "--window", "64", "--score-last", "16", "--modes", "window,full", *common]) == 0
    assert set(json.loads(capsys.readouterr().out)["results"][0]["modes"]) == {"window", "full"}
    assert main(["eval", "ppl", "--file", str(a), "--total-length", "160", "--window", "64", "--score-last", "16", "--control", *common]) == 2
    assert "control" in capsys.readouterr().err


def test_cli_eval_reading(model_dir, tmp_path, capsys):
    from sharedctx.cli import main
    from sharedctx.training.reading import READING_KEYS

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("The quick brown fox jumps over the lazy dog. " * 10)
    b.write_text("A slow green turtle walks under the busy cat. " * 10)
    common = ["--model", str(model_dir), "--injection-layers", "2", "--chunk-size", "32", "--json"]
    out = tmp_path / "reading.json"
    args = ["eval", "reading", "--file", str(a), "--control-file", str(b), "--context-chunks", "2", "--window", "32", "--windows", "2", "--span", "4"]
    assert main([*args, "--out", str(out), *common]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(out.read_text()) and payload["task"] == "reading"
    r = payload["results"][0]
    assert set(READING_KEYS) <= set(r) and r["file"] == str(a) and r["control_file"] == str(b)
    assert r["reading_gain_pct"] == 0.0 and set(r["copy_gain_by_level_pct"]) == {"1", "2", "3"}  # identity adapter
    assert main(["eval", "reading", "--file", str(a), *common]) == 2
    assert "control" in capsys.readouterr().err
