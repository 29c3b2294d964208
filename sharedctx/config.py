"""Configuration of the SharedLLM method, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["SharedCtxConfig", "LOWER_FIELDS", "ADAPTER_FIELDS", "POLICIES", "DEFAULT_POLICY", "MODES", "DEFAULT_MODE",
           "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_STOP_ON_REPEAT"]

Policy = Literal["query", "lexical", "right", "left", "random"]
Positions = Literal["chunk", "none"]
Sampling = Literal["end", "start"]

#: the walk policies (see `SharedCtxConfig.policy`)
POLICIES = ("query", "lexical", "right", "left", "random")
#: The policy every entry point uses unless told otherwise (SharedLLM, ContextIndex, the CLI, both integrations).
#: ``lexical``: until an adapter that reads ships, the key-based walks (``query``, and the ``right`` walk the shipped
#: adapter was trained with) pick the same nodes whatever the question; BM25 of the nodes' text finds the answer's
#: chunk (benchmarks/bench_selection.py). An adapter's own training policy applies only when asked for.
DEFAULT_POLICY: Policy = "lexical"
#: how an answer reads what the walk selected: ``latent`` injects the states, ``text`` puts the selected spans into
#: the prompt, ``hybrid`` does both
MODES = ("latent", "text", "hybrid")
#: the answer mode of `ContextIndex.query`/`stream`, ``sharedctx ask`` and both integrations: the one that answered the
#: demo question with the shipped adapter, and the faster of the two that did (benchmarks/demo_choice.py)
DEFAULT_MODE = "hybrid"
#: decoding defaults shared by the Python API (`SamplingOptions`, `SharedLLM.stream`, `ContextIndex.query`) and the CLI
DEFAULT_MAX_NEW_TOKENS = 256
#: end an answer when its last 8 tokens repeat 8 it already holds (see `SamplingOptions.stop_on_repeat`); a 135M model
#: loops often, and the demo choice (benchmarks/demo_choice.py) was measured with this guard on
DEFAULT_STOP_ON_REPEAT = 8
_POSITIONS = ("chunk", "none")
_SAMPLING = ("end", "start")
_GATES = ("tanh", "linear")

#: Fields that shape the compressed states of a node (the lower side). A node cached under one value of any
#: of these is not valid under another; `TreeStore` keys include them.
LOWER_FIELDS = ("injection_layers", "chunk_size", "tree_height", "node_keep", "sampling")

#: Fields that shape an adapter's parameters: an adapter loads only on a model built with the same values.
ADAPTER_FIELDS = ("injection_layers", "gate", "upper_lora_rank", "null_kv", "cross_rank")


@dataclass
class SharedCtxConfig:
    """Options of the SharedLLM method (all keyword arguments).

    Attributes:
        injection_layers: ``M``, the number of bottom layers that compress the context (lower model) and
            that receive cross-attention in the upper model.
        chunk_size: ``C``, tokens per chunk; each chunk is the root of a context tree.
        tree_height: ``h``, the number of levels of splitting below each chunk root.
        node_keep: states kept per preserved node after sampling (per layer, per key/value head).
        policy: which child to expand at each split: ``lexical`` (the default, `DEFAULT_POLICY`: BM25 of the
            node's text for the question's words; `ContextIndex` also ranks chunks by it), ``query`` (cosine to the
            query key, the paper's), ``right``, ``left`` or ``random``. A runtime choice: loading an adapter does not
            change it (the policy an adapter was trained with is `SharedLLM.adapter_policy`; pass it to use it).
        positions: ``chunk`` rotates the keys of chunk ``i`` by RoPE position ``i`` and queries by ``n``,
            the number of injected chunks; ``none`` adds no position (ablation).
        sampling: ``end`` keeps the state that ends each stride window, ``start`` the one that begins it.
        split_noise: standard deviation of the split point, as a fraction of the node length, used only
            while training (the paper uses 1/5).
        gate: ``tanh`` (output scaled by ``tanh(g)``) or ``linear`` (scaled by ``g``); both start at 0.
        upper_lora_rank: 0 (the paper's design: only the cross-attention blocks are new) or the rank of low-rank
            updates to the ``q_proj``, ``v_proj`` and ``o_proj`` of every layer above the bottom ``M``, part of the
            adapter and trained with it. They act only while states are injected (a row with no states, or no
            context, runs the base model exactly) and start at zero. Our addition: it lets training teach the
            upper layers to use what the cross-attention writes into the residual stream.
        null_kv: give each cross-attention a learned null key/value (zero at first) that every query may attend to,
            so a block can read nothing when the context has nothing for it; off by default (the paper's design).
        cross_rank: 0 (each cross-attention owns full copies of its layer's ``q_proj`` and ``o_proj``: ~2.6 M
            parameters a layer for SmolLM2-135M) or ``r > 0``: they are the layer's own projections (frozen) plus trainable
            rank-``r`` deltas, peft-style, so the adapter holds only the deltas, norms and gates (a few MB at ``M = 30``).
        seed: seed of the ``random`` policy and of split noise.
        max_batch_tokens: upper bound on tokens per batched lower-model pass (memory bound while encoding).
        attn_backend: cross-attention backend: ``auto``, ``eager``, ``sdpa`` or a registered kernel backend.
    """

    injection_layers: int = 4
    chunk_size: int = 1024
    tree_height: int = 3
    node_keep: int = 32
    policy: Policy = DEFAULT_POLICY
    positions: Positions = "chunk"
    sampling: Sampling = "end"
    split_noise: float = 0.2
    gate: str = "tanh"
    upper_lora_rank: int = 0
    null_kv: bool = False
    cross_rank: int = 0
    seed: int = 0
    max_batch_tokens: int = 16384
    attn_backend: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        def positive(name: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SharedCtxConfig.{name} must be a positive integer, got {value!r}")

        for name in ("injection_layers", "chunk_size", "tree_height", "node_keep", "max_batch_tokens"):
            positive(name)
        if self.chunk_size < 2**self.tree_height:
            raise ValueError(
                f"chunk_size={self.chunk_size} is too small for tree_height={self.tree_height}: every split "
                f"needs at least one token per child, so use chunk_size >= {2**self.tree_height} or a lower tree_height"
            )
        if self.policy not in POLICIES:
            raise ValueError(f"SharedCtxConfig.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.positions not in _POSITIONS:
            raise ValueError(f"SharedCtxConfig.positions must be one of {_POSITIONS}, got {self.positions!r}")
        if self.sampling not in _SAMPLING:
            raise ValueError(f"SharedCtxConfig.sampling must be one of {_SAMPLING}, got {self.sampling!r}")
        if not isinstance(self.upper_lora_rank, int) or isinstance(self.upper_lora_rank, bool) or self.upper_lora_rank < 0:
            raise ValueError(f"SharedCtxConfig.upper_lora_rank must be an integer >= 0, got {self.upper_lora_rank!r}")
        if not isinstance(self.cross_rank, int) or isinstance(self.cross_rank, bool) or self.cross_rank < 0:
            raise ValueError(f"SharedCtxConfig.cross_rank must be an integer >= 0, got {self.cross_rank!r}")
        if self.gate not in _GATES:
            raise ValueError(f"SharedCtxConfig.gate must be one of {_GATES}, got {self.gate!r}")
        if not 0.0 <= float(self.split_noise) < 0.5:
            raise ValueError(f"SharedCtxConfig.split_noise must be in [0, 0.5), got {self.split_noise!r}")

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharedCtxConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SharedCtxConfig fields {unknown}; known fields are {sorted(known)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def replace(self, **changes: Any) -> SharedCtxConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def lower_signature(self) -> dict[str, Any]:
        """The fields that shape compressed node states (see `LOWER_FIELDS`)."""
        return {name: getattr(self, name) for name in LOWER_FIELDS}

    @property
    def states_per_chunk(self) -> int:
        """Injected states per full chunk: ``h + 1`` preserved nodes of at most ``node_keep`` states."""
        return (self.tree_height + 1) * self.node_keep
