"""The lower model: the bottom M layers of the base model itself, run over context nodes in batched passes."""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import defaultdict
from contextlib import nullcontext
from typing import Sequence

import torch
from torch import nn

from .config import SharedCtxConfig
from .ops.sampling import sample_indices
from .tree import ContextTree, NodeId, NodeStates

__all__ = ["LowerEncoder", "cache_kwarg"]

logger = logging.getLogger(__name__)

Span = tuple[int, int]


def cache_kwarg(fn) -> str:
    """The keyword a transformers forward takes its KV cache by: ``cache`` (newer 5.x) or ``past_key_values``."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


class LowerEncoder:
    """Runs spans of a document through the bottom ``M`` decoder layers and keeps sampled K/V and node keys.

    Spans of equal length are stacked into one batch (no padding, so no mask beyond causality), up to
    ``config.max_batch_tokens`` tokens a pass.
    """

    def __init__(self, model: nn.Module, config: SharedCtxConfig) -> None:
        self.model = model
        self.config = config
        self.inner = model.model
        first = self.inner.layers[0]
        self.layer_cache_kw = cache_kwarg(getattr(first, "layer", first).forward)
        #: number of lower-model passes run (tests count them to prove caching)
        self.passes = 0
        self.tokens_encoded = 0
        self._counter_lock = threading.Lock()  # passes may run from many threads at once
        #: fused K/V sampler ``sample_kv(k, v, keep=, align=, out_k=, out_v=)`` writing straight into the node
        #: buffers; ``"auto"`` uses `sharedctx_kernels.sample_kv` for CUDA tensors when sharedctx-kernels and
        #: triton are installed; None always gathers with ``index_select``
        self.sample_kv = "auto"

    # ------------------------------------------------------------------ one batched pass
    @property
    def device(self) -> torch.device:
        return self.inner.embed_tokens.weight.device

    def _mask(self, batch: int, length: int, dtype: torch.dtype) -> torch.Tensor | None:
        impl = getattr(self.model.config, "_attn_implementation", "eager") or "eager"
        if impl == "sdpa" or "flash" in impl:
            return None  # these apply causality themselves when no mask is given
        mask = torch.full((length, length), torch.finfo(dtype).min, device=self.device, dtype=dtype).triu(1)
        return mask[None, None].expand(batch, 1, length, length)

    def run(self, ids: torch.Tensor, n_layers: int) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Run ``ids (B, L)`` (positions ``0..L-1``) through the bottom ``n_layers`` layers.

        Returns per-layer keys and values ``(B, Hkv, L, D)`` (keys after RoPE) and the hidden states after the
        first layer ``(B, L, hidden)``.
        """
        from transformers import DynamicCache

        from .injection import injection_disabled

        batch, length = ids.shape
        ids = ids.to(self.device)
        hidden = self.inner.embed_tokens(ids)
        position_ids = torch.arange(length, device=self.device)[None].expand(batch, length)
        pos_emb = self.inner.rotary_emb(hidden, position_ids)
        mask = self._mask(batch, length, hidden.dtype)
        cache = DynamicCache()
        first = hidden
        with injection_disabled():
            for i in range(n_layers):
                out = self.inner.layers[i](
                    hidden,
                    attention_mask=mask,
                    position_ids=position_ids,
                    position_embeddings=pos_emb,
                    use_cache=True,
                    **{self.layer_cache_kw: cache},
                )
                hidden = out[0] if isinstance(out, tuple) else out
                if i == 0:
                    first = hidden
        keys = [cache.layers[i].keys for i in range(n_layers)]
        values = [cache.layers[i].values for i in range(n_layers)]
        with self._counter_lock:
            self.passes += 1
            self.tokens_encoded += batch * length
        return keys, values, first

    def _node_key(self, first: torch.Tensor) -> torch.Tensor:
        return self.inner.norm(first[:, -1]).float()  # (B, hidden)

    # ------------------------------------------------------------------ many spans
    def _batches(self, spans: Sequence[Span]) -> list[list[int]]:
        by_len: dict[int, list[int]] = defaultdict(list)
        for j, (s, e) in enumerate(spans):
            if e <= s:
                raise ValueError(f"empty span {s, e}")
            by_len[e - s].append(j)
        batches = []
        for length in sorted(by_len, reverse=True):
            members = by_len[length]
            per = max(1, self.config.max_batch_tokens // length)
            batches += [members[k : k + per] for k in range(0, len(members), per)]
        return batches

    def encode_spans(
        self, ids: torch.Tensor, spans: Sequence[Span], *, full: bool = True, progress=None
    ) -> list[NodeStates]:
        """Encode each span of the document ``ids (N,)`` on its own.

        With ``full`` the K/V of all M layers are sampled down to ``node_keep`` states (plus the node key);
        otherwise only the first layer runs and only node keys are returned.
        """
        cfg = self.config
        out: list[NodeStates | None] = [None] * len(spans)
        n_layers = cfg.injection_layers if full else 1
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.inner.layers[0].parameters())
        with nullcontext() if grad else torch.no_grad():
            for members in self._batches(spans):
                rows = torch.stack([ids[spans[j][0] : spans[j][1]] for j in members])
                keys, values, first = self.run(rows, n_layers)
                node_keys = self._node_key(first)
                if full:
                    k, v = self._sample(keys, values, grad)  # (B, M, Hkv, n, D)
                for row, j in enumerate(members):
                    if full:
                        out[j] = NodeStates(k[row], v[row], node_keys[row])
                    else:
                        out[j] = NodeStates(None, None, node_keys[row])
                if progress is not None:
                    progress.update(int(rows.numel()))
        return out  # type: ignore[return-value]

    def _sample(self, keys: list[torch.Tensor], values: list[torch.Tensor], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's ``(B, Hkv, L, D)`` K/V sampled to ``node_keep`` states, stacked ``(B, M, Hkv, n, D)``."""
        cfg = self.config
        length = keys[0].shape[2]
        idx = sample_indices(length, cfg.node_keep, cfg.sampling)
        fused = _fused_sampler(keys[0].device.type) if self.sample_kv == "auto" else self.sample_kv
        if fused is not None and not grad:
            b, hkv, _, d = keys[0].shape
            k = keys[0].new_empty(b, len(keys), hkv, len(idx), d)
            v = values[0].new_empty(b, len(keys), hkv, len(idx), d)
            for i, (kk, vv) in enumerate(zip(keys, values)):
                fused(kk, vv, keep=cfg.node_keep, align=cfg.sampling, out_k=k[:, i], out_v=v[:, i])
            return k, v
        at = torch.tensor(idx, device=keys[0].device)
        return torch.stack([t.index_select(2, at) for t in keys], dim=1), torch.stack([t.index_select(2, at) for t in values], dim=1)

    def node_keys(self, ids: torch.Tensor, spans: Sequence[Span]) -> torch.Tensor:
        """``(N, hidden)`` keys of spans, from a first-layer-only pass."""
        return torch.stack([st.key for st in self.encode_spans(ids, spans, full=False)])

    def encode_tree(self, tree: ContextTree, *, show_progress: bool = False) -> ContextTree:
        """Fill ``tree`` with the states of every node of levels 1..h and a key for every chunk root."""
        from tqdm.auto import tqdm

        ids = tree.input_ids
        items = list(tree.iter_nodes())
        roots = [((c, 0, 0), span) for c, span in enumerate(tree.spans)]
        unsplittable = [r for r in roots if r[1][1] - r[1][0] < 2]
        full_items = items + unsplittable
        total = sum(e - s for _, (s, e) in full_items) + sum(e - s for _, (s, e) in roots)
        with tqdm(total=total, unit="tok", desc="encoding tree", disable=not show_progress) as bar:
            states = self.encode_spans(ids, [span for _, span in full_items], progress=bar)
            for (node, _), st in zip(full_items, states):
                tree.nodes[node] = st
            root_states = self.encode_spans(ids, [span for _, span in roots], full=False, progress=bar)
        for (node, _), st in zip(roots, root_states):
            if node in tree.nodes:
                tree.nodes[node].key = st.key
            else:
                tree.nodes[node] = st
        tree.precomputed = True
        return tree


@functools.lru_cache(maxsize=None)
def _fused_sampler(device_type: str):
    """`sharedctx_kernels.sample_kv` for CUDA when sharedctx-kernels and triton are installed, else None."""
    if device_type != "cuda":
        return None
    try:
        import triton  # noqa: F401
        from sharedctx_kernels import sample_kv
    except ImportError:
        return None
    logger.info("node sampling: fused Triton gather (sharedctx-kernels)")
    return sample_kv
