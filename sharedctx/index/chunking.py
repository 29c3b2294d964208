"""Chunking that is stable under local edits: content-defined chunk boundaries at line ends.

Fixed-count chunking (``tokens[i*C:(i+1)*C]``) shifts every chunk after an edit, so a changed paragraph would
re-encode the whole rest of a document. Here a document is cut into *units* (lines; a long line is cut at
whitespace, then hard), each unit is tokenized **on its own**, and units are packed into chunks of at most ``C``
tokens. A chunk closes

- before a unit that would make it longer than ``C`` tokens, or
- after a *boundary unit* once it holds at least ``min_fill * C`` tokens; whether a unit is a boundary depends
  only on its own tokens (a hash), so after an edit old and new chunkings meet again at the next boundary both
  reach, and every chunk from there on is identical (content-addressed: never encoded again).

A unit of more than ``C`` tokens is cut into windows of ``C`` tokens from its own start. Character offsets refer to
the original text, so citations point at exact spans.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch

__all__ = ["Chunk", "split_units", "chunk_text"]

_WS = re.compile(r"\s")


@dataclass
class Chunk:
    """One chunk of a document: token ids ``(n,)`` and each token's character span ``(n, 2)`` in the document."""

    ids: torch.Tensor
    offsets: torch.Tensor

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    @property
    def char_span(self) -> tuple[int, int]:
        return int(self.offsets[0, 0]), int(self.offsets[-1, 1])


def split_units(text: str, max_chars: int) -> Iterator[tuple[int, int]]:
    """Character spans ``[start, end)`` of the units of ``text``, in order, covering it exactly.

    A unit is a line with its newline; whitespace-only lines join the line before them; a unit longer than
    ``max_chars`` is cut at the last whitespace before the limit (or hard at the limit when there is none).
    """
    n = len(text)
    pos = 0
    while pos < n:
        nl = text.find("\n", pos)
        end = n if nl < 0 else nl + 1
        # absorb following blank lines, so a paragraph break stays with the paragraph it ends
        while end < n:
            nxt = text.find("\n", end)
            stop = n if nxt < 0 else nxt + 1
            if text[end:stop].strip():
                break
            end = stop
        while end - pos > max_chars:
            cut = pos + max_chars
            window = text[pos + max_chars // 2 : cut]
            ws = [m.end() for m in _WS.finditer(window)]
            if ws:
                cut = pos + max_chars // 2 + ws[-1]
            yield pos, cut
            pos = cut
        if end > pos:
            yield pos, end
        pos = end


def _is_boundary(ids: list[int], bits: int) -> bool:
    digest = hashlib.blake2b(np.asarray(ids, dtype="<i8").tobytes(), digest_size=8).digest()
    return (digest[0] & ((1 << bits) - 1)) == 0


def chunk_text(
    text: str,
    tokenizer: Any,
    chunk_size: int,
    *,
    min_fill: float = 0.75,
    boundary_bits: int = 2,
    batch_units: int = 512,
) -> Iterator[Chunk]:
    """Yield the chunks of ``text`` (see the module docstring), streaming: memory is bounded by a batch of units."""
    if not 0.0 < min_fill <= 1.0:
        raise ValueError(f"min_fill must be in (0, 1], got {min_fill}")
    max_chars = 4 * chunk_size
    threshold = max(1, int(min_fill * chunk_size))
    cur_ids: list[int] = []
    cur_off: list[tuple[int, int]] = []

    def emit() -> Chunk:
        chunk = Chunk(torch.tensor(cur_ids, dtype=torch.long), torch.tensor(cur_off, dtype=torch.long).reshape(-1, 2))
        cur_ids.clear()
        cur_off.clear()
        return chunk

    def pieces(spans: list[tuple[int, int]]) -> Iterator[tuple[list[int], list[tuple[int, int]]]]:
        enc = tokenizer([text[s:e] for s, e in spans], add_special_tokens=False, return_offsets_mapping=True)
        for (s, _), ids, offs in zip(spans, enc["input_ids"], enc["offset_mapping"]):
            offs = [(s + a, s + b) for a, b in offs]
            for k in range(0, len(ids), chunk_size):
                yield ids[k : k + chunk_size], offs[k : k + chunk_size]

    def flush(spans):
        for ids, offs in pieces(spans):
            if not ids:
                continue
            if cur_ids and len(cur_ids) + len(ids) > chunk_size:
                yield emit()
            cur_ids.extend(ids)
            cur_off.extend(offs)
            if len(cur_ids) >= threshold and _is_boundary(ids, boundary_bits):
                yield emit()

    batch: list[tuple[int, int]] = []
    for span in split_units(text, max_chars):
        batch.append(span)
        if len(batch) >= batch_units:
            yield from flush(batch)
            batch = []
    if batch:
        yield from flush(batch)
    if cur_ids:
        yield emit()
