"""Adapter files: what `SharedLLM.save_pretrained` writes and `load_adapter` reads (only the new parameters,
peft-style), the configuration merge when loading, and the adapter shipped for the default model.

An adapter built with ``cross_rank = r`` stores its cross-attention projections as rank-``r`` deltas over each layer's
own ``q_proj``/``o_proj`` (``N.q_proj.lora_a``, ``N.q_proj.lora_b``...); one with full projections (``cross_rank = 0``,
every adapter before issue 25) stores them whole and still loads as before. `save_low_rank_adapter` turns the latter
into the former by truncated SVD."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Protocol

import torch

from ._version import __version__
from .base_model import DEFAULT_MODEL_NAME
from .config import ADAPTER_FIELDS, DEFAULT_POLICY, LOWER_FIELDS, SharedCtxConfig
from .errors import AdapterMismatchError



class SharedLLM(Protocol):
    """What adapter files read and set on a `sharedctx.SharedLLM` (model.py imports this module, so not the class):
    its options, base model and fingerprint, the cross-attention blocks and their tensors, and what was loaded."""

    config: SharedCtxConfig
    base: Any
    fingerprint: str
    injection: Any
    adapter_trained: bool
    adapter_path: str | None
    adapter_policy: str | None

    def adapter_state_dict(self) -> dict[str, torch.Tensor]: ...

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "default_adapter_path",
    "save_adapter",
    "save_low_rank_adapter",
    "low_rank_state",
    "load_adapter",
    "read_adapter_config",
    "merge_configs",
]

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "sharedctx_adapter.json"
ADAPTER_WEIGHTS = "adapter.safetensors"
_DEFAULT_ADAPTER = Path(__file__).parent / "adapters" / "smollm2-135m-instruct"


def default_adapter_path() -> Path | None:
    """The adapter shipped for the default model, when one ships."""
    return _DEFAULT_ADAPTER if (_DEFAULT_ADAPTER / ADAPTER_CONFIG).is_file() else None


def save_adapter(llm: SharedLLM, directory: str | os.PathLike) -> None:
    """Write only the new parameters: ``sharedctx_adapter.json`` + ``adapter.safetensors``."""
    _write(llm, directory, llm.adapter_state_dict(), llm.config)


def _write(llm: SharedLLM, directory: str | os.PathLike, state: dict[str, torch.Tensor], config: SharedCtxConfig) -> None:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    meta = {
        "sharedctx_version": __version__,
        "base_fingerprint": llm.fingerprint,
        "base_model_type": llm.base.config.model_type,
        "base_name_or_path": getattr(llm.base.config, "_name_or_path", "") or DEFAULT_MODEL_NAME,
        "config": config.to_dict(),
        "trained": llm.adapter_trained,
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def low_rank_state(llm: SharedLLM, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The adapter of ``llm`` (full projections, ``cross_rank = 0``) as rank-``rank`` deltas over each layer's own
    ``q_proj``/``o_proj`` (truncated SVD of ``W_adapter - W_layer``, the singular values split evenly between the two
    factors), in the layout of a model built with ``cross_rank = rank``; and, per projection, the relative error
    ``|D - BA| / |D|`` of the delta ``D`` it keeps (0 when the delta has rank <= ``rank``)."""
    if llm.config.cross_rank:
        raise ValueError(f"this adapter already stores rank-{llm.config.cross_rank} deltas; save it with save_pretrained")
    if rank < 1:
        raise ValueError(f"the rank of the stored deltas must be >= 1, got {rank}")
    state = dict(llm.adapter_state_dict())
    errors: dict[str, float] = {}
    for i, block in enumerate(llm.injection):
        own = llm.base.model.layers[i].layer.self_attn
        for name in ("q_proj", "o_proj"):
            full, base = getattr(block, name), getattr(own, name)
            if full.bias is not None and not torch.equal(full.bias, base.bias):
                raise ValueError(f"block {i}'s {name} has a trained bias, which low-rank deltas cannot keep; save the full adapter")
            state.pop(f"{i}.{name}.bias", None)
            delta = (state.pop(f"{i}.{name}.weight") - base.weight).float()
            u, sv, vh = torch.linalg.svd(delta, full_matrices=False)
            root = sv[:rank].sqrt()
            b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
            state[f"{i}.{name}.lora_a"] = a.to(full.weight.dtype)
            state[f"{i}.{name}.lora_b"] = b.to(full.weight.dtype)
            norm = float(delta.norm())
            errors[f"{i}.{name}"] = float((delta - b @ a).norm()) / norm if norm else 0.0
    return state, errors


def save_low_rank_adapter(llm: SharedLLM, directory: str | os.PathLike, rank: int) -> dict[str, float]:
    """Write the adapter of ``llm`` (full projections) as rank-``rank`` deltas (`low_rank_state`): a folder that loads
    on a model built with ``cross_rank = rank``. Returns the relative error of each kept delta."""
    state, errors = low_rank_state(llm, rank)
    _write(llm, directory, state, llm.config.replace(cross_rank=rank))
    return errors

def load_adapter(llm: SharedLLM, directory: str | os.PathLike) -> None:
    """Load adapter weights saved by `save_pretrained`, refusing one made for another base model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_adapter_config(directory)
    if meta["base_fingerprint"] != llm.fingerprint:
        raise AdapterMismatchError(
            f"the adapter in {directory} was made for base model {meta['base_fingerprint']} "
            f"({meta.get('base_name_or_path', '?')}), but this base model is {llm.fingerprint}. "
            "Load it on the base model it was trained for, or train one for this model (`sharedctx train`)."
        )
    saved = SharedCtxConfig.from_dict(meta["config"])
    for name in ADAPTER_FIELDS:
        if getattr(saved, name) != getattr(llm.config, name):
            raise AdapterMismatchError(
                f"the adapter in {directory} has {name}={getattr(saved, name)!r} but this model has "
                f"{name}={getattr(llm.config, name)!r}; build the model with the adapter's configuration"
            )
    path = directory / ADAPTER_WEIGHTS
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise AdapterMismatchError(f"cannot read adapter weights {path}: {exc}") from exc
    expected = llm.adapter_state_dict()
    if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in expected):
        raise AdapterMismatchError(f"the adapter weights in {path} do not match this model's adapter shapes (cross-attention, upper LoRA)")
    with torch.no_grad():
        for k, v in state.items():
            expected[k].copy_(v.to(expected[k].dtype))
    llm.adapter_trained = bool(meta.get("trained", True))
    llm.adapter_path = str(directory)
    llm.adapter_policy = saved.policy


def read_adapter_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterMismatchError(f"{directory} is not a sharedctx adapter: {ADAPTER_CONFIG} is missing")
    try:
        meta = json.loads(path.read_text())
        meta["config"], meta["base_fingerprint"]
    except (ValueError, KeyError) as exc:
        raise AdapterMismatchError(f"{path} is not a valid sharedctx adapter config: {exc}") from exc
    return meta


def merge_configs(saved: SharedCtxConfig, given: SharedCtxConfig | None, where: Path) -> SharedCtxConfig:
    """The adapter's config, with runtime options taken from ``given``; shape-changing differences are refused.

    The walk policy is a runtime option like the others: without ``given`` it is `DEFAULT_POLICY`, not the policy
    the adapter was trained with (the shipped adapter's ``right`` walk picks the same nodes whatever the question);
    pass ``SharedCtxConfig(policy=...)`` to use another."""
    if given is None:
        return saved.replace(policy=DEFAULT_POLICY)
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
