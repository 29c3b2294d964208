"""Reference ops: sampling, splitting, chunk RoPE, cross-attention backends and the dispatcher."""

from __future__ import annotations

import math

import pytest
import torch

from sharedctx.ops import (
    BackendUnavailableError,
    apply_rope,
    chunk_cross_attention_reference,
    eager_chunk_cross_attention,
    resolve_backend,
    rope_cos_sin,
    rotate_inputs,
    sample_indices,
    sdpa_chunk_cross_attention,
    split_point,
)


def test_sample_indices_end_and_start_aligned():
    assert sample_indices(512, 32, "end") == [16 * (j + 1) - 1 for j in range(32)]
    assert sample_indices(512, 32, "start") == [16 * j for j in range(32)]
    # uneven strides follow floor((j+1) l / k) - 1 and floor(j l / k)
    assert sample_indices(10, 4, "end") == [1, 4, 6, 9]
    assert sample_indices(10, 4, "start") == [0, 2, 5, 7]
    assert sample_indices(5, 32) == [0, 1, 2, 3, 4]  # keep >= length keeps all
    with pytest.raises(ValueError):
        sample_indices(8, 4, "middle")


def test_split_point_without_and_with_noise():
    assert split_point(1024) == 512 and split_point(7) == 3 and split_point(2) == 1
    g = torch.Generator().manual_seed(0)
    points = [split_point(1000, 0.2, g) for _ in range(400)]
    assert all(1 <= b <= 999 for b in points)
    assert abs(sum(points) / len(points) - 500) < 30 and len(set(points)) > 50
    assert abs(torch.tensor(points, dtype=torch.float).std().item() - 200) < 40


def test_chunk_rope_composes_with_within_node_rope():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 16, 2).float() / 16))
    x = torch.randn(3, 16)
    c1, s1 = rope_cos_sin(torch.tensor([5, 5, 5]), inv_freq)
    c2, s2 = rope_cos_sin(torch.tensor([2, 2, 2]), inv_freq)
    c3, s3 = rope_cos_sin(torch.tensor([7, 7, 7]), inv_freq)
    torch.testing.assert_close(apply_rope(apply_rope(x, c1, s1), c2, s2), apply_rope(x, c3, s3), atol=1e-5, rtol=1e-5)


def test_rotate_inputs_positions():
    inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 1, 4, 8)
    key_pos = torch.tensor([[0, 1, 1, 2]])
    q2, k2 = rotate_inputs(q, k, key_pos, torch.tensor([3]), inv_freq)
    c, s = rope_cos_sin(torch.tensor(3), inv_freq)
    torch.testing.assert_close(q2, apply_rope(q, c, s))
    for j, p in enumerate(key_pos[0].tolist()):
        c, s = rope_cos_sin(torch.tensor(p), inv_freq)
        torch.testing.assert_close(k2[0, 0, j], apply_rope(k[0, 0, j], c, s))
    assert torch.equal(k2[0, 0, 0], k[0, 0, 0])  # chunk 0 is not rotated
    q3, k3 = rotate_inputs(q, k, None, None, inv_freq)
    assert q3 is q and k3 is k


def _inputs(dtype, b=2, h=6, hkv=2, t=5, s=11, d=16, ragged=True):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h, t, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, s, d, generator=g).to(dtype)
    key_pos = torch.randint(0, 4, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.bool)
    if ragged:
        mask[1, 7:] = False
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    return q, k, v, dict(key_pos=key_pos, query_pos=torch.tensor([4, 3]), inv_freq=inv_freq, key_mask=mask)


@pytest.mark.parametrize("fn", [eager_chunk_cross_attention, sdpa_chunk_cross_attention])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_fp32_reference(fn, dtype):
    q, k, v, kw = _inputs(dtype)
    ref = chunk_cross_attention_reference(q.float(), k.float(), v.float(), **kw)
    got = fn(q, k, v, **kw).float()
    # tolerance: what torch itself gets wrong in this dtype (round-trip of the reference output), times a margin
    err_dtype = (ref.to(dtype).float() - ref).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else max(20 * err_dtype, 2e-2)
    assert (got - ref).abs().max().item() <= tol


def test_reference_equals_explicit_softmax_and_masks_states():
    q, k, v, kw = _inputs(torch.float32)
    out = chunk_cross_attention_reference(q, k, v, **kw)
    # row 1 ignores masked states: changing them changes nothing
    v2 = v.clone()
    v2[1, :, 7:] += 100
    torch.testing.assert_close(chunk_cross_attention_reference(q, k, v2, **kw), out)
    # a row with no real state gets zeros
    kw["key_mask"] = kw["key_mask"].clone()
    kw["key_mask"][0] = False
    assert torch.count_nonzero(chunk_cross_attention_reference(q, k, v, **kw)[0]) == 0
    assert torch.count_nonzero(sdpa_chunk_cross_attention(q, k, v, **kw)[0]) == 0


def test_dispatcher_picks_and_refuses():
    cpu = torch.device("cpu")
    assert resolve_backend("auto", cpu, torch.float32).name in ("triton", "flash_attn", "sdpa", "eager")
    assert resolve_backend("eager", cpu, torch.float32).name == "eager"
    with pytest.raises(BackendUnavailableError, match="not installed"):
        resolve_backend("no-such-backend", cpu, torch.float32)
