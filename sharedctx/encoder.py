"""The lower model: the bottom M layers of the base model itself, run over context nodes in batched passes.

`LowerEncoder` is the one place where context tokens become node states: the nodes of one document's tree
(`encode_tree`, `encode_spans`), the chunks an index adds (`encode_chunks`, spans of different lengths padded
into shared passes), first-layer keys for the ``query`` policy (`node_keys`, `query_keys`). A fused K/V sampler,
when a kernel package registers one for the device, is found through `sharedctx.ops.resolve_sampler`.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .config import SharedCtxConfig
from .ops.dispatch import resolve_sampler
from .ops.sampling import sample_indices
from .tree import ContextTree, NodeStates, subtree_nodes

__all__ = ["LowerEncoder", "ChunkNodes", "cache_kwarg"]

logger = logging.getLogger(__name__)

Span = tuple[int, int]
#: a chunk's nodes by ``(level, index)``; ``(0, 0)`` is the chunk root (its key, and its states when unsplittable)
ChunkNodes = dict[tuple[int, int], NodeStates]


def cache_kwarg(fn) -> str:
    """The keyword a transformers forward takes its KV cache by: ``cache`` (newer 5.x) or ``past_key_values``."""
    params = inspect.signature(fn).parameters
    return "cache" if "cache" in params else "past_key_values"


class LowerEncoder:
    """Runs spans of a document through the bottom ``M`` decoder layers and keeps sampled K/V and node keys.

    Spans of equal length are stacked into one batch (no padding, so no mask beyond causality), up to
    ``config.max_batch_tokens`` tokens a pass; with ``ragged=True`` spans of similar length are right-padded
    into one batch instead (content-defined chunks have many distinct lengths).
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
        #: buffers; ``"auto"`` asks `sharedctx.ops.resolve_sampler` for one registered for the device (the
        #: optional sharedctx-kernels registers a Triton one for CUDA); None always gathers with ``index_select``
        self.sample_kv = "auto"
        self._progress = threading.local()

    @contextmanager
    def reporting(self, progress: Any) -> Iterator[None]:
        """Inside the block, every pass this thread runs calls ``progress.update(tokens)`` (e.g. a tqdm bar):
        progress of encoding done deep inside a call, such as the nodes `SharedLLM.stream` selects."""
        previous = getattr(self._progress, "sink", None)
        self._progress.sink = progress
        try:
            yield
        finally:
            self._progress.sink = previous

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

    def key_of(self, hidden: torch.Tensor) -> torch.Tensor:
        """Keys from hidden states after the first layer ``(..., hidden)``: the final norm, in float32."""
        return self.inner.norm(hidden).float()

    def query_keys(self, input_ids: torch.Tensor, lengths: Sequence[int]) -> torch.Tensor:
        """``(B, hidden)`` query keys of ``input_ids (B, T)``: each row's token ``lengths[b] - 1`` after layer 1
        (no injection) and the final norm."""
        keys = []
        with torch.no_grad():
            for row, n in zip(input_ids, lengths):
                _, _, first = self.run(row[:n].reshape(1, -1), 1)
                keys.append(self.key_of(first[:, -1])[0])
        return torch.stack(keys)

    # ------------------------------------------------------------------ many spans
    def _batches(self, spans: Sequence[Span], ragged: bool) -> list[list[int]]:
        """Groups of span indices that run in one pass, longest first: equal lengths, or with ``ragged`` lengths
        within 80 % of the group's longest (right-padded), at most ``max_batch_tokens`` tokens a pass."""
        for s, e in spans:
            if e <= s:
                raise ValueError(f"empty span {s, e}")
        limit = self.config.max_batch_tokens
        if ragged:
            batches: list[list[int]] = []
            for j in sorted(range(len(spans)), key=lambda j: spans[j][0] - spans[j][1]):
                length = spans[j][1] - spans[j][0]
                if batches:
                    top = spans[batches[-1][0]][1] - spans[batches[-1][0]][0]
                    if length >= 0.8 * top and (len(batches[-1]) + 1) * top <= limit:
                        batches[-1].append(j)
                        continue
                batches.append([j])
            return batches
        by_len: dict[int, list[int]] = defaultdict(list)
        for j, (s, e) in enumerate(spans):
            by_len[e - s].append(j)
        batches = []
        for length in sorted(by_len, reverse=True):
            members = by_len[length]
            per = max(1, limit // length)
            batches += [members[k : k + per] for k in range(0, len(members), per)]
        return batches

    def encode_spans(
        self, ids: torch.Tensor, spans: Sequence[Span], *, full: bool = True, ragged: bool = False, progress=None
    ) -> list[NodeStates]:
        """Encode each span of the document ``ids (N,)`` on its own (positions ``0..l-1``).

        With ``full`` the K/V of all M layers are sampled down to ``node_keep`` states (plus the node key);
        otherwise only the first layer runs and only node keys are returned. ``ragged`` right-pads spans of
        different lengths into shared passes: exact, since under causal attention a token never sees the padding
        after it, every sampled state lies inside its span and the key is read at the span's own last token.
        """
        cfg = self.config
        if progress is None:
            progress = getattr(self._progress, "sink", None)
        out: list[NodeStates | None] = [None] * len(spans)
        n_layers = cfg.injection_layers if full else 1
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.inner.layers[0].parameters())
        with nullcontext() if grad else torch.no_grad():
            for members in self._batches(spans, ragged):
                lengths = [spans[j][1] - spans[j][0] for j in members]
                rows = torch.zeros(len(members), max(lengths), dtype=torch.long)
                for r, j in enumerate(members):
                    rows[r, : lengths[r]] = ids[spans[j][0] : spans[j][1]]
                keys, values, first = self.run(rows, n_layers)
                last = first[torch.arange(len(members)), torch.tensor(lengths) - 1]  # (B, hidden)
                node_keys = self.key_of(last)
                if full and len(set(lengths)) == 1:
                    k, v = self._sample(keys, values, grad)  # (B, M, Hkv, n, D)
                for r, j in enumerate(members):
                    if not full:
                        out[j] = NodeStates(None, None, node_keys[r])
                    elif len(set(lengths)) == 1:
                        out[j] = NodeStates(k[r], v[r], node_keys[r])
                    else:  # this row's own length: padding is never sampled
                        kr, vr = self._sample([t[r : r + 1, :, : lengths[r]] for t in keys], [t[r : r + 1, :, : lengths[r]] for t in values], grad)
                        out[j] = NodeStates(kr[0], vr[0], node_keys[r])
                if progress is not None:
                    progress.update(int(sum(lengths)))
        return out  # type: ignore[return-value]

    def _sample(self, keys: list[torch.Tensor], values: list[torch.Tensor], grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Each layer's ``(B, Hkv, L, D)`` K/V sampled to ``node_keep`` states, stacked ``(B, M, Hkv, n, D)``."""
        cfg = self.config
        length = keys[0].shape[2]
        idx = sample_indices(length, cfg.node_keep, cfg.sampling)
        fused = resolve_sampler(keys[0].device, keys[0].dtype) if self.sample_kv == "auto" else self.sample_kv
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
        full_items = items + [r for r in roots if r[1][1] - r[1][0] < 2]  # an unsplittable root is kept whole
        total = sum(e - s for _, (s, e) in full_items) + sum(e - s for _, (s, e) in roots)
        with tqdm(total=total, unit="tok", desc="encoding tree", disable=not show_progress) as bar:
            states = self.encode_spans(ids, [span for _, span in full_items], progress=bar)
            root_states = self.encode_spans(ids, [span for _, span in roots], full=False, progress=bar)
        _place(tree.nodes, [node for node, _ in full_items], states, [node for node, _ in roots], root_states)
        tree.precomputed = True
        return tree

    def encode_chunks(self, chunks: Sequence[torch.Tensor]) -> list[ChunkNodes]:
        """Every node of each chunk's tree (levels 1..h, sampled states) and each root's key, on the CPU, for
        chunks ``(n_i,)`` of different lengths, in padded batched passes (what a `ContextIndex` stores)."""
        height = self.config.tree_height
        buf = torch.cat(list(chunks))
        full_spans: list[Span] = []
        owners: list[tuple[int, tuple[int, int]]] = []
        roots: list[Span] = []
        base = 0
        for j, ids in enumerate(chunks):
            n = int(ids.numel())
            nodes = subtree_nodes(base, base + n, height) or [((0, 0), (base, base + n))]  # unsplittable: kept whole
            full_spans += [span for _, span in nodes]
            owners += [(j, node) for node, _ in nodes]
            roots.append((base, base + n))
            base += n
        states = self.encode_spans(buf, full_spans, ragged=True)
        root_states = self.encode_spans(buf, roots, full=False, ragged=True)
        out: list[ChunkNodes] = [{} for _ in chunks]
        for (j, node), st in zip(owners, states):
            out[j][node] = NodeStates(_cpu(st.keys), _cpu(st.values), _cpu(st.key))
        for j, st in enumerate(root_states):
            _place(out[j], [], [], [(0, 0)], [NodeStates(None, None, _cpu(st.key))])
        return out


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().cpu()


def _place(nodes: dict, full_ids: list, full_states: list[NodeStates], root_ids: list, root_states: list[NodeStates]) -> None:
    """Put encoded nodes into ``nodes``; a root's key joins the root's states when the root was kept whole."""
    for node, st in zip(full_ids, full_states):
        nodes[node] = st
    for node, st in zip(root_ids, root_states):
        if node in nodes:
            nodes[node].key = st.key
        else:
            nodes[node] = st
