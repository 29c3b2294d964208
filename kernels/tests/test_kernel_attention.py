"""The Triton chunk-RoPE cross-attention against float64 ground truth, with torch's own error as the yardstick.

Tolerance (flash-attention's rule, made explicit): for every output and gradient,

    max |kernel - truth|  <=  C * max |torch_in_dtype - truth|  +  eps(dtype) * max |truth|

``truth`` is the reference computed in float64 from the model's float32 cos/sin (the positions' RoPE is
defined in float32, as the model computes it). ``torch_in_dtype`` is what PyTorch itself computes in the
same dtype: `chunk_cross_attention_reference` for float32 and `sdpa_chunk_cross_attention` (rotation in
float32, attention in the dtype) for float16/bfloat16. ``C`` = 2 for the forward (as flash-attention) and
3 for gradients (the backward chains three rounded products); the last term is one unit of rounding at
the output's scale, so an exact baseline cannot demand more than the dtype can represent.
"""

from __future__ import annotations

import pytest
import torch

from sharedctx.ops import chunk_cross_attention_reference, rope_cos_sin, rotate_half, sdpa_chunk_cross_attention
from sharedctx_kernels.attention import INTERPRET, triton_chunk_cross_attention

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEADS = [(4, 1), (6, 3), (2, 2)]  # (H, Hkv)
DIMS = [32, 64]
# (T query tokens, chunks, states per chunk, layout)
CASES = [
    (1, 4, 8, "full"),  # one decoding step
    (7, 3, 5, "ragged"),  # batch rows with different numbers of chunks, attention_scaling != 1
    (64, 2, 16, "random"),  # arbitrary key mask
    (16, 5, 3, "nopos"),  # positions="none": no chunk rotation
    (33, 1, 32, "empty"),  # a batch row without any real state
    (5, 6, 4, "far"),  # large chunk positions (trigonometry away from 0)
]
FWD_C, BWD_C = 2.0, 3.0


def make_inputs(B, H, Hkv, T, chunks, per, D, layout, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    S = chunks * per
    # q is a (B, T, H, D) projection viewed as (B, H, T, D): the kernel reads strides, not copies
    q = torch.randn(B, T, H, D, generator=g).to(device=device, dtype=dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(device=device, dtype=dtype)
    key_pos = torch.arange(chunks).repeat_interleave(per).expand(B, S).clone()
    query_pos = torch.full((B,), chunks)
    key_mask = None
    scaling = 1.0
    if layout == "ragged":
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1, (chunks - 1) * per:] = False
        key_pos[1, (chunks - 1) * per:] = 0
        query_pos[1] = chunks - 1
        scaling = 1.25
    elif layout == "random":
        key_mask = torch.rand(B, S, generator=g) < 0.6
        key_mask[:, 0] = True
    elif layout == "empty":
        key_mask = torch.ones(B, S, dtype=torch.bool)
        key_mask[1] = False
    elif layout == "far":
        key_pos += 1000
        query_pos += 1000
    if layout == "nopos":
        key_pos = query_pos = None
    else:
        key_pos, query_pos = key_pos.to(device), query_pos.to(device)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device=device) / D))
    kw = dict(key_pos=key_pos, query_pos=query_pos, inv_freq=inv_freq, attention_scaling=scaling,
              key_mask=None if key_mask is None else key_mask.to(device))
    return q, k, v, kw


def truth64(q, k, v, *, key_pos, query_pos, inv_freq, attention_scaling=1.0, key_mask=None, scaling=None):
    """The reference in float64 (differentiable), from the model's float32 cos/sin."""
    q, k, v = q.double(), k.double(), v.double()
    if key_pos is not None:
        kc, ks = (x.double()[:, None] for x in rope_cos_sin(key_pos, inv_freq, attention_scaling))
        qc, qs = (x.double()[:, None, None] for x in rope_cos_sin(query_pos, inv_freq, attention_scaling))
        k = k * kc + rotate_half(k) * ks
        q = q * qc + rotate_half(q) * qs
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = q @ k.transpose(-1, -2) * scale  # (B, H, T, S)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        empty = ~key_mask.any(-1)
        scores = scores.masked_fill(empty[:, None, None, None], 0.0)
    out = torch.softmax(scores, -1) @ v
    if key_mask is not None:
        out = out.masked_fill(empty[:, None, None, None], 0.0)
    return out


def torch_in_dtype(q, k, v, **kw):
    if q.dtype == torch.float32:
        return chunk_cross_attention_reference(q, k, v, **kw)
    return sdpa_chunk_cross_attention(q, k, v, **kw)


def assert_within(name, got, truth, baseline, c, dtype):
    err = (got.double() - truth).abs().max().item()
    base = (baseline.double() - truth).abs().max().item()
    ulp = torch.finfo(dtype).eps * truth.abs().max().item()
    assert err <= c * base + ulp, f"{name}: kernel error {err:.3g} > {c} x torch's {base:.3g} + {ulp:.3g}"


def check_forward(q, k, v, kw, dtype, num_splits=None):
    out = triton_chunk_cross_attention(q, k, v, num_splits=num_splits, **kw)
    assert out.shape == q.shape and out.dtype == dtype
    truth = truth64(q, k, v, **kw)
    assert_within("out", out, truth, torch_in_dtype(q, k, v, **kw), FWD_C, dtype)
    if kw["key_mask"] is not None:
        empty = ~kw["key_mask"].any(-1)
        assert (out[empty] == 0).all()


