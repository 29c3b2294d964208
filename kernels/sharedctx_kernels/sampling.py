"""Fused node sampling: gather the kept states of equal-length nodes straight into their destination.

A preserved node of ``L`` tokens keeps ``keep`` of its lower-layer key/value states at the uniform
indices of `sharedctx.ops.sample_indices` (end-aligned ``floor((j+1) L / keep) - 1``, start-aligned
``floor(j L / keep)``, all ``L`` when ``keep >= L``). The Triton kernel computes those indices itself
(no index tensor), reads the source with any strides (e.g. a view of the lower model's cache) and writes
K and V in one launch into any destination view (e.g. a slice of the buffer of injected states), so
nothing is copied twice. `sample_kv_reference` is the pure-torch ``index_select`` it is tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sharedctx.ops import sample_indices

__all__ = ["sample_kv", "sample_kv_reference", "num_kept"]

_ALIGN = {"end": 0, "start": 1, "all": 2}


def num_kept(length: int, keep: int) -> int:
    """How many states a node of ``length`` states keeps."""
    return min(length, keep)


@triton.jit
def _gather_kernel(
    SK, SV, DK, DV,
    stride_skb, stride_skh, stride_skl, stride_skd,
    stride_svb, stride_svh, stride_svl, stride_svd,
    stride_dkb, stride_dkh, stride_dkj, stride_dkd,
    stride_dvb, stride_dvh, stride_dvj, stride_dvd,
    Hkv, L, KEEP, N_OUT, D,
    ALIGN: tl.constexpr, HAS_V: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_j = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // Hkv).to(tl.int64)
    h = (pid_bh % Hkv).to(tl.int64)
    j = (pid_j * BLOCK_J + tl.arange(0, BLOCK_J)).to(tl.int64)  # (BJ,) output rows
    j_ok = j < N_OUT
    if ALIGN == 0:
        idx = ((j + 1) * L) // KEEP - 1  # the state that ends stride window j
    elif ALIGN == 1:
        idx = (j * L) // KEEP
    else:
        idx = j
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        msk = j_ok[:, None] & (offs_d < D)[None, :]
        x = tl.load(SK + b * stride_skb + h * stride_skh + idx[:, None] * stride_skl + offs_d[None, :] * stride_skd,
                    mask=msk)
        tl.store(DK + b * stride_dkb + h * stride_dkh + j[:, None] * stride_dkj + offs_d[None, :] * stride_dkd,
                 x, mask=msk)
        if HAS_V:
            y = tl.load(SV + b * stride_svb + h * stride_svh + idx[:, None] * stride_svl
                        + offs_d[None, :] * stride_svd, mask=msk)
            tl.store(DV + b * stride_dvb + h * stride_dvh + j[:, None] * stride_dvj + offs_d[None, :] * stride_dvd,
                     y, mask=msk)


def _check(x: torch.Tensor, name: str, out: torch.Tensor | None, n: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be (B, Hkv, L, D), got {tuple(x.shape)}")
    if out is not None:
        want = (x.shape[0], x.shape[1], n, x.shape[3])
        if tuple(out.shape) != want or out.dtype != x.dtype or out.device != x.device:
            raise ValueError(f"out for {name} must be {want} {x.dtype} on {x.device}, got "
                             f"{tuple(out.shape)} {out.dtype} on {out.device}")


def _launch(k, v, keep, align, out_k, out_v):
    B, Hkv, L, D = k.shape
    n = num_kept(L, keep)
    mode = _ALIGN["all"] if keep >= L else _ALIGN[align]
    out_k = torch.empty(B, Hkv, n, D, dtype=k.dtype, device=k.device) if out_k is None else out_k
    if v is not None and out_v is None:
        out_v = torch.empty(B, Hkv, n, D, dtype=v.dtype, device=v.device)
    sv, dv = (v, out_v) if v is not None else (k, out_k)
    block_j = min(64, max(16, triton.next_power_of_2(n)))
    block_d = min(128, triton.next_power_of_2(D))
    if B * Hkv * n > 0:
        _gather_kernel[(triton.cdiv(n, block_j), B * Hkv)](
            k, sv, out_k, dv, *k.stride(), *sv.stride(), *out_k.stride(), *dv.stride(),
            Hkv, L, keep, n, D, ALIGN=mode, HAS_V=v is not None, BLOCK_J=block_j, BLOCK_D=block_d,
        )
    return out_k, out_v


class _SampleKV(torch.autograd.Function):
    """Gather forward; backward scatters the gradient to the kept rows (indices are distinct)."""

    @staticmethod
    def forward(ctx, k, v, keep, align):
        ctx.shape, ctx.keep, ctx.align = k.shape, keep, align
        return _launch(k, v, keep, align, None, None)

    @staticmethod
    def backward(ctx, gk, gv):
        B, Hkv, L, D = ctx.shape
        idx = torch.tensor(sample_indices(L, ctx.keep, ctx.align), device=gk.device)
        grads = []
        for g in (gk, gv):
            if g is None:
                grads.append(None)
                continue
            full = g.new_zeros(B, Hkv, L, D)
            full.index_copy_(2, idx, g)
            grads.append(full)
        return grads[0], grads[1], None, None


def sample_kv(
    k: torch.Tensor,
    v: torch.Tensor | None = None,
    *,
    keep: int,
    align: str = "end",
    out_k: torch.Tensor | None = None,
    out_v: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Keep ``min(L, keep)`` uniformly spaced states of each of ``B`` equal-length nodes, K and V in one launch.

    Args:
        k: ``(B, Hkv, L, D)`` keys of ``B`` nodes of ``L`` states each; any strides.
        v: ``(B, Hkv, L, D)`` values, or None to gather ``k`` alone.
        keep: states kept per node (``>= 1``); a node of ``L <= keep`` states keeps all of them.
        align: ``"end"`` (default) or ``"start"``, as `sharedctx.ops.sample_indices`.
        out_k, out_v: optional ``(B, Hkv, min(L, keep), D)`` destinations (any strides, e.g. a slice of the
            injected-state buffer) written in place; not differentiable.
    Returns:
        ``(k_kept, v_kept)``, each ``(B, Hkv, min(L, keep), D)`` (``v_kept`` None without ``v``).
        Differentiable in ``k`` and ``v`` when no ``out`` is given.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    if align not in ("end", "start"):
        raise ValueError(f"align must be 'end' or 'start', got {align!r}")
    n = num_kept(k.shape[2], keep) if k.dim() == 4 else 0
    _check(k, "k", out_k, n)
    if v is not None:
        _check(v, "v", out_v, n)
        if v.shape != k.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    elif out_v is not None:
        raise ValueError("out_v given without v")
    if k.shape[2] == 0:
        raise ValueError("a node has at least one state")
    wants_grad = torch.is_grad_enabled() and (k.requires_grad or (v is not None and v.requires_grad))
    if out_k is not None or out_v is not None:
        if wants_grad:
            raise ValueError("out_k/out_v write in place and are not differentiable; call without them under autograd")
        return _launch(k, v, keep, align, out_k, out_v)
    if wants_grad:
        return _SampleKV.apply(k, v, keep, align)
    return _launch(k, v, keep, align, None, None)


def sample_kv_reference(
    k: torch.Tensor, v: torch.Tensor | None = None, *, keep: int, align: str = "end"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pure torch: ``index_select`` of `sharedctx.ops.sample_indices` along the state dimension (same shapes)."""
    idx = torch.tensor(sample_indices(k.shape[2], keep, align), device=k.device)
    return k.index_select(2, idx), (v.index_select(2, idx) if v is not None else None)
