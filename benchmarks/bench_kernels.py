"""Chunk-RoPE cross-attention: the Triton kernel vs SDPA with a separate rotation (and flash-attn if present).

One command (CUDA):

    python benchmarks/bench_kernels.py                 # 1..4096 query tokens x 2K..64K states, bf16
    python benchmarks/bench_kernels.py --backward      # forward + backward

writes ``benchmarks/results/bench_kernels.json`` (machine, versions, every timing in ms) and
``bench_kernels.png``. Shapes follow the default model (SmolLM2-135M: 9 query heads, 3 KV heads, head
dim 64) and the default tree (128 states per 1,024-token chunk, queries at chunk position ``n``).

Without CUDA there is nothing to measure: the script says so and exits; ``--quick`` instead runs a tiny
correctness check of the kernel in Triton's CPU interpreter (no timings are reported from it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--queries", default="1,16,128,1024,4096", help="comma-separated query lengths T")
    p.add_argument("--states", default="2048,8192,16384,32768,65536", help="comma-separated numbers of states S")
    p.add_argument("--heads", default="9,3", help="H,Hkv")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--states-per-chunk", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--quick", action="store_true", help="without CUDA: a tiny interpreter correctness check")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args()


def _import_sharedctx() -> None:
    try:
        import sharedctx  # noqa: F401
    except ImportError:  # running from a checkout without installing the core
        sys.path.insert(0, str(ROOT))


def quick_interpreter_check() -> int:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    _import_sharedctx()
    import torch

    from sharedctx.ops import chunk_cross_attention_reference
    from sharedctx_kernels import triton_chunk_cross_attention, triton_supports

    assert triton_supports(torch.device("cpu"), torch.float32), "the kernels were imported before TRITON_INTERPRET was set"
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, D = 2, 9, 3, 4, 96, 64
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    kw = dict(key_pos=(torch.arange(S) // 32).expand(B, S), query_pos=torch.full((B,), 3),
              inv_freq=1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)))
    err = (triton_chunk_cross_attention(q, k, v, **kw) - chunk_cross_attention_reference(q, k, v, **kw)).abs().max()
    print(f"interpreter sanity check (float32, B={B} H={H} Hkv={Hkv} T={T} S={S} D={D}): max |kernel - reference| = {err:.2e}")
    print("no timings: the interpreter says nothing about GPU speed")
    return 0 if err < 1e-5 else 1


def main() -> int:
    args = parse_args()
    import torch

    if not torch.cuda.is_available():
        if args.quick:
            return quick_interpreter_check()
        print("bench_kernels: no CUDA device here, nothing to measure (Triton kernels need a GPU). "
              "Run it on a GPU machine, or pass --quick for an interpreter correctness check.", file=sys.stderr)
        return 2
    _import_sharedctx()
    import triton
    from triton.testing import do_bench

    from sharedctx.ops import sdpa_chunk_cross_attention
    from sharedctx_kernels import triton_chunk_cross_attention
    from sharedctx_kernels.flash import flash_attn_available, flash_attn_chunk_cross_attention

    dtype = getattr(torch, args.dtype)
    H, Hkv = (int(x) for x in args.heads.split(","))
    D, per = args.head_dim, args.states_per_chunk
    impls = {"triton": triton_chunk_cross_attention, "sdpa+rotation": sdpa_chunk_cross_attention}
    if flash_attn_available() and dtype != torch.float32:
        impls["flash_attn+rotation"] = flash_attn_chunk_cross_attention
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, device="cuda").float() / D))
    rows = []
    for S in (int(s) for s in args.states.split(",")):
        for T in (int(t) for t in args.queries.split(",")):
            q = torch.randn(1, H, T, D, device="cuda", dtype=dtype, requires_grad=args.backward)
            k = torch.randn(1, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=args.backward)
            v = torch.randn(1, Hkv, S, D, device="cuda", dtype=dtype, requires_grad=args.backward)
            kw = dict(key_pos=(torch.arange(S, device="cuda") // per)[None], inv_freq=inv_freq,
                      query_pos=torch.full((1,), triton.cdiv(S, per), device="cuda"))
            row = {"T": T, "S": S}
            for name, fn in impls.items():
                if args.backward:
                    do = torch.randn_like(q)

                    def step(fn=fn):
                        fn(q, k, v, **kw).backward(do)
                else:
                    def step(fn=fn):
                        with torch.no_grad():
                            fn(q, k, v, **kw)
                try:
                    row[name] = do_bench(step, warmup=10, rep=50)
                except torch.OutOfMemoryError:
                    row[name] = None
                    torch.cuda.empty_cache()
            print(json.dumps(row))
            rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "python": platform.python_version(), "dtype": args.dtype, "H": H, "Hkv": Hkv, "D": D,
        "states_per_chunk": per, "pass": "forward+backward" if args.backward else "forward", "unit": "ms",
    }
    stem = "bench_kernels_bwd" if args.backward else "bench_kernels"
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    plot(rows, list(impls), meta, args.out / f"{stem}.png")
    return 0


def plot(rows, names, meta, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: wrote the JSON only, no {path.name}", file=sys.stderr)
        return
    queries = sorted({r["T"] for r in rows})
    fig, axes = plt.subplots(1, len(queries), figsize=(4 * len(queries), 3.5), squeeze=False)
    for ax, T in zip(axes[0], queries):
        sub = [r for r in rows if r["T"] == T]
        for name in names:
            pts = [(r["S"], r[name]) for r in sub if r.get(name) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f"T = {T}")
        ax.set_xlabel("injected states S")
    axes[0][0].set_ylabel("ms")
    axes[0][0].legend()
    fig.suptitle(f"chunk-RoPE cross-attention, {meta['pass']}, {meta['dtype']}, {meta['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
