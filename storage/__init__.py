"""The teacher-cache store: a versioned manifest plus sharded Zarr v3 arrays of teacher targets.

Write with `StoreWriter`, read with `open_store`; the layout is specified in `storage/FORMAT.md`. New stores are
made from finished ones by `storage.concat.concat_stores` (samples of one teacher, one after the other) and
`storage.ensemble.ensemble_stores` (the targets of several teachers over the same samples, mixed).
"""

from storage.layout import FORMAT_VERSION
from storage.manifest import Manifest, ShardInfo
from storage.reader import ShardReader, Store, open_store
from storage.writer import BackgroundWriter, StoreWriter

__all__ = [
    "FORMAT_VERSION", "BackgroundWriter", "Manifest", "ShardInfo", "ShardReader", "Store", "StoreWriter",
    "open_store",
]
