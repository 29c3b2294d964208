"""benchmarks/bench_distributed.py runs end to end in --quick mode on the tiny random model and the texts the project
ships: both builds hold the same chunks, Ray's start-up is reported apart from its encode window, and the projection
is labelled as one and reproduces the measured build at the measured number of actors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench_distributed():
    sys.path.insert(0, str(BENCH))
    import bench_distributed

    yield bench_distributed
    sys.path.remove(str(BENCH))


def test_distributed_quick(bench_distributed, tmp_path):
    r = bench_distributed.main(["--quick", "--model", "tiny", "--tokens", "2048", "--out", str(tmp_path)])
    (single,), ray, proj = r["single"], r["ray"], r["projected"]
    assert r["same_chunk_keys"] and single["chunks"] == ray["chunks"] > 0 and single["tokens"] == ray["tokens"] == 2048
    assert r["data"]["root"] == "benchmarks/data" and r["data"]["files"] == 4 and single["documents"] == ray["documents"] == 4
    assert r["settings"] == {"actors": 2, "actor_threads": 1, "single_threads": [1], "batch_chunks": 4, "nproc": r["machine"]["cpu_count"]}
    # Ray's start-up, encode window and tail add up to its build; ray.init is reported apart
    assert ray["ray_init_s"] > 0 and ray["with_ray_init"]["build_s"] == pytest.approx(ray["build_s"] + ray["ray_init_s"], abs=2e-3)
    assert ray["startup_s"] + ray["encode_window_s"] + ray["tail_s"] == pytest.approx(ray["build_s"], abs=3e-3)
    assert 0 < ray["actors_start_loading_after_s"] <= ray["actors_loaded_after_s"] and ray["actors_start_loading_after_s"] < ray["startup_s"]
    # with this little work, the actor ready first may encode every batch before the other has loaded the model
    assert 1 <= len(ray["per_actor"]) <= 2 and sum(a["chunks"] for a in ray["per_actor"]) == ray["chunks"]
    assert all(a["model_load_s"] > 0 for a in ray["per_actor"])
    assert sum(a["batches"] for a in ray["per_actor"]) >= ray["chunks"] / 4
    # the projection says it is one, and at the measured number of actors gives the measured build time
    assert proj["projection"] is True and "T(N) = S + C / (N * r)" in proj["formula"] and "no GPU" in proj["caveat"]
    assert [row["actors"] for row in proj["rows"]] == [1, 2, 4, 8]
    assert proj["rows"][1]["build_s"] == pytest.approx(ray["build_s"], rel=1e-3)
    assert all(a["build_s"] >= b["build_s"] > proj["S_serial_s"] for a, b in zip(proj["rows"], proj["rows"][1:]))
    written = json.loads((tmp_path / "distributed_quick.json").read_text())
    assert written["command"] == f"bench_distributed.py --quick --model tiny --tokens 2048 --out {tmp_path}"
    assert set(r["ray_over_single_throughput"]) == {"1"}
    assert (tmp_path / "distributed_quick.png").is_file()
    rows = bench_distributed.table(written).splitlines()
    assert rows[0].startswith(f"`python benchmarks/{written['command']}`") and "nproc" in rows[0]
    assert sum("*projected*" in row for row in rows) == 4
