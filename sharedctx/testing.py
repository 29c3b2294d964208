"""Tiny random models for tests: every supported family, built locally (no download), with a byte-level tokenizer.

For the test suites of sharedctx and of the integrations, and for anyone testing code built on sharedctx without
the default model::

    from sharedctx.testing import make_llm
    llm = make_llm("qwen3", gates=1.0)   # a SharedLLM whose cross-attention is switched on

The models have random weights: their outputs mean nothing, but every invariant of the library (identity at
initialisation, decoding equal to a full forward, save/load round trips) holds for them as for a real model.
"""

from __future__ import annotations

import torch

__all__ = ["ARCHS", "VOCAB", "tiny_config", "tiny_model", "byte_tokenizer", "make_llm", "set_gates", "random_ids", "GenerationSpy"]

ARCHS = ("llama", "mistral", "qwen2", "qwen3")
VOCAB = 300


def tiny_config(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[arch]
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=2,
        bos_token_id=1,
        pad_token_id=0,
    )
    if arch == "qwen2":
        kw["attention_bias"] = True  # Qwen2 has q/k/v biases
    kw.update(overrides)
    return cls(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), attn_implementation="eager")
    return model.eval()


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (bytes 0-255 -> ids 3-258) and a ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "<|im_end|>": 2}
    for i, ch in enumerate(sorted(alphabet)):
        vocab[ch] = 3 + i
    vocab["<|im_start|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    return fast


def make_llm(arch: str = "llama", *, seed: int = 0, gates: float | None = None, tokenizer=True, **cfg):
    """A SharedLLM over a tiny model; ``gates`` sets every gate and randomises any upper-layer LoRA (None keeps the
    identity initialisation)."""
    from sharedctx import SharedCtxConfig, SharedLLM

    defaults = dict(injection_layers=2, chunk_size=32, tree_height=3, node_keep=4)
    if not tokenizer:  # the default lexical walk reads the question's text: without a tokenizer, walk by keys
        defaults["policy"] = "query"
    defaults.update(cfg)
    llm = SharedLLM.from_model(tiny_model(arch, seed), byte_tokenizer() if tokenizer else None, config=SharedCtxConfig(**defaults))
    if gates is not None:
        set_gates(llm, gates)
    return llm


def set_gates(llm, value: float) -> None:
    with torch.no_grad():
        for i, block in enumerate(llm.injection):
            block.gate.fill_(value * (1 + 0.25 * i))
            # a trained adapter does not equal the layer's own attention; perturb so tests see real effects
            g = torch.Generator().manual_seed(100 + i)
            if hasattr(block.q_proj, "lora_b"):  # a low-rank delta over the layer's own projection (cross_rank > 0)
                block.q_proj.lora_b.copy_(torch.randn(block.q_proj.lora_b.shape, generator=g) * 0.5)
            else:
                block.q_proj.weight.add_(torch.randn(block.q_proj.weight.shape, generator=g) * 0.5)
        for i, lora in enumerate(getattr(llm, "upper_lora", ())):  # upper-layer low-rank updates, when configured
            g = torch.Generator().manual_seed(200 + i)
            lora.lora_b.copy_(torch.randn(lora.lora_b.shape, generator=g) * 0.3)


def random_ids(n: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g)


class GenerationSpy:
    """Records what `SharedLLM.stream_completion` (behind every answer: `generate`, `stream`, `ContextIndex.query`, both
    integrations) is given, as ``{"prompt": ..., **keywords}`` per call, while used as a context manager::

        with GenerationSpy(llm) as spy:
            index.query("...")
        spy.calls[0]["injection"], spy.text(0)

    A prompt of token ids is recorded as a list of ints; a text prompt as the text."""

    def __init__(self, llm) -> None:
        self.llm, self.calls = llm, []

    def __enter__(self) -> GenerationSpy:
        original = self.llm.stream_completion

        def stream(prompt, **kw):
            recorded = prompt if isinstance(prompt, str) else torch.as_tensor(prompt).reshape(-1).tolist()
            self.calls.append({"prompt": recorded, **kw})
            return original(prompt, **kw)

        self.llm.stream_completion = stream
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.stream_completion

    def text(self, i: int = 0) -> str:
        """The prompt of call ``i`` as text (token ids decoded with the model's tokenizer)."""
        prompt = self.calls[i]["prompt"]
        return prompt if isinstance(prompt, str) else self.llm.tokenizer.decode(prompt)
