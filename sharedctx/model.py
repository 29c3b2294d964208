"""SharedLLM: one causal LM reading long contexts through its own compressed states."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import __version__
from .config import ADAPTER_FIELDS, LOWER_FIELDS, SharedCtxConfig
from .encoder import LowerEncoder, cache_kwarg
from .errors import AdapterMismatchError, ContextMismatchError, PromptTooLongError
from .generation import SAMPLING_FIELDS, RowDecoder, SamplingOptions
from .injection import Injection, attach, attach_upper_lora, injecting
from .models import DEFAULT_MODEL_NAME, base_fingerprint, check_supported, load_base_model
from .ops.scoring import BM25, cosine_scores
from .policy import make_chooser, walk_trees
from .tree import ContextTree, InjectedNode, NodeStates

__all__ = ["SharedLLM", "Completion", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "default_adapter_path"]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "sharedctx_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
_DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"

ContextLike = ContextTree | str | Sequence[int] | torch.Tensor


def default_adapter_path() -> Path | None:
    """The adapter shipped for the default model, when one ships."""
    return _DEFAULT_ADAPTER if (_DEFAULT_ADAPTER / ADAPTER_CONFIG).is_file() else None


@dataclass
class Completion:
    """A generated answer with what it cost."""

    text: str
    token_ids: list[int]
    stats: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)


class SharedLLM(nn.Module):
    """A base causal LM whose bottom layers compress a context and whose bottom layers read it back.

    Build with `from_pretrained` (a model id or path, or the default model) or `from_model` (an in-memory
    transformers model). Only the cross-attention blocks (`injection`) are new parameters.
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, *, config: SharedCtxConfig | None = None) -> None:
        super().__init__()
        check_supported(model)
        self.config = config or SharedCtxConfig()
        n_layers = model.config.num_hidden_layers
        if self.config.injection_layers > n_layers:
            raise ValueError(
                f"injection_layers={self.config.injection_layers} exceeds the base model's {n_layers} layers; "
                f"use SharedCtxConfig(injection_layers<={n_layers})"
            )
        self.fingerprint = base_fingerprint(model)  # before attaching: the base model as it was given
        self.base = model
        self.tokenizer = tokenizer
        for p in model.parameters():
            p.requires_grad_(False)
        self.injection = attach(model, self.config.injection_layers, gate=self.config.gate, backend=self.config.attn_backend)
        # empty unless config.upper_lora_rank > 0: low-rank updates of the upper layers, active only under injection
        self.upper_lora = attach_upper_lora(model, self.config.injection_layers, self.config.upper_lora_rank)
        self.encoder = LowerEncoder(model, self.config)
        self._cache_kw = cache_kwarg(model.forward)
        self.adapter_trained = False
        self.adapter_path: str | None = None
        self._train_generator: torch.Generator | None = None
        self.train(model.training)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(cls, model: nn.Module, tokenizer: Any = None, *, config: SharedCtxConfig | None = None) -> SharedLLM:
        """Wrap an in-memory transformers causal LM (its bottom layers are wrapped in place)."""
        return cls(model, tokenizer, config=config)

    @classmethod
    def from_pretrained(
        cls,
        base: str | os.PathLike | None = None,
        *,
        adapter: str | os.PathLike | bool | None = None,
        config: SharedCtxConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        attn_implementation: str | None = None,
    ) -> SharedLLM:
        """Load a base model and, optionally, an adapter.

        Args:
            base: Hugging Face id or local folder; None for the default model (SmolLM2-135M-Instruct).
            adapter: a folder written by `save_pretrained`; None uses the shipped default adapter with the
                default model (when one ships); False never loads one.
            config: options; when an adapter is loaded, its configuration is used and ``config`` may only
                change options that do not shape the adapter's parameters.
        """
        model, tokenizer = load_base_model(base, device=device, dtype=dtype, attn_implementation=attn_implementation)
        adapter_dir: Path | None = None
        if adapter is None and base is None:
            adapter_dir = default_adapter_path()
        elif adapter not in (None, False, True):
            adapter_dir = Path(adapter)  # type: ignore[arg-type]
        if adapter_dir is None:
            return cls(model, tokenizer, config=config)
        saved = _read_adapter_config(adapter_dir)
        merged = _merge_configs(SharedCtxConfig.from_dict(saved["config"]), config, adapter_dir)
        llm = cls(model, tokenizer, config=merged)
        llm.load_adapter(adapter_dir)
        return llm

    @classmethod
    def shared(
        cls,
        base: str | os.PathLike | None = None,
        *,
        adapter: str | os.PathLike | bool | None = None,
        config: SharedCtxConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> SharedLLM:
        """`from_pretrained` once per process for these options: later calls return the same model while any
        caller still holds it (a weak cache, so the weights go when the last user drops them). Thread-safe.

        This is how the LangChain and LlamaIndex integrations load models: several chat models, LLMs and
        indexes built with the same options share one copy of the weights.
        """
        key = (
            str(base) if base is not None else None,
            adapter if isinstance(adapter, bool) or adapter is None else str(adapter),
            json.dumps(config.to_dict(), sort_keys=True) if config is not None else None,
            str(device) if device is not None else None,
            str(dtype) if dtype is not None else None,
        )
        with _SHARED_LOCK:
            llm = _SHARED.get(key)
            if llm is None:
                logger.info("loading SharedLLM base=%s adapter=%s", base or "<default>", adapter if adapter is not None else "<default>")
                llm = cls.from_pretrained(base, adapter=adapter, config=config, device=device, dtype=dtype)
                _SHARED[key] = llm
            return llm

    # ------------------------------------------------------------------ adapters
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write only the new parameters: ``sharedctx_adapter.json`` + ``adapter.safetensors``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.adapter_state_dict().items()}
        save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        meta = {
            "sharedctx_version": __version__,
            "base_fingerprint": self.fingerprint,
            "base_model_type": self.base.config.model_type,
            "base_name_or_path": getattr(self.base.config, "_name_or_path", "") or DEFAULT_MODEL_NAME,
            "config": self.config.to_dict(),
            "trained": self.adapter_trained,
        }
        (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load adapter weights saved by `save_pretrained`, refusing one made for another base model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta = _read_adapter_config(directory)
        if meta["base_fingerprint"] != self.fingerprint:
            raise AdapterMismatchError(
                f"the adapter in {directory} was made for base model {meta['base_fingerprint']} "
                f"({meta.get('base_name_or_path', '?')}), but this base model is {self.fingerprint}. "
                "Load it on the base model it was trained for, or train one for this model (`sharedctx train`)."
            )
        saved = SharedCtxConfig.from_dict(meta["config"])
        for name in ADAPTER_FIELDS:
            if getattr(saved, name) != getattr(self.config, name):
                raise AdapterMismatchError(
                    f"the adapter in {directory} has {name}={getattr(saved, name)!r} but this model has "
                    f"{name}={getattr(self.config, name)!r}; build the model with the adapter's configuration"
                )
        path = directory / ADAPTER_WEIGHTS
        try:
            state = load_file(str(path))
        except Exception as exc:
            raise AdapterMismatchError(f"cannot read adapter weights {path}: {exc}") from exc
        expected = self.adapter_state_dict()
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
            raise AdapterMismatchError(f"the adapter weights in {path} do not match this model's adapter shapes (cross-attention, upper LoRA)")
        with torch.no_grad():
            for k, v in state.items():
                expected[k].copy_(v.to(expected[k].dtype))
        self.adapter_trained = bool(meta.get("trained", True))
        self.adapter_path = str(directory)

    def adapter_named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The adapter's parameters, named as they are saved: the cross-attention blocks (``0.q_proj.weight``,
        ...) and, when ``upper_lora_rank > 0``, the upper layers' low-rank updates (``upper_lora.0.lora_a``, ...).
        What `save_pretrained` writes, `load_adapter` reads and training updates."""
        yield from self.injection.named_parameters()
        for name, p in self.upper_lora.named_parameters():
            yield f"upper_lora.{name}", p

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors by name (see `adapter_named_parameters`)."""
        return {k: p.data for k, p in self.adapter_named_parameters()}

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.base.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.base.model.embed_tokens.weight.dtype

    @property
    def max_positions(self) -> int:
        return int(getattr(self.base.config, "max_position_embeddings", 0) or 0)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ contexts
    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("this SharedLLM has no tokenizer: pass token ids, or build it with a tokenizer")
        return self.tokenizer

    def context_tree(self, context: ContextLike) -> ContextTree:
        """A lazy tree (tokens only) for text or token ids; a `ContextTree` is checked and returned."""
        cfg = self.config
        if isinstance(context, ContextTree):
            self._check_tree(context)
            return context
        text = None
        offsets = None
        if isinstance(context, str):
            text = context
            enc = self._require_tokenizer()(context, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(enc["input_ids"], dtype=torch.long)
            offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
        else:
            ids = torch.as_tensor(context, dtype=torch.long).reshape(-1).cpu()
        vocab = self.base.config.vocab_size
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"context token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")
        return ContextTree(
            input_ids=ids,
            chunk_size=cfg.chunk_size,
            tree_height=cfg.tree_height,
            node_keep=cfg.node_keep,
            sampling=cfg.sampling,
            fingerprint=self.fingerprint,
            text=text,
            offsets=offsets,
        )

    def _check_tree(self, tree: ContextTree) -> None:
        if tree.fingerprint != self.fingerprint:
            raise ContextMismatchError(
                f"this context tree was encoded by base model {tree.fingerprint}, not {self.fingerprint}; encode it again with this model"
            )
        mine = self.config.lower_signature()
        theirs = {"chunk_size": tree.chunk_size, "tree_height": tree.tree_height, "node_keep": tree.node_keep, "sampling": tree.sampling}
        diff = {k: (theirs[k], mine[k]) for k in theirs if theirs[k] != mine[k]}
        if diff:
            raise ContextMismatchError(f"context tree options differ from this model's config (tree, model): {diff}; encode it again")

    def encode(self, context: ContextLike, *, precompute: bool = True, show_progress: bool = False) -> ContextTree:
        """Tokenize a context and, with ``precompute``, encode every node of every chunk's tree once."""
        tree = self.context_tree(context)
        if precompute and not tree.precomputed and tree.n_tokens:
            with torch.no_grad():
                self.encoder.encode_tree(tree, show_progress=show_progress)
        return tree

    # ------------------------------------------------------------------ selection and injection
    def query_keys(self, input_ids: torch.Tensor, query_lengths: Sequence[int]) -> torch.Tensor:
        """``(B, hidden)`` query keys: last query token after layer 1 (without injection) + final norm."""
        keys = []
        with torch.no_grad():
            for row, n in zip(input_ids, query_lengths):
                _, _, first = self.encoder.run(row[:n].reshape(1, -1), 1)
                keys.append(self.base.model.norm(first[:, -1]).float()[0])
        return torch.stack(keys)

    def span_text(self, tree: ContextTree, start: int, end: int) -> str:
        """Text of the tree's tokens ``[start, end)``: a slice of its text when it has offsets, else decoded."""
        chars = tree.char_span(start, end) if tree.text is not None else None
        if chars is not None:
            return tree.text[chars[0] : chars[1]]  # type: ignore[index]
        return self._require_tokenizer().decode(tree.input_ids[start:end].tolist(), skip_special_tokens=True)

    def tree_lexicon(self, tree: ContextTree) -> BM25:
        """BM25 statistics over the text of the tree's chunks (what the ``lexical`` policy scores nodes under)."""
        return BM25([self.span_text(tree, s, e) for s, e in tree.spans])

    def select(
        self,
        tree: ContextTree,
        query_key: torch.Tensor | None,
        *,
        chunks: Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        query_text: str | None = None,
        lexicon: BM25 | None = None,
    ) -> list[tuple[tuple[int, int, int], tuple[int, int], NodeStates]]:
        """Walk the trees of ``chunks`` (all by default) and return the preserved nodes with their states.

        ``query_key`` serves the ``query`` policy; ``query_text`` the ``lexical`` one, scored under ``lexicon``
        (default: BM25 statistics of the tree's chunks)."""
        cfg = self.config
        spans = tree.spans
        chunk_ids = range(len(spans)) if chunks is None else chunks
        if generator is None:
            if self.training:
                # one stream for the whole run: fresh split noise and coin flips at every step
                if self._train_generator is None:
                    self._train_generator = torch.Generator().manual_seed(cfg.seed)
                generator = self._train_generator
            else:  # inference: the same query over the same tree selects the same nodes every time
                generator = torch.Generator().manual_seed(cfg.seed)
        noise = cfg.split_noise if (self.training and not tree.precomputed) else 0.0
        ids = tree.input_ids

        scores_fn = None
        if cfg.policy == "query":
            if query_key is None:
                raise ValueError("the 'query' policy needs a query key")
            if tree.precomputed:
                def scores_fn(node_ids, node_spans):
                    return cosine_scores(query_key, torch.stack([tree.nodes[n].key for n in node_ids]))
            else:
                def scores_fn(node_ids, node_spans):
                    return cosine_scores(query_key, self.encoder.node_keys(ids, node_spans))
        elif cfg.policy == "lexical":
            if query_text is None:
                raise ValueError("the 'lexical' policy needs the query text")
            lexicon = lexicon if lexicon is not None else self.tree_lexicon(tree)

            def scores_fn(node_ids, node_spans):
                return lexicon.scores(query_text, [self.span_text(tree, s, e) for s, e in node_spans])

        chooser = make_chooser(cfg.policy, scores_fn=scores_fn, generator=generator)
        walk = walk_trees({c: spans[c] for c in chunk_ids}, cfg.tree_height, chooser, split_noise=noise, generator=generator)
        nodes = walk.nodes()
        if tree.precomputed:
            states = [tree.nodes[n] for n, _ in nodes]
        else:
            states = self.encoder.encode_spans(ids, [span for _, span in nodes])
        return [(n, span, st) for (n, span), st in zip(nodes, states)]

    def prepare_injection(
        self,
        context: ContextLike | Sequence[ContextLike],
        input_ids: torch.Tensor,
        *,
        query_length: int | Sequence[int] | None = None,
        labels: torch.Tensor | None = None,
        chunks: Sequence[int] | Sequence[Sequence[int]] | None = None,
        generator: torch.Generator | None = None,
        query_text: str | Sequence[str] | None = None,
    ) -> Injection | None:
        """Select nodes for each row's query and assemble the injected states (None when nothing to inject).

        With the ``lexical`` policy each row's ``query_text`` (default: its query tokens decoded) is scored
        against node texts."""
        cfg = self.config
        input_ids = torch.as_tensor(input_ids).to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        batch, length = input_ids.shape
        if isinstance(context, (list, tuple)) and context and not isinstance(context[0], int):
            contexts = list(context)
            if len(contexts) != batch:
                raise ValueError(f"got {len(contexts)} contexts for a batch of {batch}")
        else:
            contexts = [context] * batch
        trees = [self.context_tree(c) for c in contexts]
        shared = all(t is trees[0] for t in trees)
        qlens = _query_lengths(batch, length, query_length, labels)
        qkeys = self.query_keys(input_ids, qlens) if cfg.policy == "query" else None
        row_chunks = _row_chunks(chunks, batch)
        texts: list[str | None] = [None] * batch
        if cfg.policy == "lexical":
            if query_text is None:
                tok = self._require_tokenizer()
                texts = [tok.decode(input_ids[b, : qlens[b]].tolist(), skip_special_tokens=True) for b in range(batch)]
            else:
                texts = [query_text] * batch if isinstance(query_text, str) else list(query_text)
                if len(texts) != batch:
                    raise ValueError(f"got {len(texts)} query texts for a batch of {batch}")

        # one set of BM25 statistics per distinct tree, however many rows read it
        lexicons = {id(t): self.tree_lexicon(t) for t in trees} if cfg.policy == "lexical" else {}
        rows: list[list[tuple[tuple[int, int, int], tuple[int, int], NodeStates]]] = []
        if shared and qkeys is None and row_chunks[0] == row_chunks[-1] and cfg.policy != "lexical":
            rows = [self.select(trees[0], None, chunks=row_chunks[0], generator=generator)] * batch
        else:
            for b in range(batch):
                rows.append(
                    self.select(
                        trees[b], None if qkeys is None else qkeys[b], chunks=row_chunks[b], generator=generator,
                        query_text=texts[b], lexicon=lexicons.get(id(trees[b])),
                    )
                )
        if all(not r for r in rows):
            return None
        return self._assemble(rows)

    def assemble_injection(self, rows) -> Injection:
        """Injected states from nodes chosen by the caller (e.g. across many documents, see `ContextIndex`).

        ``rows``: per batch row, a list of ``(node_id, token_span, NodeStates)`` with ``node_id = (chunk, level,
        index)``; chunk positions follow the order of ``chunk`` (rank among the row's chunks), so number chunks in
        document order. Each row's `InjectedNode` provenance is kept in ``Injection.nodes``.
        """
        if not rows or all(not r for r in rows):
            raise ValueError("nothing to inject: every row is empty")
        return self._assemble(rows)

    def _assemble(self, rows) -> Injection:
        cfg = self.config
        device, dtype = self.device, self.dtype
        m = cfg.injection_layers
        per_row_k, per_row_v, per_row_pos, provenance = [], [], [], []
        for selected in rows:
            order = sorted(selected, key=lambda item: (item[0][0], item[1][0]))
            chunk_rank = {c: r for r, c in enumerate(sorted({n[0] for n, _, _ in order}))}
            ks, vs, pos, prov = [], [], [], []
            offset = 0
            for (c, level, index), (s, e), st in order:
                n = st.n_states
                ks.append(st.keys)
                vs.append(st.values)
                pos.append(torch.full((n,), chunk_rank[c], dtype=torch.long))
                prov.append(InjectedNode(c, level, index, s, e, n, offset))
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
        _, hkv, _, d = ref.shape
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
        return Injection(
            keys=[keys[:, i] for i in range(m)],
            values=[values[:, i] for i in range(m)],
            key_pos=key_pos if cfg.positions == "chunk" else None,
            query_pos=n_chunks,
            key_mask=None if bool(mask.all()) else mask,
            nodes=provenance,
        )

    # ------------------------------------------------------------------ forward
    def _check_length(self, length: int) -> None:
        if self.max_positions and length > self.max_positions:
            raise PromptTooLongError(
                f"the prompt has {length} tokens but the base model's window is {self.max_positions}; "
                "put long text into the context (it is compressed into the tree), not into the prompt"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        context: ContextLike | Sequence[ContextLike] | None = None,
        labels: torch.Tensor | None = None,
        *,
        attention_mask: torch.Tensor | None = None,
        query_length: int | Sequence[int] | None = None,
        injection: Injection | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        position_ids: torch.Tensor | None = None,
    ):
        """Run the upper model on ``input_ids (B, T)`` reading ``context`` through injected states.

        The query representation of each row uses only its first ``query_length`` tokens; by default the
        whole input, or, with ``labels``, the tokens before the first scored one. Returns the base model's
        ``CausalLMOutputWithPast`` (with ``loss`` when ``labels`` are given).
        """
        input_ids = torch.as_tensor(input_ids).to(self.device)
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        past = 0 if past_key_values is None else int(past_key_values.get_seq_length())
        self._check_length(past + input_ids.shape[1])
        if injection is None and context is not None:
            injection = self.prepare_injection(context, input_ids, query_length=query_length, labels=labels)
        kwargs: dict[str, Any] = {}
        if past_key_values is not None:
            kwargs[self._cache_kw] = past_key_values
        if labels is not None:
            kwargs["labels"] = torch.as_tensor(labels).to(self.device)
        if position_ids is not None:
            kwargs["position_ids"] = torch.as_tensor(position_ids).to(self.device)
        with injecting(injection):
            return self.base(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs
            )

    # ------------------------------------------------------------------ generation
    def chat_prompt_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` (``{"role", "content"}`` dicts) in the base model's chat template, ready for
        the assistant's turn. A tokenizer without a template gets a plain ``Role: text`` transcript."""
        tok = self._require_tokenizer()
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
            if hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return [int(i) for i in ids]
        lines = (f"{m['role'].capitalize()}: {m['content']}" for m in messages)
        return [int(i) for i in tok("\n".join(lines) + "\nAssistant:", add_special_tokens=True)["input_ids"]]

    def _prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor, chat: bool, system: str | None) -> torch.Tensor:
        if isinstance(prompt, str):
            tok = self._require_tokenizer()
            if chat and getattr(tok, "chat_template", None):
                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
                ids = self.chat_prompt_ids(messages)
            else:
                ids = tok(prompt, add_special_tokens=True)["input_ids"]
        else:
            ids = prompt
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1).to(self.device)
        if ids.shape[1] == 0:
            raise ValueError("the prompt is empty")
        return ids

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (getattr(self.base, "generation_config", None), self.base.config, self.tokenizer):
            value = getattr(src, "eos_token_id", None) if src is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    def stream(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        *,
        context: ContextLike | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        stop: Sequence[str] | str = (),
        seed: int | None = None,
        chat: bool = True,
        system: str | None = None,
        stats: dict[str, Any] | None = None,
        injection: Injection | None = None,
    ) -> Iterator[str]:
        """Yield the answer's text as it is decoded. Injected states are built once from the prompt, or given
        ready as ``injection`` (e.g. by `ContextIndex`; then ``context`` must be None)."""
        if injection is not None and context is not None:
            raise ValueError("give either context= or injection=, not both")
        opts = SamplingOptions(max_new_tokens, temperature, top_k, top_p, seed, stop)
        stats = {} if stats is None else stats
        t0 = time.perf_counter()
        ids = self._prompt_ids(prompt, chat, system)
        self._check_length(ids.shape[1] + opts.max_new_tokens)
        tree = None
        if context is not None:
            tree = self.context_tree(context)
            with torch.no_grad():
                injection = self.prepare_injection(tree, ids, query_text=prompt if isinstance(prompt, str) else None)
        t_inject = time.perf_counter()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        row = RowDecoder(opts, self._eos_ids(), self.tokenizer, generator)
        with torch.no_grad():
            out = self.forward(ids, injection=injection, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter()
            while not row.done:
                delta = row.push(out.logits[:, -1])
                if delta:
                    yield delta
                if row.done:
                    break
                token = torch.tensor([[row.generated[-1]]], device=self.device)
                out = self.forward(token, injection=injection, past_key_values=_output_cache(out), use_cache=True, logits_to_keep=1)
            tail = row.finish()
            if tail:
                yield tail
        generated, first_token_at = row.generated, row.first_token_at
        end = time.perf_counter()
        stats.update(
            {
                "prompt_tokens": int(ids.shape[1]),
                "generated_tokens": len(generated),
                "context_tokens": 0 if tree is None else tree.n_tokens,
                "chunks": 0 if tree is None else tree.n_chunks,
                "injected_states": 0 if injection is None else injection.n_states,
                "injected_nodes": [] if injection is None else [vars(n) for n in injection.nodes[0]],
                "token_ids": generated,
                "timings": {
                    "inject_s": t_inject - t0,
                    "prefill_s": t_prefill - t_inject,
                    "first_token_s": (first_token_at or end) - t0,
                    "decode_s": end - t_prefill,
                    "total_s": end - t0,
                    "tokens_per_s": len(generated) / max(end - t_prefill, 1e-9),
                },
            }
        )

    def complete(self, prompt: str | Sequence[int] | torch.Tensor, **kwargs: Any) -> Completion:
        """Generate and return the text with token ids, statistics and timings (see `stream` for options)."""
        stats: dict[str, Any] = {}
        text = "".join(self.stream(prompt, stats=stats, **kwargs))
        timings = stats.pop("timings", {})
        token_ids = stats.pop("token_ids", [])
        return Completion(text=text, token_ids=token_ids, stats=stats, timings=timings)

    def complete_batch(
        self,
        prompts: Sequence[str | Sequence[int] | torch.Tensor],
        *,
        injections: Sequence[Injection | None] | None = None,
        options: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        chat: bool = True,
        system: str | None = None,
    ) -> list[Completion]:
        """Answer several prompts in one batched prefill and one batched decoding loop.

        Row ``i`` reads its own injected states ``injections[i]`` (a one-row `Injection`, e.g. from
        `prepare_injection` or `ContextIndex`; None reads nothing) and has its own sampling ``options[i]``
        (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``stop``, ``seed``; one dict applies to all).
        Prompts are left-padded and given explicit positions, so each row's answer is the one `complete` gives
        for it alone, up to the floating-point order of batched sums. Decoding runs until every row has ended
        (end of sequence, a stop string or its own ``max_new_tokens``); ended rows are carried along unread.
        """
        n = len(prompts)
        if n == 0:
            return []
        injections = [None] * n if injections is None else list(injections)
        if len(injections) != n:
            raise ValueError(f"got {len(injections)} injections for {n} prompts")
        if options is None or isinstance(options, dict):
            options = [dict(options or {})] * n
        if len(options) != n:
            raise ValueError(f"got {len(options)} option dicts for {n} prompts")
        opts = []
        for o in options:
            unknown = sorted(set(o) - SAMPLING_FIELDS)
            if unknown:
                raise TypeError(f"unknown generation options {unknown}; known: {sorted(SAMPLING_FIELDS)}")
            opts.append(SamplingOptions(**{"max_new_tokens": 256, **o}))
        t0 = time.perf_counter()
        rows = [self._prompt_ids(p, chat, system)[0] for p in prompts]
        for ids, o in zip(rows, opts):
            self._check_length(ids.numel() + o.max_new_tokens)
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        eos = self._eos_ids()
        pad = int(pad if pad is not None else (min(eos) if eos else 0))
        width = max(r.numel() for r in rows)
        input_ids = torch.full((n, width), pad, dtype=torch.long, device=self.device)
        mask = torch.zeros(n, width, dtype=torch.long, device=self.device)
        for b, r in enumerate(rows):
            input_ids[b, width - r.numel() :] = r
            mask[b, width - r.numel() :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        injection = Injection.stack(injections)
        decoders = [RowDecoder(o, eos, tok, torch.Generator().manual_seed(o.seed) if o.seed is not None else None) for o in opts]
        texts = [""] * n
        end_at: list[float | None] = [None] * n
        t_inject = time.perf_counter()
        with torch.no_grad():
            out = self.forward(input_ids, attention_mask=mask, position_ids=positions, injection=injection, use_cache=True, logits_to_keep=1)
            t_prefill = time.perf_counter()
            while not all(d.done for d in decoders):
                logits = out.logits[:, -1]
                step_tokens = torch.full((n, 1), pad, dtype=torch.long, device=self.device)
                for b, d in enumerate(decoders):
                    if d.done:
                        continue
                    texts[b] += d.push(logits[b : b + 1])
                    if not d.done:
                        step_tokens[b, 0] = d.generated[-1]
                now = time.perf_counter()
                for b, d in enumerate(decoders):
                    if d.done and end_at[b] is None:
                        end_at[b] = now
                if all(d.done for d in decoders):
                    break
                mask = torch.cat([mask, mask.new_ones(n, 1)], dim=1)
                positions = positions[:, -1:] + 1
                out = self.forward(
                    step_tokens, attention_mask=mask, position_ids=positions, injection=injection,
                    past_key_values=_output_cache(out), use_cache=True, logits_to_keep=1,
                )  # rows that have ended are carried along; what they read is never used
        end = time.perf_counter()
        results = []
        for b, d in enumerate(decoders):
            texts[b] += d.finish()
            row_end = end_at[b] or end
            stats = {
                "prompt_tokens": int(rows[b].numel()),
                "generated_tokens": len(d.generated),
                "injected_states": 0 if injections[b] is None else injections[b].n_states,
                "injected_nodes": [] if injections[b] is None or not injections[b].nodes else [vars(x) for x in injections[b].nodes[0]],
                "batch_size": n,
            }
            timings = {
                "inject_s": t_inject - t0,
                "prefill_s": t_prefill - t_inject,
                "first_token_s": (d.first_token_at or row_end) - t0,
                "decode_s": row_end - t_prefill,
                "total_s": row_end - t0,
                "tokens_per_s": len(d.generated) / max(row_end - t_prefill, 1e-9),
            }
            results.append(Completion(text=texts[b], token_ids=d.generated, stats=stats, timings=timings))
        return results

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, *, context: ContextLike | None = None, **kwargs: Any) -> str:
        """The answer to ``prompt`` reading ``context`` (greedy by default). Options: ``max_new_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``stop``, ``seed``, ``chat``, ``system``."""
        return self.complete(prompt, context=context, **kwargs).text


# ---------------------------------------------------------------------- helpers
_SHARED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_SHARED_LOCK = threading.Lock()


class TextTreeCache:
    """Context trees encoded once per (model, text): a small thread-safe LRU for applications that ask many
    questions about the same few texts (a chat model with a bound document, a notebook).

    Trees are encoded with ``precompute=True`` (every node of every chunk), so any later question about the
    same text injects states without running the lower model again. ``size=0`` keeps nothing.

    >>> cache = TextTreeCache(size=4)
    >>> tree = cache.tree(llm, text)      # encodes
    >>> tree is cache.tree(llm, text)     # a hit: the same tree
    True
    """

    def __init__(self, size: int = 8) -> None:
        if size < 0:
            raise ValueError(f"TextTreeCache size must be >= 0, got {size}")
        self.size = size
        # (id(model), sha256 of the text) -> (weak reference to the model, tree); the reference guards against a
        # new model that reuses a collected one's id
        self._trees: OrderedDict[tuple[int, str], tuple[weakref.ref, ContextTree]] = OrderedDict()
        self._lock = threading.Lock()
        self.encoded = 0  # texts encoded (misses)
        self.hits = 0

    def __len__(self) -> int:
        return len(self._trees)

    def clear(self) -> None:
        with self._lock:
            self._trees.clear()

    def tree(self, llm: SharedLLM, text: str) -> ContextTree:
        """The encoded tree of ``text`` for ``llm`` (encoding it on a miss)."""
        if not isinstance(text, str):
            raise TypeError(f"TextTreeCache caches text contexts; got {type(text).__name__}")
        key = (id(llm), hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest())
        with self._lock:
            entry = self._trees.get(key)
            if entry is not None and entry[0]() is llm:
                self._trees.move_to_end(key)
                self.hits += 1
                return entry[1]
        tree = llm.encode(text, precompute=True)  # outside the lock: encoding may take seconds
        with self._lock:
            self.encoded += 1
            if self.size:
                self._trees[key] = (weakref.ref(llm), tree)
                while len(self._trees) > self.size:
                    self._trees.popitem(last=False)
        return tree


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _query_lengths(batch: int, length: int, query_length, labels) -> list[int]:
    if query_length is not None:
        qls = [int(query_length)] * batch if isinstance(query_length, int) else [int(q) for q in query_length]
    elif labels is not None:
        labels = torch.as_tensor(labels)
        qls = []
        for row in labels.reshape(batch, -1):
            scored = (row[1:] != -100).nonzero()
            # logits at t predict token t+1: tokens from the first scored one on never reach the query
            qls.append(int(scored[0]) + 1 if scored.numel() else length)
    else:
        qls = [length] * batch
    if len(qls) != batch or any(not 1 <= q <= length for q in qls):
        raise ValueError(f"query lengths must be in [1, {length}] for each of {batch} rows, got {qls}")
    return qls


def _row_chunks(chunks, batch: int) -> list[Sequence[int] | None]:
    if chunks is None:
        return [None] * batch
    if chunks and isinstance(chunks[0], (list, tuple)):
        if len(chunks) != batch:
            raise ValueError(f"got chunk lists for {len(chunks)} rows, batch is {batch}")
        return list(chunks)
    return [chunks] * batch


def _read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterMismatchError(f"{directory} is not a sharedctx adapter: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(path.read_text())
        meta["config"], meta["base_fingerprint"]
    except (ValueError, KeyError) as exc:
        raise AdapterMismatchError(f"{path} is not a valid sharedctx adapter config: {exc}") from exc
    return meta


def _merge_configs(saved: SharedCtxConfig, given: SharedCtxConfig | None, where: Path) -> SharedCtxConfig:
    """The adapter's config, with runtime options taken from ``given``; shape-changing differences are refused."""
    if given is None:
        return saved
    for name in ADAPTER_FIELDS:
        if getattr(given, name) != getattr(saved, name):
            raise AdapterMismatchError(
                f"config.{name}={getattr(given, name)!r} is incompatible with the adapter in {where} "
                f"({name}={getattr(saved, name)!r}); leave it at the adapter's value"
            )
    changed = [f for f in LOWER_FIELDS if getattr(given, f) != getattr(saved, f)]
    if changed:
        logger.warning("using options %s that differ from those the adapter in %s was trained with", changed, where)
    return given
