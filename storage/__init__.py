"""The teacher-cache store: a versioned manifest plus sharded Zarr v3 arrays of teacher targets.

Write with `StoreWriter`, read with `open_store`; the layout is specified in `storage/FORMAT.md`.
"""

from storage.layout import FORMAT_VERSION
from storage.manifest import Manifest, ShardInfo
from storage.reader import ShardReader, Store, open_store
from storage.writer import BackgroundWriter, StoreWriter

__all__ = [
    "FORMAT_VERSION", "BackgroundWriter", "Manifest", "ShardInfo", "ShardReader", "Store", "StoreWriter",
    "open_store",
]
