"""The index benchmark's --quick mode runs end to end and writes consistent JSON + PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_index_quick():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_index.py"), "--quick", "--threads", "1", "--lazy"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads((ROOT / "benchmarks" / "results" / "index_quick.json").read_text())
    assert (ROOT / "benchmarks" / "results" / "index_quick.png").stat().st_size > 1000
    assert data["machine"]["torch_threads"] == 1 and [r["tokens"] for r in data["results"]] == [1024, 2048]
    for r in data["results"]:
        assert r["build_tokens_per_s"] > 0 and r["warm_injected_states"] > 0
        assert r["warm_retrieve_s"] <= r["warm_first_token_s"] <= r["warm_total_s"]
        assert r["cold_first_token_s"] > r["build_s"] and r["full_attention_prefill_s"] > 0
    batched = data["results"][0]["concurrent"]
    assert batched["queries"] == 4 and batched["same_answers"] is True
    assert batched["batched"]["largest_batch"] > 1 and batched["batched_speedup"] > 0
    assert "concurrent" not in data["results"][1]
    for r in data["results"]:  # the lazy text-mode index runs no lower-model pass to build or answer
        assert r["lazy_text"]["lower_passes"] == 0 and r["lazy_text"]["build_s"] > 0 and r["lazy_text"]["text_first_token_s"] > 0