def check_backward(q, k, v, kw, dtype):
    q0 = q.transpose(1, 2).detach().requires_grad_()  # the (B, T, H, D) leaf
    k, v = k.detach().requires_grad_(), v.detach().requires_grad_()
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=q.device)
    leaves = (q0, k, v)

    def grads(fn, cast):
        ins = [x.detach().to(cast).requires_grad_() for x in leaves]
        out = fn(ins[0].transpose(1, 2), ins[1], ins[2], **kw)
        return torch.autograd.grad(out, ins, g.to(out.dtype))

    got = grads(triton_chunk_cross_attention, dtype)
    truth = grads(truth64, torch.float64)
    base = grads(torch_in_dtype, dtype)
    for name, a, t, b in zip(("dq", "dk", "dv"), got, truth, base):
        assert a.dtype == dtype
        assert_within(name, a, t, b, BWD_C, dtype)


@pytest.mark.parametrize("T,chunks,per,layout", CASES)
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_matches_reference(dtype, H, Hkv, D, T, chunks, per, layout, device):
    q, k, v, kw = make_inputs(2, H, Hkv, T, chunks, per, D, layout, dtype, device)
    check_forward(q, k, v, kw, dtype)


@pytest.mark.parametrize("T,chunks,per,layout", [CASES[1], CASES[2], CASES[4]])
@pytest.mark.parametrize("D", DIMS)
@pytest.mark.parametrize("H,Hkv", HEADS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(dtype, H, Hkv, D, T, chunks, per, layout, device):
    q, k, v, kw = make_inputs(2, H, Hkv, T, chunks, per, D, layout, dtype, device, seed=2)
    check_backward(q, k, v, kw, dtype)


@pytest.mark.parametrize("layout", ["full", "nopos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_without_mask(dtype, layout, device):
    q, k, v, kw = make_inputs(1, 6, 3, 9, 3, 7, 32, layout, dtype, device, seed=3)
    check_backward(q, k, v, kw, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_split_keys_merge_by_logsumexp(dtype, device):
    """Decoding path: keys split over programs; one split fully masked, one batch row empty."""
    q, k, v, kw = make_inputs(3, 6, 3, 1, 10, 20, 32, "full", dtype, device, seed=4)
    mask = torch.ones(3, 200, dtype=torch.bool, device=device)
    mask[0, 64:192] = False
    mask[2] = False
    kw["key_mask"] = mask
    for splits in (2, 3):
        check_forward(q, k, v, kw, dtype, num_splits=splits)


def test_head_dim_not_a_power_of_two(device):
    """D = 48: each half (24) is padded to a 32-wide tile and masked."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, kw = make_inputs(2, 4, 2, 6, 3, 5, 48, "ragged", dtype, device, seed=5)
        check_forward(q, k, v, kw, dtype)
        check_backward(q, k, v, kw, dtype)


def test_explicit_scaling_and_no_states(device):
    q, k, v, kw = make_inputs(2, 4, 2, 3, 2, 4, 32, "full", torch.float32, device)
    kw["scaling"] = 0.3
    check_forward(q, k, v, kw, torch.float32)
    empty = triton_chunk_cross_attention(q, k[:, :, :0], v[:, :, :0], **{**kw, "key_pos": kw["key_pos"][:, :0]})
    assert empty.shape == q.shape and (empty == 0).all()


def test_bad_inputs_raise_with_a_fix(device):
    q, k, v, kw = make_inputs(2, 6, 4, 3, 2, 4, 32, "full", torch.float32, device)
    with pytest.raises(ValueError, match="H % Hkv"):
        triton_chunk_cross_attention(q, k, v, **kw)
    q, k, v, kw = make_inputs(2, 4, 2, 3, 2, 4, 32, "full", torch.float32, device)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_chunk_cross_attention(q, k.half(), v, **kw)
    with pytest.raises(ValueError, match="query_pos is required"):
        triton_chunk_cross_attention(q, k, v, **{**kw, "query_pos": None})


# ---- full sizes, compiled kernels (CUDA only) -----------------------------------------------------------

GPU_SIZES = [  # (B, H, Hkv, T, chunks, states per chunk, D)
    (1, 9, 3, 1, 64, 128, 64),  # decoding over 8K states: the split path
    (2, 32, 8, 64, 32, 128, 128),
    (2, 9, 3, 512, 128, 128, 64),  # 16K states
    (1, 8, 8, 2048, 32, 64, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("size", GPU_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layout", ["full", "ragged", "nopos"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_full_size(dtype, layout, size, device):
    B, H, Hkv, T, chunks, per, D = size
    B = max(B, 2) if layout == "ragged" else B
    q, k, v, kw = make_inputs(B, H, Hkv, T, chunks, per, D, layout, dtype, device)
    check_forward(q, k, v, kw, dtype)
    if T <= 512:
        check_backward(q, k, v, kw, dtype)


@pytest.mark.gpu
def test_gpu_kernels_are_compiled():
    assert not INTERPRET
