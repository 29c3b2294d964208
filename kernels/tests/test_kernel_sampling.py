"""The fused node-sampling gather equals ``index_select`` of `sharedctx.ops.sample_indices`, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sharedctx.ops import sample_indices
from sharedctx_kernels.sampling import sample_kv, sample_kv_reference

LENGTHS_KEEPS = [(1, 4), (5, 4), (32, 32), (33, 32), (100, 7), (128, 32), (512, 32), (20, 200)]


def nodes(B, Hkv, L, D, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # K/V as a cache holds them, (B, L, Hkv, D), viewed as (B, Hkv, L, D): a strided source
    k = torch.randn(B, L, Hkv, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    v = torch.randn(B, L, Hkv, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    return k, v


@pytest.mark.parametrize("align", ["end", "start"])
@pytest.mark.parametrize("L,keep", LENGTHS_KEEPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gather_equals_index_select(dtype, L, keep, align, device):
    k, v = nodes(3, 2, L, 32, dtype, device)
    got_k, got_v = sample_kv(k, v, keep=keep, align=align)
    ref_k, ref_v = sample_kv_reference(k, v, keep=keep, align=align)
    assert got_k.shape == (3, 2, min(L, keep), 32)
    assert torch.equal(got_k, ref_k) and torch.equal(got_v, ref_v)
    idx = sample_indices(L, keep, align)
    assert torch.equal(got_k, k[:, :, idx])


def test_reference_keeps_the_end_of_each_window(device):
    k = torch.arange(16.0, device=device).view(1, 1, 16, 1)
    assert sample_kv_reference(k, keep=4)[0].flatten().tolist() == [3.0, 7.0, 11.0, 15.0]
    assert sample_kv_reference(k, keep=4, align="start")[0].flatten().tolist() == [0.0, 4.0, 8.0, 12.0]
    assert torch.equal(sample_kv(k, keep=4)[0], sample_kv_reference(k, keep=4)[0])


def test_writes_into_a_slice_of_the_injected_buffer(device):
    """Two node sizes sampled straight into their places in one (B, Hkv, S, D) buffer, no temporaries."""
    big_k, big_v = nodes(2, 3, 64, 32, torch.float16, device, seed=1)
    small_k, small_v = nodes(2, 3, 16, 32, torch.float16, device, seed=2)
    buf_k = torch.zeros(2, 3, 12, 32, dtype=torch.float16, device=device)
    buf_v = torch.zeros_like(buf_k)
    sample_kv(big_k, big_v, keep=8, out_k=buf_k[:, :, :8], out_v=buf_v[:, :, :8])
    sample_kv(small_k, small_v, keep=4, out_k=buf_k[:, :, 8:], out_v=buf_v[:, :, 8:])
    want_k = torch.cat([sample_kv_reference(big_k, keep=8)[0], sample_kv_reference(small_k, keep=4)[0]], 2)
    want_v = torch.cat([sample_kv_reference(big_v, keep=8)[0], sample_kv_reference(small_v, keep=4)[0]], 2)
    assert torch.equal(buf_k, want_k) and torch.equal(buf_v, want_v)


def test_gradient_scatters_to_kept_rows(device):
    k, v = nodes(2, 2, 40, 16, torch.float32, device)
    k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
    gk, gv = torch.randn(2, 2, 8, 16, device=device), torch.randn(2, 2, 8, 16, device=device)
    out_k, out_v = sample_kv(k, v, keep=8)
    torch.autograd.backward((out_k, out_v), (gk, gv))
    k2, v2 = k.detach().requires_grad_(), v.detach().requires_grad_()
    ref_k, ref_v = sample_kv_reference(k2, v2, keep=8)
    torch.autograd.backward((ref_k, ref_v), (gk, gv))
    assert torch.equal(k.grad, k2.grad) and torch.equal(v.grad, v2.grad)


def test_bad_arguments_raise(device):
    k, v = nodes(1, 1, 8, 16, torch.float32, device)
    with pytest.raises(ValueError, match="keep"):
        sample_kv(k, v, keep=0)
    with pytest.raises(ValueError, match="align"):
        sample_kv(k, v, keep=2, align="middle")
    with pytest.raises(ValueError, match="out for k"):
        sample_kv(k, v, keep=2, out_k=torch.empty(1, 1, 3, 16, device=device))
    with pytest.raises(ValueError, match="not differentiable"):
        sample_kv(k.requires_grad_(), keep=2, out_k=torch.empty(1, 1, 2, 16, device=device))


@pytest.mark.gpu
@pytest.mark.parametrize("L,keep", [(512, 32), (1024, 32), (128, 32), (4096, 256)])
def test_gpu_gather_full_size(L, keep, device):
    k, v = nodes(64, 8, L, 128, torch.bfloat16, device)
    got = sample_kv(k, v, keep=keep)
    ref = sample_kv_reference(k, v, keep=keep)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
