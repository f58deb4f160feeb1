"""The feature cache: the HDF5 shard store, the one contract between stage one and stage two.

Holds: the cache's format and fingerprint (``format``), the patch tokens it may hold and where
each lies in the image (``tokens``), writing shards (``writer``), reading and checking them
(``reader``, ``checks``), one writer per shard slot (``lock``), atomic file writes for the whole
project (``files``), and the cache's own commands (``cli``: ``info``, ``bench cache``). Imports
nothing from extract/, train/, evaluate/ or cli/: only ``raml.errors`` lies below it.
"""

from raml.cache.format import CROP_LAYOUT, N_CROPS, SCALE_SLICES, claim_cache, fingerprint, mismatched_fields
from raml.cache.reader import FeatureTable, read_cache
from raml.cache.writer import ShardRows, write_shard
from raml.errors import CacheError

__all__ = [
    "CROP_LAYOUT",
    "N_CROPS",
    "SCALE_SLICES",
    "CacheError",
    "FeatureTable",
    "ShardRows",
    "claim_cache",
    "fingerprint",
    "mismatched_fields",
    "read_cache",
    "write_shard",
]
