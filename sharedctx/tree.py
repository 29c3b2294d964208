"""Context trees: chunks of a document, their binary trees of nodes, and the compressed states of each node.

Pure data: no model code here. A node is named by ``(chunk, level, index)``: level 0 is the chunk itself,
the children of ``(c, l, i)`` are ``(c, l+1, 2i)`` (left) and ``(c, l+1, 2i+1)`` (right).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from .errors import ContextMismatchError, TreeFormatError

__all__ = ["NodeId", "NodeStates", "ContextTree", "InjectedNode", "canonical_children", "chunk_spans", "subtree_nodes", "TreeFormatError"]

NodeId = tuple[int, int, int]  # (chunk, level, index)

_FORMAT_VERSION = 1



def chunk_spans(n_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of consecutive chunks; the last chunk may be shorter."""
    return [(s, min(s + chunk_size, n_tokens)) for s in range(0, n_tokens, chunk_size)]


def canonical_children(start: int, end: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Split ``[start, end)`` at ``floor(l/2)`` (no split noise): the spans of the left and right child."""
    b = max(1, (end - start) // 2)
    return (start, start + b), (start + b, end)


def subtree_nodes(start: int, end: int, height: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """Every node of levels ``1..height`` of the canonical tree over ``[start, end)``, level by level, as
    ``((level, index), (start, end))``. A node too short to split (one token) has no children. This is the one
    place that lists a chunk's nodes: `ContextTree.iter_nodes` and the encoder both use it."""
    out: list[tuple[tuple[int, int], tuple[int, int]]] = []
    frontier = [((0, 0), (start, end))]
    for level in range(1, height + 1):
        nxt = []
        for (_, index), (a, b) in frontier:
            if b - a < 2:
                continue
            left, right = canonical_children(a, b)
            nxt += [((level, 2 * index), left), ((level, 2 * index + 1), right)]
        out += nxt
        frontier = nxt
    return out


@dataclass
class NodeStates:
    """Compressed states of one node.

    Attributes:
        keys, values: ``(M, Hkv, n, D)`` sampled key/value states of the M lower layers (keys after the
            node's own RoPE, positions ``0..l-1``), ``n = min(keep, l)``.
        key: ``(hidden,)`` the node's key for the ``query`` policy: last token after lower layer 1 + final norm.
    """

    keys: torch.Tensor | None
    values: torch.Tensor | None
    key: torch.Tensor | None

    @property
    def n_states(self) -> int:
        return 0 if self.keys is None else int(self.keys.shape[2])


@dataclass(frozen=True)
class InjectedNode:
    """Provenance of a node whose states are injected: where its states sit and what text they stand for."""

    chunk: int
    level: int
    index: int
    start: int  # token span in the document
    end: int
    n_states: int
    offset: int  # first state of this node in the injected sequence


@dataclass
class ContextTree:
    """A document cut into chunks, each the root of a binary tree of nodes.

    A *precomputed* tree holds the states of every node of levels ``1..h`` (and a key for each chunk root),
    so any later query selects by lookup. A *lazy* tree holds only the tokens; selection then encodes the
    needed nodes on the fly. Both give the same injected states for the same query.
    """

    input_ids: torch.Tensor  # (N,) int64, on the CPU
    chunk_size: int
    tree_height: int
    node_keep: int
    sampling: str
    fingerprint: str
    nodes: dict[NodeId, NodeStates] = field(default_factory=dict)
    text: str | None = None
    offsets: torch.Tensor | None = None  # (N, 2) character span of each token in `text`
    precomputed: bool = False

    # ------------------------------------------------------------------ structure
    @property
    def n_tokens(self) -> int:
        return int(self.input_ids.numel())

    @property
    def spans(self) -> list[tuple[int, int]]:
        return chunk_spans(self.n_tokens, self.chunk_size)

    def check(self, fingerprint: str, signature: dict) -> None:
        """Refuse (`ContextMismatchError`) to be read by a model of another ``fingerprint`` or lower-side options
        (``signature``: `SharedCtxConfig.lower_signature`) than the tree was made under."""
        if self.fingerprint != fingerprint:
            raise ContextMismatchError(
                f"this context tree was encoded by base model {self.fingerprint}, not {fingerprint}; encode it again with this model"
            )
        mine = {"chunk_size": self.chunk_size, "tree_height": self.tree_height, "node_keep": self.node_keep, "sampling": self.sampling}
        diff = {k: (mine[k], signature[k]) for k in mine if mine[k] != signature[k]}
        if diff:
            raise ContextMismatchError(f"context tree options differ from this model's config (tree, model): {diff}; encode it again")

    @property
    def n_chunks(self) -> int:
        return len(self.spans)

    def node_span(self, node: NodeId) -> tuple[int, int]:
        """Token span of a node of the canonical (noise-free) tree."""
        chunk, level, index = node
        start, end = self.spans[chunk]
        for depth in range(level - 1, -1, -1):
            left, right = canonical_children(start, end)
            start, end = right if (index >> depth) & 1 else left
        return start, end

    def char_span(self, start: int, end: int) -> tuple[int, int] | None:
        """Character span in `text` of the tokens ``[start, end)``, when offsets are known."""
        if self.offsets is None or end <= start:
            return None
        return int(self.offsets[start, 0]), int(self.offsets[end - 1, 1])

    def iter_nodes(self) -> Iterator[tuple[NodeId, tuple[int, int]]]:
        """Every node of levels 1..h of every chunk, with its token span, level by level."""
        for chunk, (s, e) in enumerate(self.spans):
            for (level, index), span in subtree_nodes(s, e, self.tree_height):
                yield (chunk, level, index), span

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | Path) -> None:
        """Write the tree to one safetensors file (no pickle)."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {"input_ids": self.input_ids.contiguous()}
        if self.offsets is not None:
            tensors["offsets"] = self.offsets.contiguous()
        for (c, l, i), st in self.nodes.items():
            for name in ("keys", "values", "key"):
                t = getattr(st, name)
                if t is not None:
                    tensors[f"{name}/{c}/{l}/{i}"] = t.detach().to("cpu").contiguous()
        meta = {
            "format": str(_FORMAT_VERSION),
            "header": json.dumps(
                {
                    "chunk_size": self.chunk_size,
                    "tree_height": self.tree_height,
                    "node_keep": self.node_keep,
                    "sampling": self.sampling,
                    "fingerprint": self.fingerprint,
                    "precomputed": self.precomputed,
                    "text": self.text,
                }
            ),
        }
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> ContextTree:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != str(_FORMAT_VERSION):
                    raise TreeFormatError(f"{path}: not a sharedctx context tree of format {_FORMAT_VERSION}")
                header = json.loads(meta["header"])
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except TreeFormatError:
            raise
        except Exception as exc:
            raise TreeFormatError(f"{path}: cannot read context tree: {exc}") from exc
        nodes: dict[NodeId, NodeStates] = {}
        for name, t in tensors.items():
            if "/" not in name:
                continue
            kind, c, l, i = name.split("/")
            st = nodes.setdefault((int(c), int(l), int(i)), NodeStates(None, None, None))
            setattr(st, kind, t)
        return cls(
            input_ids=tensors["input_ids"],
            offsets=tensors.get("offsets"),
            nodes=nodes,
            **{k: header[k] for k in ("chunk_size", "tree_height", "node_keep", "sampling", "fingerprint", "precomputed", "text")},
        )
