"""Registration through the ``sharedctx.attention_backends`` entry point and the dispatcher."""

from __future__ import annotations

from importlib import metadata

import pytest
import torch

import sharedctx_kernels
from sharedctx.ops import resolve_backend
from sharedctx.ops.dispatch import BackendUnavailableError


def test_register_adds_triton_backend():
    seen = {}
    sharedctx_kernels.register(lambda backend: seen.__setitem__(backend.name, backend))
    assert "triton" in seen
    assert seen["triton"].supports(torch.device("cpu"), torch.int64) is False
    if not torch.cuda.is_available():
        assert "flash_attn" not in seen  # registered only where flash_attn imports and CUDA is present


def test_entry_points_are_installed():
    eps = {e.name: e.value for e in metadata.entry_points(group="sharedctx.attention_backends")}
    if not eps:
        pytest.skip("sharedctx-kernels is not pip-installed (entry points come from its metadata)")
    assert eps["triton"] == "sharedctx_kernels:register"
    assert eps["flash_attn"] == "sharedctx_kernels:register_flash_attn"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter path")
def test_dispatcher_resolves_triton_in_the_interpreter():
    if not metadata.entry_points(group="sharedctx.attention_backends"):
        pytest.skip("sharedctx-kernels is not pip-installed")
    backend = resolve_backend("triton", torch.device("cpu"), torch.float32)
    assert backend.name == "triton"
    q = torch.randn(1, 2, 3, 32)
    k = v = torch.randn(1, 1, 8, 32)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 32, 2).float() / 32))
    out = backend.fn(q, k, v, key_pos=torch.zeros(1, 8, dtype=torch.long), query_pos=torch.ones(1, dtype=torch.long),
                     inv_freq=inv_freq)
    assert out.shape == q.shape
    with pytest.raises(BackendUnavailableError):
        resolve_backend("triton", torch.device("cpu"), torch.float64)


@pytest.mark.gpu
def test_dispatcher_prefers_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda"), torch.bfloat16).name == "triton"


@pytest.mark.gpu
def test_flash_attn_backend_matches_reference():
    from sharedctx.ops import chunk_cross_attention_reference, sdpa_chunk_cross_attention
    from sharedctx_kernels.flash import flash_attn_available, flash_attn_chunk_cross_attention

    if not flash_attn_available():
        pytest.skip("flash_attn is not installed")
    g = torch.Generator().manual_seed(0)
    B, H, Hkv, T, S, D = 3, 8, 2, 33, 512, 64
    q, k, v = (torch.randn(*s, generator=g).cuda().bfloat16() for s in ((B, H, T, D), (B, Hkv, S, D), (B, Hkv, S, D)))
    mask = torch.ones(B, S, dtype=torch.bool)
    mask[1, 300:] = False
    mask[2] = False
    kw = dict(key_pos=(torch.arange(S) // 128).expand(B, S).cuda(), query_pos=torch.full((B,), 4).cuda(),
              inv_freq=1.0 / (10000.0 ** (torch.arange(0, D, 2).float().cuda() / D)), key_mask=mask.cuda())
    ref = chunk_cross_attention_reference(q, k, v, **kw).float()
    got = flash_attn_chunk_cross_attention(q, k, v, **kw).float()
    base = sdpa_chunk_cross_attention(q, k, v, **kw).float()
    tol = 2 * (base - ref).abs().max() + torch.finfo(torch.bfloat16).eps * ref.abs().max()
    assert (got - ref).abs().max() <= tol
    assert (got[2] == 0).all()
