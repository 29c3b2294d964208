"""Precomputed distillation teachers on disk: safetensors shards and a JSON manifest, never a pickle.

A folder of teacher shards (written by `teacher.precompute_teacher`, read by the trainer through `TeacherStore`)::

    manifest.json                  format, the settings that shape the teacher and the draws, one entry per shard
    teacher-00000.safetensors      the teachers of a run of consecutive distill examples
    teacher-00001.safetensors      ...

Each example is keyed by `teacher_key`: a hash of what the teacher reads (``[context ; window]``) and of the window's
length, so a trainer finds an example's teacher whatever step it is drawn at (and after a resume), and an example the
shards do not hold is simply a miss. A shard holds, for every scored position of each of its examples, the
teacher's top-k token ids and log-probabilities and the log of the remaining mass (`objectives.TeacherTopK`)::

    indices   (P, k) int32    token ids, most probable first
    logprobs  (P, k) float32  their log-probabilities under the full softmax
    log_tail  (P,)   float32  log(1 - sum(exp(logprobs)))
    positions (P,)   int32    the window position of each row
    offsets   (n + 1,) int64  rows offsets[j]:offsets[j + 1] belong to example j
    lengths   (n,)   int64    each example's window length T
    keys      (n, 16) uint8   each example's `teacher_key` (also listed in the manifest)

The manifest records each shard's SHA-256; a shard whose bytes differ is refused by the trainer and rewritten by a
resumed precomputation, and a file that is neither the manifest nor a shard (a planted pickle) is refused by both.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TeacherMismatchError, TeacherShardError
from .data import Example
from .objectives import TeacherTopK, scored_positions, teacher_inputs

__all__ = [
    "FORMAT",
    "MANIFEST",
    "TeacherStore",
    "decode_generator_state",
    "encode_generator_state",
    "precision_settings",
    "prepare_directory",
    "read_manifest",
    "sampler_settings",
    "shard_name",
    "teacher_key",
    "teacher_settings",
    "write_manifest",
    "write_shard",
]

logger = logging.getLogger(__name__)

FORMAT = "sharedctx-teacher-1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"teacher-\d{5}\.safetensors")
_HOW = "sharedctx train teacher --config RECIPE --out {dir}"


def teacher_key(example: Example) -> str:
    """The key of an example's teacher: SHA-256 (first 32 hex digits) of the context and window lengths and of the
    token ids the teacher reads, ``[context ; window]``."""
    ids = teacher_inputs(example).detach().to("cpu", torch.int64).numpy().astype("<i8")
    h = hashlib.sha256(FORMAT.encode())
    h.update(np.array([example.context.numel(), example.input_ids.numel()], dtype="<i8").tobytes())
    h.update(ids.tobytes())
    return h.hexdigest()[:32]


# ---------------------------------------------------------------------- settings recorded in the manifest
def teacher_settings(llm: Any, config: Any) -> dict[str, Any]:
    """What shapes a stored teacher: the base model (its fingerprint), top-k, tail, window, context chunks and the
    chunk size. Shards are refused by a trainer whose settings differ in any of them."""
    return {
        "fingerprint": llm.fingerprint,
        "top_k": int(config.distill_top_k),
        "tail": config.distill_tail,
        "window": list(config.window_range) if isinstance(config.window, (list, tuple)) else int(config.window),
        "context_chunks": [int(c) for c in config.context_chunks],
        "chunk_size": int(llm.config.chunk_size),
    }


def sampler_settings(config: Any, data_dir: str | os.PathLike) -> dict[str, Any]:
    """What decides which examples a trainer draws: the seed, the task mix, the batch layout, the builders' options,
    the adapter configuration (its walks draw reconstruction spans) and the token shards (their manifest's hash)."""
    manifest = Path(data_dir) / "manifest.json"
    data = hashlib.sha256(manifest.read_bytes()).hexdigest()[:16] if manifest.is_file() else None
    return _jsonable({
        "seed": config.seed,
        "tasks": dict(sorted(config.tasks.items())),
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "task_chunks": list(config.task_chunks),
        "recon_span": config.recon_span,
        "recon_level": config.recon_level,
        "recon_marker": config.recon_marker,
        "instruction_file": config.instruction_file,
        "init_adapter": config.init_adapter,
        "sharedctx": dict(sorted(config.sharedctx.items())),
        "data": data,
    })


def precision_settings(llm: Any, config: Any) -> dict[str, Any]:
    """Where and in what precision the teacher ran (a trainer elsewhere gets these values, not its own: logged)."""
    device = torch.device(llm.device)
    autocast = "bf16" if config.autocast_dtype(device.type) is not None else "none"
    return {"device": device.type, "dtype": str(llm.dtype).replace("torch.", ""), "autocast": autocast}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _differences(have: dict[str, Any], want: dict[str, Any]) -> list[str]:
    return [f"{k} {have.get(k)!r} (this run: {v!r})" for k, v in want.items() if have.get(k) != v]


# ---------------------------------------------------------------------- files
def shard_name(index: int) -> str:
    return f"teacher-{index:05d}.safetensors"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encode_generator_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def decode_generator_state(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def write_shard(directory: Path, index: int, entries: list[tuple[Example, TeacherTopK]]) -> dict[str, Any]:
    """Write the teachers of ``entries`` (each ``(example, TeacherTopK (1, T, k))``) at their scored positions to
    ``directory / shard_name(index)`` (through a temporary file swapped in); returns its manifest entry."""
    from safetensors.torch import save_file

    rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
    offsets, lengths, keys = [0], [], []
    for ex, t in entries:
        pos = scored_positions(ex.labels[None])[0].nonzero()[:, 0].cpu()  # (P_j,)
        idx, lp, tail = t.indices[0].cpu(), t.logprobs[0].float().cpu(), t.log_tail[0].float().cpu()
        rows.append((idx[pos].to(torch.int32), lp[pos], tail[pos], pos.to(torch.int32)))
        offsets.append(offsets[-1] + pos.numel())
        lengths.append(ex.input_ids.numel())
        keys.append(teacher_key(ex))
    tensors = {
        "indices": torch.cat([r[0] for r in rows]).contiguous(),  # (P, k)
        "logprobs": torch.cat([r[1] for r in rows]).contiguous(),  # (P, k)
        "log_tail": torch.cat([r[2] for r in rows]).contiguous(),  # (P,)
        "positions": torch.cat([r[3] for r in rows]).contiguous(),  # (P,)
        "offsets": torch.tensor(offsets, dtype=torch.int64),  # (n + 1,)
        "lengths": torch.tensor(lengths, dtype=torch.int64),  # (n,)
        "keys": torch.tensor([list(bytes.fromhex(k)) for k in keys], dtype=torch.uint8),  # (n, 16)
    }
    name = shard_name(index)
    tmp = directory / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": FORMAT})  # one metadata entry: the file's bytes are reproducible
    os.replace(tmp, directory / name)
    return {"file": name, "sha256": _sha256(directory / name), "examples": len(entries), "keys": keys}


def read_manifest(directory: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except ValueError as exc:
        raise TeacherShardError(f"{path} is not readable JSON ({exc}); delete {directory} and precompute again") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TeacherShardError(f"{path} is not a manifest of teacher shards ({FORMAT}); point teacher_dir at a folder `{_HOW.format(dir='DIR')}` wrote")
    return manifest


def write_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, directory / MANIFEST)


def _foreign_files(directory: Path) -> list[str]:
    """Names in ``directory`` that are neither the manifest nor a shard (nor their temporary files)."""
    ok = (MANIFEST, MANIFEST + ".tmp")
    return sorted(
        p.name for p in directory.iterdir()
        if not (p.is_file() and (p.name in ok or _SHARD.fullmatch(p.name.removesuffix(".tmp"))))
    )


def _refuse_foreign(directory: Path) -> None:
    foreign = _foreign_files(directory)
    if foreign:
        raise TeacherShardError(
            f"{directory} holds files that are not teacher shards: {foreign}; refusing it (sharedctx never loads a pickle, "
            "and only manifest.json and teacher-NNNNN.safetensors belong there). Remove them, or use another folder"
        )


def prepare_directory(directory: Path, settings: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """Open ``directory`` for a (resumed) precomputation with ``settings`` (``teacher``, ``sampler``, ``precision``):
    a new manifest, or the existing one when its settings are these; shards whose checksum differs are dropped with
    every shard after them (their draws are made again), files of torn writes removed. Returns the manifest and how
    many shards were dropped. Raises TeacherMismatchError for shards of other settings, TeacherShardError for files
    that are not shards."""
    directory.mkdir(parents=True, exist_ok=True)
    _refuse_foreign(directory)
    manifest = read_manifest(directory)
    settings = _jsonable(settings)
    if manifest is None:
        manifest = {"format": FORMAT, **settings, "shards": []}
    else:
        diff = [f"{part}: {d}" for part in ("teacher", "sampler", "precision") for d in _differences(manifest.get(part, {}), settings[part])]
        if diff:
            raise TeacherMismatchError(
                f"{directory} holds teacher shards of other settings ({'; '.join(diff)}); resuming would mix two recipes. "
                "Use another --out folder, or delete this one to start again"
            )
    kept: list[dict[str, Any]] = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file() or _sha256(path) != entry["sha256"]:
            logger.warning("%s is missing or damaged (its checksum differs from the manifest): rewriting it and the shards after it", path)
            break
        kept.append(entry)
    dropped = len(manifest["shards"]) - len(kept)
    manifest["shards"] = kept
    listed = {MANIFEST} | {e["file"] for e in kept}
    for p in directory.iterdir():
        if p.name not in listed:  # a torn write (a shard the manifest never listed), a temporary file, a dropped shard
            p.unlink()
    write_manifest(directory, manifest)
    return manifest, dropped


# ---------------------------------------------------------------------- reading
class TeacherStore:
    """The teachers in a folder of shards, looked up by `teacher_key`; every shard's checksum is checked on opening.

    Raises TeacherShardError when the folder holds no manifest, a shard is missing or damaged, or a file is not
    its own."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        if not self.dir.is_dir() or (manifest := read_manifest(self.dir)) is None:
            raise TeacherShardError(f"{self.dir} holds no teacher shards; precompute them with `{_HOW.format(dir=self.dir)}`")
        _refuse_foreign(self.dir)
        self.manifest = manifest
        self._where: dict[str, tuple[int, int]] = {}
        for i, entry in enumerate(manifest["shards"]):
            path = self.dir / entry["file"]
            if not path.is_file() or _sha256(path) != entry["sha256"]:
                raise TeacherShardError(
                    f"{path} is missing or damaged (its checksum differs from {self.dir / MANIFEST}); refusing it. "
                    f"Run `{_HOW.format(dir=self.dir)}` again with the same recipe: it rewrites that shard"
                )
            for j, key in enumerate(entry["keys"]):
                self._where.setdefault(key, (i, j))
        self._cache: dict[int, dict[str, torch.Tensor]] = {}

    def __len__(self) -> int:
        return len(self._where)

    def check(self, llm: Any, config: Any, data_dir: str | os.PathLike) -> None:
        """Refuse (TeacherMismatchError) shards made by another base model or with another top-k, tail, window,
        context chunks or chunk size; warn when they were drawn by another recipe or from other token shards than
        those in ``data_dir`` (most lookups will miss) or ran in another precision."""
        diff = _differences(self.manifest.get("teacher", {}), _jsonable(teacher_settings(llm, config)))
        if diff:
            raise TeacherMismatchError(
                f"the teacher shards in {self.dir} were made with {'; '.join(diff)}; precompute shards for this model and "
                f"recipe (`{_HOW.format(dir='NEW_DIR')}`) or drop teacher_dir to compute the teacher on the fly"
            )
        sampler = _differences(self.manifest.get("sampler", {}), sampler_settings(config, data_dir))
        if sampler:
            logger.warning("the teacher shards in %s were drawn by another recipe (%s): expect misses, computed on the fly", self.dir, "; ".join(sampler))
        prec = _differences(self.manifest.get("precision", {}), precision_settings(llm, config))
        if prec:
            logger.warning("the teacher shards in %s were computed in another precision (%s); hits use the stored values", self.dir, "; ".join(prec))

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._cache:
            from safetensors.torch import load_file

            path = self.dir / self.manifest["shards"][i]["file"]
            try:
                tensors = load_file(str(path))
            except Exception as exc:
                raise TeacherShardError(f"{path} cannot be read as a teacher shard ({exc}); run `{_HOW.format(dir=self.dir)}` again") from exc
            self._cache = {i: tensors}  # shards are read in draw order: keep one
        return self._cache[i]

    def get(self, example: Example, device: torch.device | str = "cpu") -> TeacherTopK | None:
        """The stored teacher of ``example`` as a `TeacherTopK` ``(1, T, k)`` on ``device``, or None on a miss.
        Positions that are not scored hold placeholders (as `TeacherTopK.stack`'s padding): the loss never reads them."""
        where = self._where.get(teacher_key(example))
        if where is None:
            return None
        s = self._shard(where[0])
        j = where[1]
        a, b = int(s["offsets"][j]), int(s["offsets"][j + 1])
        length, k = int(s["lengths"][j]), s["indices"].shape[-1]
        pos = s["positions"][a:b].long()
        idx = torch.zeros(1, length, k, dtype=torch.long)
        lp = torch.full((1, length, k), -math.log(k))
        tail = torch.full((1, length), float("-inf"))
        idx[0, pos], lp[0, pos], tail[0, pos] = s["indices"][a:b].long(), s["logprobs"][a:b], s["log_tail"][a:b]
        return TeacherTopK(idx.to(device), lp.to(device), tail.to(device))
