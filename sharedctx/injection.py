"""Cross-attention blocks attached to the bottom M layers of the base model (adapter-style, no fork).

Each wrapped layer computes, for its slot ``i``::

    h = h + self_attn(input_layernorm(h))
    h = h + gate * o_proj(attn(rope(q_proj(norm(h)), n), K_i, V_i))      # only while states are injected
    h = h + mlp(post_attention_layernorm(h))

where ``K_i, V_i`` are the states lower layer ``i`` produced for the context. ``gate`` starts at 0, so the
wrapped model equals the base model exactly until trained. Injected states reach the layers through a
context variable, so concurrent threads each see their own.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import torch
from torch import nn

from .ops.dispatch import resolve_backend

if TYPE_CHECKING:
    from .policy import SelectedNode

__all__ = [
    "Injection",
    "CrossAttention",
    "LowRankDelta",
    "InjectedDecoderLayer",
    "UpperLoRA",
    "attach",
    "attach_upper_lora",
    "detach",
    "injecting",
    "injection_disabled",
]


@dataclass
class Injection:
    """States injected into the upper model, fixed for a whole forward or generation.

    Attributes:
        keys, values: per layer slot, ``(B, Hkv, S, D)``.
        key_pos: ``(B, S)`` chunk position of each state, or None for ``positions="none"``.
        query_pos: ``(B,)`` query chunk position ``n`` (the number of injected chunks).
        key_mask: ``(B, S)`` bool, True where a state is real; None when no row is padded.
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    key_pos: torch.Tensor | None
    query_pos: torch.Tensor
    key_mask: torch.Tensor | None = None
    #: per batch row, the provenance of the injected nodes (document order)
    nodes: list | None = None

    @property
    def n_states(self) -> int:
        return int(self.keys[0].shape[2]) if self.keys else 0

    @functools.cached_property
    def rows_with_states(self) -> torch.Tensor | None:
        """``(B,)`` bool, True for rows that read at least one state; None when every row does (no mask).

        Computed once per injection, which stays fixed for a whole forward or generation."""
        return None if self.key_mask is None else self.key_mask.any(-1)

    @classmethod
    def from_nodes(
        cls,
        rows: Sequence[Sequence[SelectedNode]],
        *,
        device: torch.device,
        dtype: torch.dtype,
        chunk_positions: bool = True,
    ) -> Injection:
        """The injected states of selected nodes: one row of nodes per batch row (an empty row reads nothing).

        A row's nodes are ordered by ``(chunk, start)``; chunk positions follow the order of ``node.chunk``, so
        number chunks in document order. Rows with fewer states are padded and masked (``key_mask``). Each row's
        `InjectedNode` provenance is kept in ``nodes``. ``chunk_positions=False`` is the ``positions="none"``
        ablation.
        """
        from .tree import InjectedNode

        if not rows or all(not r for r in rows):
            raise ValueError("nothing to inject: every row is empty")
        per_row_k, per_row_v, per_row_pos, provenance = [], [], [], []
        for selected in rows:
            order = sorted(selected, key=lambda node: (node.chunk, node.start))
            chunk_rank = {c: r for r, c in enumerate(sorted({node.chunk for node in order}))}
            ks, vs, pos, prov = [], [], [], []
            offset = 0
            for node in order:
                st = node.states
                n = st.n_states
                ks.append(st.keys)
                vs.append(st.values)
                pos.append(torch.full((n,), chunk_rank[node.chunk], dtype=torch.long))
                prov.append(InjectedNode(node.chunk, node.level, node.index, node.start, node.end, n, offset))
                offset += n
            if ks:
                per_row_k.append(torch.cat(ks, dim=2).to(device=device, dtype=dtype))  # (M, Hkv, S, D)
                per_row_v.append(torch.cat(vs, dim=2).to(device=device, dtype=dtype))
                per_row_pos.append(torch.cat(pos))
            else:
                per_row_k.append(None)
                per_row_v.append(None)
                per_row_pos.append(torch.zeros(0, dtype=torch.long))
            provenance.append(prov)
        ref = next(k for k in per_row_k if k is not None)
        m, hkv, _, d = ref.shape
        s_max = max(p.numel() for p in per_row_pos)
        batch = len(rows)
        keys = torch.zeros(batch, m, hkv, s_max, d, device=device, dtype=dtype)
        values = torch.zeros_like(keys)
        key_pos = torch.zeros(batch, s_max, dtype=torch.long, device=device)
        mask = torch.zeros(batch, s_max, dtype=torch.bool, device=device)
        n_chunks = torch.zeros(batch, dtype=torch.long, device=device)
        for b in range(batch):
            s = per_row_pos[b].numel()
            if s:
                keys[b, :, :, :s] = per_row_k[b]
                values[b, :, :, :s] = per_row_v[b]
                key_pos[b, :s] = per_row_pos[b].to(device)
                mask[b, :s] = True
                n_chunks[b] = int(per_row_pos[b].max()) + 1
        return cls(
            keys=[keys[:, i] for i in range(m)],
            values=[values[:, i] for i in range(m)],
            key_pos=key_pos if chunk_positions else None,
            query_pos=n_chunks,
            key_mask=None if bool(mask.all()) else mask,
            nodes=provenance,
        )

    def expand(self, batch: int) -> Injection:
        """The same states for ``batch`` rows (from one row)."""
        if self.keys[0].shape[0] == batch:
            return self
        if self.keys[0].shape[0] != 1:
            raise ValueError(f"injected states for {self.keys[0].shape[0]} rows cannot serve a batch of {batch}")

        def ex(t):
            return None if t is None else t.expand(batch, *t.shape[1:])

        return Injection([ex(k) for k in self.keys], [ex(v) for v in self.values], ex(self.key_pos), ex(self.query_pos), ex(self.key_mask))


    @staticmethod
    def stack(rows: Sequence[Injection | None]) -> Injection | None:
        """One injection for a batch from one-row injections (None: that row reads nothing).

        Rows with fewer states are padded and masked; a row with no states gets an all-False mask, which the
        attention ops turn into a zero output, so it reads exactly as without injection. None when every row
        is None.
        """
        real = [r for r in rows if r is not None]
        if not real:
            return None
        for r in real:
            if r.keys[0].shape[0] != 1:
                raise ValueError(f"Injection.stack takes one-row injections, got one with {r.keys[0].shape[0]} rows")
        if len({r.key_pos is None for r in real}) > 1:
            raise ValueError("cannot stack injections built with and without chunk positions")
        ref = real[0]
        m = len(ref.keys)
        if any(len(r.keys) != m or r.keys[0].shape[1] != ref.keys[0].shape[1] or r.keys[0].shape[3] != ref.keys[0].shape[3] for r in real):
            raise ValueError("cannot stack injections of different shapes (layers, heads or head size differ)")
        batch, s_max = len(rows), max(r.n_states for r in real)
        _, hkv, _, d = ref.keys[0].shape
        like = ref.keys[0]
        keys = [like.new_zeros(batch, hkv, s_max, d) for _ in range(m)]
        values = [like.new_zeros(batch, hkv, s_max, d) for _ in range(m)]
        key_pos = None if ref.key_pos is None else torch.zeros(batch, s_max, dtype=torch.long, device=like.device)
        query_pos = torch.zeros(batch, dtype=ref.query_pos.dtype, device=like.device)
        mask = torch.zeros(batch, s_max, dtype=torch.bool, device=like.device)
        nodes: list = []
        for b, r in enumerate(rows):
            if r is None:
                nodes.append([])
                continue
            s = r.n_states
            for i in range(m):
                keys[i][b, :, :s] = r.keys[i][0]
                values[i][b, :, :s] = r.values[i][0]
            if key_pos is not None:
                key_pos[b, :s] = r.key_pos[0]
            query_pos[b] = r.query_pos.reshape(-1)[0]
            mask[b, :s] = True if r.key_mask is None else r.key_mask[0]
            nodes.append(list(r.nodes[0]) if r.nodes else [])
        return Injection(keys, values, key_pos, query_pos, None if bool(mask.all()) else mask, nodes)


