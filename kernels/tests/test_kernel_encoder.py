"""The core's lower encoder with the fused sampling gather gives the trees it gives with ``index_select``."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from sharedctx import SharedCtxConfig, SharedLLM
from sharedctx_kernels import sample_kv


def _llm(device):
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval().to(device)
    return SharedLLM.from_model(model, config=SharedCtxConfig(injection_layers=2, chunk_size=48, tree_height=3, node_keep=5, policy="query"))


def test_fused_sampling_in_the_encoder_equals_index_select(device):
    llm = _llm(device)
    ids = torch.randint(3, 300, (130,), generator=torch.Generator().manual_seed(1))  # 3 chunks, the last one short
    llm.encoder.sample_kv = None
    reference = llm.encode(ids)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return sample_kv(*args, **kwargs)

    llm.encoder.sample_kv = counting
    fused = llm.encode(ids)
    assert calls, "the fused sampler was not used"
    assert reference.nodes.keys() == fused.nodes.keys()
    full = 0
    for node, st in reference.nodes.items():
        got = fused.nodes[node]
        for a, b in ((st.keys, got.keys), (st.values, got.values), (st.key, got.key)):
            assert (a is None and b is None) or torch.equal(a, b), node
        full += st.keys is not None
    assert full == 3 * (2 + 4 + 8)  # every node below each chunk root (h = 3) went through the gather
