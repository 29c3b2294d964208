"""SharedLLM: one causal LM reading long contexts through its own compressed states."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from . import generation
from .adapter_files import ADAPTER_CONFIG, ADAPTER_WEIGHTS, default_adapter_path, load_adapter, merge_configs, read_adapter_config, save_adapter
from .base_model import base_fingerprint, check_supported, load_base_model, load_once
from .config import SharedCtxConfig
from .encoder import LowerEncoder, cache_kwarg
from .errors import PromptTooLongError
from .generation import CompletionStream, GenerationRequest, SamplingOptions
from .injection import Injection, attach, attach_upper_lora, injecting
from .ops.scoring import BM25
from .policy import Selection, make_chooser, make_scorer, query_lengths, row_chunks, walk_trees
from .stats import Completion
from .tree import ContextTree

__all__ = ["SharedLLM", "Completion", "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "default_adapter_path"]  # Completion: see stats

logger = logging.getLogger(__name__)

ContextLike = ContextTree | str | Sequence[int] | torch.Tensor


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
        self.injection = attach(model, self.config.injection_layers, gate=self.config.gate, backend=self.config.attn_backend,
                                null_kv=self.config.null_kv, rank=self.config.cross_rank)
        # empty unless config.upper_lora_rank > 0: low-rank updates of the upper layers, active only under injection
        self.upper_lora = attach_upper_lora(model, self.config.injection_layers, self.config.upper_lora_rank)
        self.encoder = LowerEncoder(model, self.config)
        self._cache_kw = cache_kwarg(model.forward)
        self.adapter_trained = False
        self.adapter_path: str | None = None
        #: the walk policy the loaded adapter was trained with (None without one); `config.policy` is the one in use
        self.adapter_policy: str | None = None
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
        saved = read_adapter_config(adapter_dir)
        merged = merge_configs(SharedCtxConfig.from_dict(saved["config"]), config, adapter_dir)
        llm = cls(model, tokenizer, config=merged)
        llm.load_adapter(adapter_dir)
        return llm

    @classmethod
    def shared(cls, base: str | os.PathLike | None = None, **options: Any) -> SharedLLM:
        """`from_pretrained` (same arguments) once per process for these options: later calls return the same model
        while any caller still holds it (a weak cache, so the weights go when the last user drops them). Thread-safe.

        This is how the LangChain and LlamaIndex integrations load models: several chat models, LLMs and
        indexes built with the same options share one copy of the weights.
        """
        logger.debug("SharedLLM.shared base=%s options=%s", base or "<default>", options)
        return load_once((base, *(x for k in sorted(options) for x in (k, options[k]))), lambda: cls.from_pretrained(base, **options))

    # ------------------------------------------------------------------ adapters
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write only the new parameters: ``sharedctx_adapter.json`` + ``adapter.safetensors``."""
        save_adapter(self, directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load adapter weights saved by `save_pretrained`, refusing one made for another base model."""
        load_adapter(self, directory)

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
        """A lazy tree (tokens only, with character offsets for text) for text or token ids under this model's
        options; a `ContextTree` is checked against this model (`ContextMismatchError`) and returned as it is."""
        if isinstance(context, ContextTree):
            context.check(self.fingerprint, self.config.lower_signature())
            return context
        text = offsets = None
        if isinstance(context, str):
            text, enc = context, self._require_tokenizer()(context, add_special_tokens=False, return_offsets_mapping=True)
            ids = torch.tensor(enc["input_ids"], dtype=torch.long)
            offsets = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
        else:
            ids = torch.as_tensor(context, dtype=torch.long).reshape(-1).cpu()
        vocab, cfg = self.base.config.vocab_size, self.config
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise ValueError(f"context token ids must lie in [0, {vocab}); got [{int(ids.min())}, {int(ids.max())}]")
        return ContextTree(input_ids=ids, chunk_size=cfg.chunk_size, tree_height=cfg.tree_height, node_keep=cfg.node_keep,
                           sampling=cfg.sampling, fingerprint=self.fingerprint, text=text, offsets=offsets)

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
        return self.encoder.query_keys(input_ids, query_lengths)

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
        expand_margin: float | None = None,
    ) -> Selection:
        """Walk the trees of ``chunks`` (all by default) and return the preserved nodes with their states.

        ``query_key`` serves the ``query`` policy; ``query_text`` the ``lexical`` one, scored under ``lexicon``
        (default: BM25 statistics of the tree's chunks). ``expand_margin`` expands both children of a split whose
        scores are that close."""
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

        def keys_of(node_ids, node_spans):
            if tree.precomputed:
                return torch.stack([tree.nodes[n].key for n in node_ids])
            return self.encoder.node_keys(ids, node_spans)

        if cfg.policy == "lexical" and lexicon is None and query_text is not None:
            lexicon = self.tree_lexicon(tree)
        scorer = make_scorer(
            cfg.policy, query_key=query_key, keys_of=keys_of, query_text=query_text, lexicon=lexicon,
            text_of=lambda node, span: self.span_text(tree, *span),
        )
        chooser = make_chooser(cfg.policy, scorer=scorer, generator=generator, expand_margin=expand_margin)
        selection = walk_trees({c: spans[c] for c in chunk_ids}, cfg.tree_height, chooser, split_noise=noise, generator=generator)
        if tree.precomputed:
            for node in selection:
                node.states = tree.nodes[node.node_id]
        else:
            for node, st in zip(selection, self.encoder.encode_spans(ids, selection.spans)):
                node.states = st
        return selection

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
        qlens = query_lengths(batch, length, query_length, labels)
        qkeys = self.query_keys(input_ids, qlens) if cfg.policy == "query" else None
        walked = row_chunks(chunks, batch)
        texts: list[str | None] = [None] * batch
        if cfg.policy == "lexical":
            if query_text is None:
                if self.tokenizer is None:
                    raise ValueError(
                        "the lexical policy (the default) scores node text for the question's words, and this SharedLLM has "
                        "no tokenizer to read the question's token ids: pass query_text=, build it with a tokenizer, or use "
                        "a key-based walk: SharedCtxConfig(policy='query')"
                    )
                tok = self.tokenizer
                texts = [tok.decode(input_ids[b, : qlens[b]].tolist(), skip_special_tokens=True) for b in range(batch)]
            else:
                texts = [query_text] * batch if isinstance(query_text, str) else list(query_text)
                if len(texts) != batch:
                    raise ValueError(f"got {len(texts)} query texts for a batch of {batch}")

        # one set of BM25 statistics per distinct tree, however many rows read it
        lexicons = {id(t): self.tree_lexicon(t) for t in trees} if cfg.policy == "lexical" else {}
        rows: list[Selection] = []
        if shared and qkeys is None and walked[0] == walked[-1] and cfg.policy != "lexical":
            rows = [self.select(trees[0], None, chunks=walked[0], generator=generator)] * batch
        else:
            for b in range(batch):
                rows.append(
                    self.select(
                        trees[b], None if qkeys is None else qkeys[b], chunks=walked[b], generator=generator,
                        query_text=texts[b], lexicon=lexicons.get(id(trees[b])),
                    )
                )
        if all(not r for r in rows):
            return None
        return self.assemble_injection(rows)

    def assemble_injection(self, rows) -> Injection:
        """Injected states from nodes chosen by the caller (e.g. across many documents, see `ContextIndex`):
        per batch row, a `Selection` or list of `SelectedNode` (see `Injection.from_nodes`)."""
        return Injection.from_nodes(rows, device=self.device, dtype=self.dtype, chunk_positions=self.config.positions == "chunk")

    # ------------------------------------------------------------------ forward
    def check_length(self, length: int) -> None:
        """Raise `PromptTooLongError` when ``length`` tokens (prompt + tokens to generate) exceed the model's window."""
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
        self.check_length(past + input_ids.shape[1])
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
        return generation.chat_prompt_ids(self._require_tokenizer(), messages)

    def prompt_ids(self, prompt: str | Sequence[int] | torch.Tensor, *, chat: bool = True, system: str | None = None) -> torch.Tensor:
        """``(1, T)`` token ids the model reads for ``prompt``: text in the chat template (``chat``, with an optional
        ``system`` message) or as plain text; token ids as given."""
        tok = self._require_tokenizer() if isinstance(prompt, str) else None
        return generation.prompt_ids(tok, prompt, chat=chat, system=system).to(self.device)

    def eos_ids(self) -> set[int]:
        """Token ids that end an answer (from the generation config, the model config and the tokenizer)."""
        return generation.eos_ids(getattr(self.base, "generation_config", None), self.base.config, self.tokenizer)

    def request(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        *,
        context: ContextLike | None = None,
        injection: Injection | None = None,
        options: SamplingOptions | None = None,
        chat: bool = True,
        system: str | None = None,
    ) -> GenerationRequest:
        """``prompt`` made ready to decode, tokenised and checked once (`sharedctx.generation.make_request`), reading
        ``context`` (nodes selected for the prompt and injected here) or a ready ``injection``, not both."""
        if injection is not None and context is not None:
            raise ValueError("give either context= or injection=, not both")
        ready = generation.make_request(self, prompt, injection=injection, options=options, chat=chat, system=system)
        if context is None:
            return ready
        t0 = time.perf_counter()
        tree = self.context_tree(context)
        with torch.no_grad():
            injection = self.prepare_injection(tree, ready.ids[None], query_text=prompt if isinstance(prompt, str) else None)
        return dataclasses.replace(ready, injection=injection, prepare_s=ready.prepare_s + time.perf_counter() - t0,
                                   context_tokens=tree.n_tokens, chunks=tree.n_chunks)

    def stream(
        self,
        prompt: str | Sequence[int] | torch.Tensor,
        *,
        context: ContextLike | None = None,
        injection: Injection | None = None,
        chat: bool = True,
        system: str | None = None,
        stats: dict[str, Any] | None = None,
        **options: Any,
    ) -> Iterator[str]:
        """Yield the answer's text as it is decoded. Injected states are built once from the prompt, or given
        ready as ``injection`` (e.g. by `ContextIndex`; then ``context`` must be None). ``options`` are the fields of
        `SamplingOptions` (``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``stop``, ``seed``,
        ``no_repeat_ngram_size``, ``stop_on_repeat``: the guards against loops), with its defaults
        (`sharedctx.config.DEFAULT_MAX_NEW_TOKENS`, `DEFAULT_STOP_ON_REPEAT`); an unknown one
        raises TypeError. ``stats``, when given, receives `Completion.report()` at the end (statistics,
        ``token_ids``, ``timings``)."""
        run = self.stream_completion(prompt, context=context, injection=injection, options=generation.sampling_options(options),
                                     chat=chat, system=system)
        yield from run
        if stats is not None and run.completion is not None:
            stats.update(run.completion.report())

    def stream_completion(self, prompt: str | Sequence[int] | torch.Tensor, **request: Any) -> CompletionStream:
        """Like `stream`, but the returned iterator holds the typed `Completion` once exhausted (``.completion``);
        ``request`` takes the keyword arguments of `request` (``context``, ``injection``, ``options``, ``chat``, ``system``)."""
        return generation.stream(self, self.request(prompt, **request))

    def complete(self, prompt: str | Sequence[int] | torch.Tensor, **kwargs: Any) -> Completion:
        """Generate and return the text with token ids, statistics and timings (see `stream` for options)."""
        if "stats" in kwargs:
            raise TypeError("complete() returns its statistics in the Completion; stats= is for stream()")
        sampling = {k: kwargs.pop(k) for k in list(kwargs) if k in generation.SAMPLING_FIELDS}
        run = self.stream_completion(prompt, options=SamplingOptions(**sampling), **kwargs)
        for _ in run:
            pass
        assert run.completion is not None
        return run.completion

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
        (fields of `SamplingOptions`; one dict applies to all). Each row's answer is the one `complete` gives for
        it alone, up to the floating-point order of batched sums (`sharedctx.generation.decode`, the one loop).
        """
        return generation.complete_batch(self, prompts, injections=injections, options=options, chat=chat, system=system)

    def generate(self, prompt: str | Sequence[int] | torch.Tensor, *, context: ContextLike | None = None, **kwargs: Any) -> str:
        """The answer to ``prompt`` reading ``context`` (greedy by default). Options: ``max_new_tokens``,
        ``temperature``, ``top_k``, ``top_p``, ``stop``, ``seed``, ``chat``, ``system``."""
        return self.complete(prompt, context=context, **kwargs).text