_ACTIVE: ContextVar[Injection | None] = ContextVar("sharedctx_injection", default=None)


@contextlib.contextmanager
def injecting(injection: Injection | None) -> Iterator[None]:
    """Make ``injection`` visible to the wrapped layers within the block (per thread / task)."""
    token = _ACTIVE.set(injection)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def injection_disabled():
    return injecting(None)


class LowRankDelta(nn.Module):
    """A linear map equal to a base projection plus a trainable low-rank delta: ``x -> base(x) + (x A^T) B^T``.

    The base projection (the layer's own ``q_proj`` or ``o_proj``) is referenced, not copied and not registered, so
    its weights stay frozen and outside the adapter; the adapter holds only ``lora_a (r, in)`` (random) and
    ``lora_b (out, r)`` (zero at first, so the map starts equal to the base projection)."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__()
        ref = base.weight
        object.__setattr__(self, "base", base)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, dtype=ref.dtype, device=ref.device) / math.sqrt(base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=ref.dtype, device=ref.device))

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight ``W + B A`` (computed; changing it changes nothing)."""
        return self.base.weight + self.lora_b @ self.lora_a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        return out + (x.to(self.lora_a.dtype) @ self.lora_a.t() @ self.lora_b.t()).to(out.dtype)


class CrossAttention(nn.Module):
    """Cross-attention of a layer's hidden states over injected K/V, initialised from the layer's own attention."""

    def __init__(
        self, layer: nn.Module, slot: int, *, gate: str = "tanh", backend: str = "auto", null_kv: bool = False, rank: int = 0
    ) -> None:
        super().__init__()
        attn = layer.self_attn
        self.slot = slot
        self.gate_kind = gate
        self.backend = backend
        self.head_dim = int(getattr(attn, "head_dim", attn.q_proj.out_features // attn.config.num_attention_heads))
        self.num_heads = attn.q_proj.out_features // self.head_dim
        self.scaling = float(getattr(attn, "scaling", self.head_dim**-0.5))
        self.norm = copy.deepcopy(layer.input_layernorm)
        # rank 0: own copies of the layer's projections; rank r: the layer's own (frozen, shared) plus a rank-r delta
        self.q_proj = LowRankDelta(attn.q_proj, rank) if rank else copy.deepcopy(attn.q_proj)
        self.o_proj = LowRankDelta(attn.o_proj, rank) if rank else copy.deepcopy(attn.o_proj)
        self.q_norm = copy.deepcopy(attn.q_norm) if hasattr(attn, "q_norm") else None  # Qwen3
        ref = attn.q_proj.weight
        self.gate = nn.Parameter(torch.zeros((), dtype=ref.dtype, device=ref.device))
        # a learned "nothing" to attend to (``null_kv``): one key and one value per key/value head, both zero at
        # first (a logit of 0 and no output), so a query can put its attention mass where it reads nothing
        self.null_k: nn.Parameter | None = None
        self.null_v: nn.Parameter | None = None
        if null_kv:
            kv_heads = attn.k_proj.out_features // self.head_dim
            self.null_k = nn.Parameter(torch.zeros(kv_heads, 1, self.head_dim, dtype=ref.dtype, device=ref.device))
            self.null_v = nn.Parameter(torch.zeros(kv_heads, 1, self.head_dim, dtype=ref.dtype, device=ref.device))
        for p in self.parameters():
            p.requires_grad_(True)

    def gate_value(self) -> torch.Tensor:
        return torch.tanh(self.gate) if self.gate_kind == "tanh" else self.gate

    def forward(self, hidden: torch.Tensor, injection: Injection, inv_freq: torch.Tensor, attention_scaling: float) -> torch.Tensor:
        """``hidden (B, T, hidden) -> (B, T, hidden)``: the gated update to add to the residual stream."""
        batch, length, _ = hidden.shape
        injection = injection.expand(batch)
        q = self.q_proj(self.norm(hidden)).view(batch, length, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = q.transpose(1, 2)  # (B, H, T, D)
        k = injection.keys[self.slot].to(q.dtype)
        v = injection.values[self.slot].to(q.dtype)
        key_pos, key_mask = injection.key_pos, injection.key_mask
        if self.null_k is not None:
            k, v, key_pos, key_mask = self._with_null(injection, k, v)
        backend = resolve_backend(self.backend, q.device, q.dtype)
        out = backend.fn(
            q,
            k,
            v,
            key_pos=key_pos,
            query_pos=injection.query_pos,
            inv_freq=inv_freq,
            attention_scaling=attention_scaling,
            key_mask=key_mask,
            scaling=self.scaling,
        )  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.gate_value().to(out.dtype) * self.o_proj(out)


    def _with_null(self, injection: Injection, k: torch.Tensor, v: torch.Tensor):
        """Keys, values, positions and mask with the null state appended to every row. Its chunk position is the
        query's own, so the rotation cancels in the dot product (RoPE is relative): the null logit is ``q . null_k``
        whatever the number of chunks. A row without states keeps the null state masked too, so it still reads
        nothing (and runs the base model)."""
        batch = k.shape[0]
        k = torch.cat([k, self.null_k.to(k.dtype).expand(batch, -1, -1, -1)], dim=2)
        v = torch.cat([v, self.null_v.to(v.dtype).expand(batch, -1, -1, -1)], dim=2)
        key_pos = injection.key_pos
        if key_pos is not None:
            key_pos = torch.cat([key_pos, injection.query_pos.reshape(-1, 1).to(key_pos).expand(batch, 1)], dim=1)
        key_mask = injection.key_mask
        if key_mask is not None:
            key_mask = torch.cat([key_mask, key_mask.any(-1, keepdim=True)], dim=1)
        return k, v, key_pos, key_mask


class InjectedDecoderLayer(nn.Module):
    """A base decoder layer with a cross-attention block between self-attention and MLP."""

    def __init__(self, layer: nn.Module, cross: CrossAttention, rotary: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.cross = cross
        # the rotary embedding is shared with the base model; keep it out of this module's parameters/buffers
        object.__setattr__(self, "_rotary", rotary)
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        if args:
            raise TypeError("InjectedDecoderLayer expects keyword arguments after hidden_states")
        layer = self.layer
        residual = hidden_states
        x = layer.input_layernorm(hidden_states)
        x = layer.self_attn(hidden_states=x, **kwargs)[0]
        hidden_states = residual + x
        injection = _ACTIVE.get()
        if injection is not None and injection.n_states > 0:
            hidden_states = hidden_states + self.cross(
                hidden_states, injection, self._rotary.inv_freq, float(getattr(self._rotary, "attention_scaling", 1.0))
            )
        residual = hidden_states
        x = layer.mlp(layer.post_attention_layernorm(hidden_states))
        return residual + x


def attach(
    model: nn.Module, n_layers: int, *, gate: str = "tanh", backend: str = "auto", null_kv: bool = False, rank: int = 0
) -> nn.ModuleList:
    """Wrap the bottom ``n_layers`` decoder layers of ``model`` and return the new cross-attention blocks
    (with a learned null key/value each when ``null_kv``; with projections stored as rank-``rank`` deltas over the
    layer's own when ``rank > 0``)."""
    layers = model.model.layers
    if n_layers > len(layers):
        raise ValueError(f"injection_layers={n_layers} exceeds the model's {len(layers)} layers")
    blocks = []
    for i in range(n_layers):
        layer = layers[i]
        if isinstance(layer, InjectedDecoderLayer):
            raise ValueError("this model already has sharedctx cross-attention attached; wrap the original model once")
        cross = CrossAttention(layer, i, gate=gate, backend=backend, null_kv=null_kv, rank=rank)
        layers[i] = InjectedDecoderLayer(layer, cross, model.model.rotary_emb)
        blocks.append(cross)
    return nn.ModuleList(blocks)


def detach(model: nn.Module, upper_lora: Sequence[UpperLoRA] = ()) -> None:
    """Restore the original decoder layers (and take the hooks of ``upper_lora`` off their projections)."""
    for m in upper_lora:
        m.remove()
    layers = model.model.layers
    for i, layer in enumerate(layers):
        if isinstance(layer, InjectedDecoderLayer):
            layers[i] = layer.layer


#: the projections of an upper layer's self-attention that `UpperLoRA` updates
UPPER_LORA_TARGETS = ("q_proj", "v_proj", "o_proj")


class UpperLoRA(nn.Module):
    """A low-rank update ``x -> scale * B(A(x))`` of one linear projection of an upper layer, applied only while
    states are injected, and only to the batch rows that have states.

    ``B`` starts at zero, so the model equals the base model until trained; ``scale = 2`` (alpha = 2 x rank).
    It is applied by a forward hook on the base projection, so the base model's modules and parameter names
    stay as they were.
    """

    def __init__(self, linear: nn.Linear, rank: int, *, scale: float = 2.0) -> None:
        super().__init__()
        ref = linear.weight
        self.scale = scale
        self.lora_a = nn.Parameter(torch.randn(rank, linear.in_features, dtype=ref.dtype, device=ref.device) / math.sqrt(linear.in_features))
        self.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank, dtype=ref.dtype, device=ref.device))
        self._handle = linear.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: tuple, out: torch.Tensor) -> torch.Tensor:
        injection = _ACTIVE.get()
        if injection is None or injection.n_states == 0:
            return out
        x = inputs[0]
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t() * self.scale
        rows = injection.rows_with_states
        if rows is not None and delta.dim() >= 2:  # rows without states run the base model
            delta = delta * rows.to(delta.dtype).view(-1, *([1] * (delta.dim() - 1)))
        return out + delta.to(out.dtype)

    def remove(self) -> None:
        """Take the hook off the base projection."""
        self._handle.remove()


def attach_upper_lora(model: nn.Module, first_layer: int, rank: int) -> nn.ModuleList:
    """`UpperLoRA` updates of `UPPER_LORA_TARGETS` in every decoder layer from ``first_layer`` up (empty for rank 0)."""
    modules: list[UpperLoRA] = []
    if rank > 0:
        for layer in model.model.layers[first_layer:]:
            layer = getattr(layer, "layer", layer)
            for name in UPPER_LORA_TARGETS:
                modules.append(UpperLoRA(getattr(layer.self_attn, name), rank))
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(True)
    return nn.ModuleList(modules)
