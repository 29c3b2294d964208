"""Training checkpoints in a safe format: tensors in safetensors, everything else in JSON, never a pickle.

``out_dir/checkpoint/`` holds ``tensors.safetensors`` (trainable parameters ``param/<name>``, optimizer moments
``opt/<index>/<key>``, RNG states ``rng/torch`` and ``rng/gen``) and ``state.json`` (step, tokens, time, the NumPy RNG,
optimizer hyper-parameters and scalars, the training config). A resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT", "write_checkpoint", "read_checkpoint"]

CHECKPOINT = "checkpoint"  # a folder: tensors.safetensors + state.json (no pickle anywhere)
_LEGACY_CHECKPOINT = "checkpoint.pt"  # the old pickled format: refused, never loaded
_FILES = ("tensors.safetensors", "state.json")


def write_checkpoint(out: Path, state: dict[str, Any]) -> Path:
    """Write a trainer state (`Trainer.state_dict`) to ``out/checkpoint/``: written to a temporary folder and swapped
    in, so a crash never leaves half a checkpoint."""
    from safetensors.torch import save_file

    path = out / CHECKPOINT
    tmp = out / (CHECKPOINT + ".tmp")
    if tmp.exists():
        _remove_tree(tmp)
    tmp.mkdir(parents=True)
    tensors, meta = _flatten_state(state)
    save_file(tensors, str(tmp / "tensors.safetensors"), metadata={"format": "sharedctx-checkpoint-1"})
    (tmp / "state.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    old = out / (CHECKPOINT + ".old")
    if path.exists():
        if old.exists():
            _remove_tree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        _remove_tree(old)
    return path


def read_checkpoint(out: Path) -> dict[str, Any] | None:
    """The trainer state in ``out/checkpoint/``, or None when there is none. A pickled checkpoint (the old
    ``checkpoint.pt``, or any file a checkpoint folder should not hold) is refused with the reason."""
    from safetensors.torch import load_file

    legacy = out / _LEGACY_CHECKPOINT
    if legacy.exists():
        raise ValueError(
            f"{legacy} is a pickled checkpoint; sharedctx never unpickles (loading a pickle runs whatever code it holds). "
            f"Delete it and start again, or move it away; checkpoints are now the folder {out / CHECKPOINT} (safetensors + JSON)"
        )
    path = out / CHECKPOINT
    if not path.is_dir():
        return None
    unexpected = sorted(p.name for p in path.iterdir() if p.name not in _FILES)
    if unexpected:
        raise ValueError(f"the checkpoint {path} holds unexpected files {unexpected}; refusing to load it (only tensors.safetensors and state.json belong there)")
    try:
        tensors = load_file(str(path / "tensors.safetensors"))
        meta = json.loads((path / "state.json").read_text())
    except Exception as exc:
        raise ValueError(f"the checkpoint {path} is damaged ({exc}); delete it to start again") from exc
    return _unflatten_state(tensors, meta)


def _flatten_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split a trainer state into named tensors and JSON: parameters ``param/<name>``, optimizer moments
    ``opt/<index>/<key>``, RNG states ``rng/torch`` and ``rng/gen``."""
    tensors: dict[str, torch.Tensor] = {f"param/{n}": t.contiguous() for n, t in state["params"].items()}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, slots in state["optimizer"]["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                tensors[f"opt/{idx}/{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    tensors["rng/torch"] = state["torch_rng"].contiguous()
    tensors["rng/gen"] = state["gen"].contiguous()
    meta = {
        "format": "sharedctx-checkpoint-1",
        "step": state["step"],
        "tokens": state["tokens"],
        "elapsed": state["elapsed"],
        "rng": state["rng"],
        "config": state["config"],
        "param_groups": state["optimizer"]["param_groups"],
        "optimizer_scalars": opt_scalars,
    }
    return tensors, meta


def _unflatten_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    if meta.get("format") != "sharedctx-checkpoint-1":
        raise ValueError(f"unknown checkpoint format {meta.get('format')!r}")
    opt_state: dict[int, dict[str, Any]] = {}
    params: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        kind, _, rest = name.partition("/")
        if kind == "param":
            params[rest] = t
        elif kind == "opt":
            idx, _, key = rest.partition("/")
            opt_state.setdefault(int(idx), {})[key] = t
    for idx, scalars in meta.get("optimizer_scalars", {}).items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    return {
        "params": params,
        "optimizer": {"state": opt_state, "param_groups": meta["param_groups"]},
        "step": meta["step"],
        "tokens": meta["tokens"],
        "elapsed": meta["elapsed"],
        "rng": meta["rng"],
        "gen": tensors["rng/gen"],
        "torch_rng": tensors["rng/torch"],
        "config": meta["config"],
    }


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
