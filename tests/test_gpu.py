"""The core invariants on CUDA (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llm, random_ids

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_precomputed_equals_on_the_fly_and_decoding(dtype):
    llm = make_llm(gates=1.0).to("cuda", dtype)
    ctx = random_ids(300, seed=1)
    ids = random_ids(9, seed=2)[None].cuda()
    with torch.no_grad():
        a = llm.prepare_injection(llm.encode(ctx), ids)
        b = llm.prepare_injection(llm.encode(ctx, precompute=False), ids)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        for x, y in zip(a.keys, b.keys):
            torch.testing.assert_close(x, y, atol=tol, rtol=tol)
        text = llm.generate(ids[0].tolist(), context=ctx, max_new_tokens=5)
    assert isinstance(text, str)


def test_cuda_tree_from_cpu_serves_cuda_model():
    cpu = make_llm(gates=1.0)
    tree = cpu.encode(random_ids(120))
    gpu = make_llm(gates=1.0).cuda()
    with torch.no_grad():
        out = gpu(random_ids(5)[None], context=tree).logits
        ref = cpu(random_ids(5)[None], context=tree).logits
    torch.testing.assert_close(out.cpu(), ref, atol=1e-4, rtol=1e-4)
