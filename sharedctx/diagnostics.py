"""Measurement helpers: what benchmarks, notebooks and recipes need beyond the application API, in one documented
place. Scripts outside the library (benchmarks/, cookbook/, recipes/, examples/) import from `sharedctx`, its
public modules and this one, never from private names.

- `base_model_only` (a context manager): the plain base model inside the block (no injection), for baselines;
- `base_forward`: one forward of the plain base model with its key/value cache, whatever the installed
  transformers calls that argument (``cache`` or ``past_key_values``), and no window check;
- the evaluations: `eval_ppl`, `eval_passkey` (`sharedctx.training.evaluate`) and `eval_reading`
  (`sharedctx.training.reading`);
- `sharedctx_home`: where sharedctx keeps converted models and downloads;
- `read_document`: a text file read as `ContextIndex.add` reads it (`InputError` for binary or non-UTF-8 files);
- `DocumentRecord`: the record an index keeps per document (token ids, offsets, chunk bounds, root keys), for
  benchmarks that build large synthetic corpora without encoding them.
"""

from __future__ import annotations

from typing import Any

import torch

from .base_model import sharedctx_home
from .encoder import cache_kwarg
from .index.documents import _Doc as DocumentRecord
from .index.documents import read_document
from .injection import injection_disabled as base_model_only
from .training.evaluate import eval_passkey, eval_ppl
from .training.reading import eval_reading

__all__ = [
    "base_model_only",
    "base_forward",
    "eval_ppl",
    "eval_passkey",
    "eval_reading",
    "sharedctx_home",
    "read_document",
    "DocumentRecord",
]


def base_forward(llm: Any, input_ids: torch.Tensor, *, cache: Any = None, **kwargs: Any) -> Any:
    """The plain base model of ``llm`` (a `SharedLLM`) on ``input_ids (B, T)``, reading and extending ``cache`` (a
    transformers ``Cache``) when given; ``kwargs`` go to the base model's forward (``use_cache``, ``logits_to_keep``,
    ...). Returns its output."""
    if cache is not None:
        kwargs[cache_kwarg(llm.base.forward)] = cache
    with base_model_only():
        return llm.base(input_ids=input_ids.to(llm.device), **kwargs)
