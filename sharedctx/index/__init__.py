"""Many documents as a forest of chunk trees: the `ContextIndex` facade and the types it returns.

The package is split by responsibility: `facade` (ContextIndex: lifecycle, documents, answering), `settings`
(how it builds and retrieves, settled once), `ingest` (adding documents: chunking and encoding into the store, a
record back), `forest` (the live documents and the forest over them), `retrieval` (ranking chunks, walking trees,
citations, the passage prompt), `answering` (a question's options, its prepared request, its answer), `merging`,
`results` (what is returned to users), `documents` (the on-disk document table), `lexicon` and `embedding` (chunk
ranking), `store` (the content-addressed node store) and `chunking` (content-defined chunk boundaries).
"""

from __future__ import annotations

from .documents import DocumentNotFoundError, DocumentTable, read_document
from .facade import ContextIndex
from .results import AddResult, Answer, BuildReport, Citation, DocumentInfo

__all__ = [
    "ContextIndex",
    "Citation",
    "Answer",
    "AddResult",
    "BuildReport",
    "DocumentInfo",
    "DocumentTable",
    "DocumentNotFoundError",
    "read_document",
]
