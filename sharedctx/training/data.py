"""Training and evaluation data: token shards with a manifest, split by file, and example builders.

Text files (or directories of them, or a Hugging Face dataset) are tokenised into flat ``uint16``/``uint32``
shards; ``manifest.json`` records every document's split, shard, offset and length, so a document is
either wholly in ``train`` or wholly in ``eval``. Example builders turn tokens into what a training step
consumes: an `Example` of context ids (the long part, compressed into the tree), input ids (the
decoder's window or prompt + answer) and labels (``-100`` where nothing is scored).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

__all__ = [
    "DEFAULT_HOLDOUT",
    "STDLIB_TEXTS",
    "read_eval_text",
    "Example",
    "TokenShards",
    "build_shards",
    "iter_text_files",
    "iter_hf_dataset",
    "lm_example",
    "passkey_example",
    "kv_example",
    "needle_example",
    "chunk_mention_example",
    "instruction_example",
    "TASKS",
]

logger = logging.getLogger(__name__)

#: files of ../shared/data never trained on (evaluation only), relative to the data root
DEFAULT_HOLDOUT = ("books/pride_and_prejudice.txt", "math/pari_usersch4.tex", "code/cpython_email.py.txt")
MANIFEST = "manifest.json"
IGNORE = -100

#: long evaluation texts from the running interpreter's standard library, none of them in ../shared/data (so
#: never trained on): held-out code longer than ``code/cpython_email.py.txt`` (about 96K tokens), for 128K
STDLIB_TEXTS = {
    "stdlib:code": ("_pydecimal.py", "turtle.py", "tkinter/__init__.py", "pydoc.py", "doctest.py"),
    "stdlib:code-control": (
        "ipaddress.py", "difflib.py", "enum.py", "mailbox.py", "locale.py",
        "optparse.py", "pickle.py", "threading.py", "shutil.py", "configparser.py",
    ),
}


def read_eval_text(name: str, root: str | os.PathLike | None = None) -> tuple[str, dict[str, Any]]:
    """The text of an evaluation source and where it came from.

    ``name`` is a `STDLIB_TEXTS` name (modules of the running Python, joined; the Python version is recorded
    since they change between versions), a path, or a file relative to ``root`` (e.g. ../shared/data).
    The record always has the text's SHA-256.
    """
    import sys
    import sysconfig

    info: dict[str, Any] = {}
    if name in STDLIB_TEXTS:
        lib = Path(sysconfig.get_paths()["stdlib"])
        text = "\n\n".join((lib / m).read_text(encoding="utf-8") for m in STDLIB_TEXTS[name])
        info = {"python": sys.version.split()[0], "modules": list(STDLIB_TEXTS[name])}
    else:
        path = Path(name)
        if not path.is_file() and root is not None:
            path = Path(root) / name
        if not path.is_file():
            raise FileNotFoundError(f"no evaluation text {name!r} (looked in {root or 'the current folder'})")
        text = path.read_text(encoding="utf-8")
    return text, {**info, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest()}


# ---------------------------------------------------------------------- sources
def iter_text_files(sources: Sequence[str | os.PathLike]) -> Iterator[tuple[str, Path]]:
    """Yield ``(name, path)`` for each file, or each file under each directory (sorted; hidden files and
    README/LICENSE files skipped). ``name`` is relative to the directory it was found under."""
    for src in sources:
        src = Path(src)
        if src.is_file():
            yield src.name, src
        elif src.is_dir():
            for path in sorted(p for p in src.rglob("*") if p.is_file()):
                rel = path.relative_to(src).as_posix()
                if any(part.startswith(".") for part in path.relative_to(src).parts):
                    continue
                if path.stem.upper() in ("README", "LICENSE", "COPYING"):
                    continue
                yield rel, path
        else:
            raise FileNotFoundError(f"{src}: no such file or directory to tokenise")


def iter_hf_dataset(name: str, *, split: str = "train", text_field: str = "text", limit: int | None = None, **kwargs: Any):
    """Yield ``(name, text)`` from a Hugging Face dataset (needs the optional package ``datasets``)."""
    try:
        import datasets
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("reading a Hugging Face dataset needs `pip install datasets`") from exc
    ds = datasets.load_dataset(name, split=split, streaming=True, **kwargs)
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            break
        yield f"{name}/{split}/{i}", row[text_field]


# ---------------------------------------------------------------------- shards
def build_shards(
    sources: Sequence[str | os.PathLike] | Iterable[tuple[str, str]],
    tokenizer: Any,
    out_dir: str | os.PathLike,
    *,
    holdout: Sequence[str] = DEFAULT_HOLDOUT,
    shard_tokens: int = 1 << 24,
    append_eos: bool = True,
) -> dict[str, Any]:
    """Tokenise documents into ``train-NNNNN.bin`` / ``eval-NNNNN.bin`` shards and write ``manifest.json``.

    Args:
        sources: files or directories, or an iterable of ``(name, text)`` pairs (e.g. `iter_hf_dataset`).
        holdout: document names (as `iter_text_files` names them) that go to the ``eval`` split; a name
            that matches no document raises, so a typo never silently trains on evaluation text.
    Returns the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = int(len(tokenizer))
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = getattr(tokenizer, "eos_token_id", None)
    holdout = set(holdout)
    docs: list[dict[str, Any]] = []
    shards: list[dict[str, Any]] = []
    writers: dict[str, dict[str, Any]] = {}

    def pairs() -> Iterator[tuple[str, str]]:
        seq = list(sources) if not isinstance(sources, (str, os.PathLike)) else [sources]
        if seq and isinstance(seq[0], tuple):
            yield from seq  # type: ignore[misc]
            return
        from ..index.documents import read_document

        for name, path in iter_text_files(seq):  # type: ignore[arg-type]
            yield name, read_document(path)

    def writer(split: str, n: int) -> dict[str, Any]:
        w = writers.get(split)
        if w is None or (w["tokens"] and w["tokens"] + n > shard_tokens):
            if w is not None:
                w["fh"].close()
            fname = f"{split}-{sum(s['split'] == split for s in shards):05d}.bin"
            w = {"file": fname, "fh": open(out / fname, "wb"), "tokens": 0, "index": len(shards)}
            shards.append({"file": fname, "split": split, "tokens": 0})
            writers[split] = w
        return w

    seen_holdout: set[str] = set()
    for name, text in pairs():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if append_eos and eos is not None:
            ids = list(ids) + [int(eos)]
        if not ids:
            continue
        split = "eval" if name in holdout else "train"
        if split == "eval":
            seen_holdout.add(name)
        arr = np.asarray(ids, dtype=dtype)
        w = writer(split, arr.size)
        w["fh"].write(arr.tobytes())
        docs.append(
            {
                "name": name,
                "split": split,
                "shard": w["file"],
                "start": w["tokens"],
                "length": int(arr.size),
                "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
            }
        )
        w["tokens"] += int(arr.size)
        shards[w["index"]]["tokens"] = w["tokens"]
    for w in writers.values():
        w["fh"].close()
    missing = sorted(holdout - seen_holdout)
    if missing:
        raise ValueError(f"held-out documents {missing} were not found among the sources; check the names (relative to the data folder)")
    manifest = {
        "version": 1,
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "vocab_size": vocab,
        "dtype": np.dtype(dtype).name,
        "eos_token_id": eos,
        "holdout": sorted(holdout),
        "shards": shards,
        "documents": docs,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    logger.info("wrote %d documents (%d tokens) into %d shards under %s", len(docs), sum(d["length"] for d in docs), len(shards), out)
    return manifest


class TokenShards:
    """Read-only view of shards written by `build_shards` (memory-mapped)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.dir} holds no {MANIFEST}; build shards with `sharedctx.data.build_shards` first")
        self.manifest = json.loads(path.read_text())
        self.dtype = np.dtype(self.manifest["dtype"])
        self._maps: dict[str, np.ndarray] = {}

    def documents(self, split: str | None = None) -> list[dict[str, Any]]:
        return [d for d in self.manifest["documents"] if split is None or d["split"] == split]

    def document(self, name: str) -> dict[str, Any]:
        for d in self.manifest["documents"]:
            if d["name"] == name:
                return d
        raise KeyError(f"no document {name!r} in {self.dir}")

    def tokens(self, doc: dict[str, Any] | str) -> np.ndarray:
        """The token ids of one document (a view into the shard)."""
        if isinstance(doc, str):
            doc = self.document(doc)
        shard = doc["shard"]
        if shard not in self._maps:
            self._maps[shard] = np.memmap(self.dir / shard, dtype=self.dtype, mode="r")
        return self._maps[shard][doc["start"] : doc["start"] + doc["length"]]

    def sample(self, length: int, rng: np.random.Generator, split: str = "train") -> np.ndarray:
        """``length`` consecutive tokens of one document of ``split``, drawn in proportion to document length."""
        return self.draw(length, rng, split)[0]

    def draw(self, length: int, rng: np.random.Generator, split: str = "train", *, exclude: str | None = None) -> tuple[np.ndarray, str]:
        """Like `sample`, with the name of the document drawn; ``exclude`` names a document never drawn (an
        unrelated context for a window of that document). Same draws as `sample` when nothing is excluded."""
        docs = [d for d in self.documents(split) if d["length"] >= length and d["name"] != exclude]
        if not docs:
            raise ValueError(f"no {split} document has {length} tokens{' besides ' + exclude if exclude else ''}; "
                             "use shorter sequences or add longer texts")
        sizes = np.array([d["length"] - length + 1 for d in docs], dtype=np.float64)
        doc = docs[int(rng.choice(len(docs), p=sizes / sizes.sum()))]
        start = int(rng.integers(0, doc["length"] - length + 1))
        return np.asarray(self.tokens(doc)[start : start + length], dtype=np.int64), doc["name"]


# ---------------------------------------------------------------------- examples
@dataclass
class Example:
    """One training sample: ``context (N,)`` for the tree, ``input_ids (T,)`` for the decoder, ``labels (T,)``."""

    context: torch.Tensor
    input_ids: torch.Tensor
    labels: torch.Tensor
    task: str = "lm"
    answer: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def query_length(self) -> int:
        """Tokens before the first scored one (what the query representation may see)."""
        scored = (self.labels[1:] != IGNORE).nonzero()
        return int(scored[0]) + 1 if scored.numel() else int(self.input_ids.numel())


def lm_example(tokens: Sequence[int] | np.ndarray, *, context_tokens: int) -> Example:
    """Continuation: the first ``context_tokens`` go to the tree, the rest is the window, scored everywhere
    but its first token (which alone forms the query)."""
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if not 0 <= context_tokens < ids.numel() - 1:
        raise ValueError(f"context_tokens={context_tokens} leaves no window in {ids.numel()} tokens")
    window = ids[context_tokens:].clone()
    labels = window.clone()
    labels[0] = IGNORE
    return Example(ids[:context_tokens].clone(), window, labels, task="lm")


def _chat_ids(tokenizer: Any, question: str, answer: str) -> tuple[list[int], list[int]]:
    """``(prompt_ids, answer_ids)`` in the tokenizer's chat format; the answer ends with EOS."""
    if getattr(tokenizer, "chat_template", None):
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
        if hasattr(prompt, "keys"):
            prompt = prompt["input_ids"]
    else:
        prompt = tokenizer(question + "\nAnswer: ", add_special_tokens=True)["input_ids"]
    ans = tokenizer(answer, add_special_tokens=False)["input_ids"]
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        ans = list(ans) + [int(eos)]
    return list(prompt), list(ans)


def instruction_example(tokenizer: Any, context: Sequence[int] | torch.Tensor, question: str, answer: str, *, task: str = "instruction", meta=None) -> Example:
    """The instruction goes to the decoder (and so to the query), the long part to the tree, loss on the answer only."""
    prompt, ans = _chat_ids(tokenizer, question, answer)
    ids = torch.tensor(prompt + ans, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    labels[len(prompt) :] = ids[len(prompt) :]
    return Example(torch.as_tensor(context, dtype=torch.long).reshape(-1), ids, labels, task=task, answer=answer, meta=dict(meta or {}))


def _splice(haystack: np.ndarray, needles: list[list[int]], depths: Sequence[float]) -> np.ndarray:
    """Insert token lists into ``haystack`` at fractional depths (keeping the total length of haystack + needles)."""
    parts, prev = [], 0
    n = len(haystack)
    for needle, depth in sorted(zip(needles, depths), key=lambda x: x[1]):
        at = max(prev, min(n, int(round(depth * n))))
        parts += [haystack[prev:at], np.asarray(needle, dtype=np.int64)]
        prev = at
    parts.append(haystack[prev:])
    return np.concatenate(parts)


def _haystack(filler: np.ndarray | None, length: int, tokenizer: Any, rng: np.random.Generator) -> np.ndarray:
    if filler is not None and len(filler) >= length:
        start = int(rng.integers(0, len(filler) - length + 1))
        return np.asarray(filler[start : start + length], dtype=np.int64)
    base = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
    unit = tokenizer(base, add_special_tokens=False)["input_ids"]
    reps = length // len(unit) + 1
    return np.asarray((unit * reps)[:length], dtype=np.int64)


def passkey_example(tokenizer: Any, rng: np.random.Generator, *, length: int, filler: np.ndarray | None = None, depth: float | None = None, digits: int = 5) -> Example:
    """A ``digits``-digit pass key hidden at ``depth`` (random when None) in about ``length`` tokens of filler."""
    key = str(int(rng.integers(10 ** (digits - 1), 10**digits)))
    depth = float(rng.random()) if depth is None else depth
    needle = tokenizer(f" The pass key is {key}. Remember it. {key} is the pass key. ", add_special_tokens=False)["input_ids"]
    hay = _haystack(filler, max(1, length - len(needle)), tokenizer, rng)
    ctx = _splice(hay, [needle], [depth])
    return instruction_example(tokenizer, ctx, "What is the pass key hidden in the text? Answer with the number only.", key, task="passkey", meta={"depth": depth, "key": key})


_WORDS = ("amber", "basalt", "cedar", "delta", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kestrel", "lumen", "marble", "nectar", "onyx", "pylon", "quartz", "raven", "sable", "tundra", "umber", "velvet", "willow", "zephyr")


def kv_example(tokenizer: Any, rng: np.random.Generator, *, length: int, filler: np.ndarray | None = None, pairs: int = 4) -> Example:
    """Key-value retrieval: several ``key -> value`` records in the filler; ask for one key's value."""
    keys = rng.choice(len(_WORDS), size=pairs, replace=False)
    values = [str(int(rng.integers(1000, 10000))) for _ in range(pairs)]
    needles = [tokenizer(f" The value of key {_WORDS[k]}-{i} is {v}. ", add_special_tokens=False)["input_ids"] for i, (k, v) in enumerate(zip(keys, values))]
    hay = _haystack(filler, max(1, length - sum(map(len, needles))), tokenizer, rng)
    ctx = _splice(hay, needles, sorted(rng.random(pairs).tolist()))
    ask = int(rng.integers(0, pairs))
    return instruction_example(
        tokenizer, ctx, f"What is the value of key {_WORDS[keys[ask]]}-{ask}? Answer with the number only.", values[ask], task="kv", meta={"pairs": pairs}
    )


_CITIES = ("Oslo", "Lima", "Hanoi", "Accra", "Quito", "Perth", "Riga", "Dakar", "Tunis", "Bergen", "Cusco", "Nantes")
_THINGS = ("lantern", "bicycle", "teapot", "compass", "violin", "kite", "ledger", "anchor")
_COLOURS = ("green", "crimson", "silver", "orange", "violet", "golden", "teal", "white")


def needle_example(tokenizer: Any, rng: np.random.Generator, *, length: int, filler: np.ndarray | None = None) -> Example:
    """A needle sentence with a question about it (RULER-style single needle, words not digits)."""
    city, thing, colour = (_CITIES[int(rng.integers(len(_CITIES)))], _THINGS[int(rng.integers(len(_THINGS)))], _COLOURS[int(rng.integers(len(_COLOURS)))])
    needle = tokenizer(f" In {city}, the {thing} everyone talks about is {colour}. ", add_special_tokens=False)["input_ids"]
    hay = _haystack(filler, max(1, length - len(needle)), tokenizer, rng)
    ctx = _splice(hay, [needle], [float(rng.random())])
    return instruction_example(tokenizer, ctx, f"What colour is the {thing} everyone talks about in {city}? Answer with one word.", colour, task="needle")


def chunk_mention_example(tokenizer: Any, rng: np.random.Generator, *, length: int, chunk_size: int, filler: np.ndarray | None = None) -> Example:
    """"Which chunk mentions X": a marker word placed in one of the context's chunks; answer its 1-based number."""
    n_chunks = max(1, length // chunk_size)
    which = int(rng.integers(0, n_chunks))
    word = f"{_WORDS[int(rng.integers(len(_WORDS)))]}{int(rng.integers(10, 100))}"
    needle = tokenizer(f" The secret word {word} appears here. ", add_special_tokens=False)["input_ids"]
    hay = _haystack(filler, n_chunks * chunk_size, tokenizer, rng)
    at = which * chunk_size + int(rng.integers(0, max(1, chunk_size - len(needle))))
    ctx = np.concatenate([hay[:at], np.asarray(needle, dtype=np.int64), hay[at + len(needle) :]])[: n_chunks * chunk_size]
    return instruction_example(
        tokenizer, ctx, f"The text has {n_chunks} parts of equal length. In which part (1 to {n_chunks}) does the secret word {word} appear? Answer with the number only.",
        str(which + 1), task="chunk_mention",
    )


#: synthetic task name -> builder(tokenizer, rng, length=, filler=, [chunk_size=])
TASKS = {"passkey": passkey_example, "kv": kv_example, "needle": needle_example, "chunk_mention": chunk_mention_example}
