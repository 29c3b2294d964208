"""Building an index over many processes or machines with Ray Data (the optional extra ``sharedctx[ray]``).

`build_index` reads and chunks documents on CPU workers, encodes the chunks the target store lacks on a pool of
actors (each loads the model once), writes their nodes to per-actor store shards in the store's own checked format,
then merges the shards into the target index and writes the document records. Content addressing makes the result
independent of how the work was split: the same keys and states as ``ContextIndex.add_many`` on one process.
Queries stay local: see docs/distributed.md.
"""

from __future__ import annotations

from .build import ModelSpec, build_index

__all__ = ["ModelSpec", "build_index"]
