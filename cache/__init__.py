"""The feature cache: the HDF5 shard store, the one contract between stage one and stage two.

Holds: the cache's format and fingerprint (``format``), the patch tokens it may hold and where
each lies in the image (``tokens``), writing shards (``writer``), reading and checking them
(``reader``, ``checks``), one writer per shard slot (``lock``), atomic file writes for the whole
project (``files``), the errors a user reads (``errors``), the command-line pieces every stage
shares (``cli``), where the workspace keeps datasets, caches, runs and results (``workspace``)
and the defaults file ``raml.toml`` (``config_file``). Imports nothing from extract/, train/ or
evaluate/.
"""
from cache.errors import CacheError, UserError
from cache.format import CROP_LAYOUT, N_CROPS, SCALE_SLICES, claim_cache, fingerprint, mismatched_fields
from cache.reader import FeatureTable, read_cache
from cache.writer import ShardRows, write_shard

__all__ = ["CROP_LAYOUT", "N_CROPS", "SCALE_SLICES", "CacheError", "FeatureTable", "ShardRows",
           "UserError", "claim_cache", "fingerprint", "mismatched_fields", "read_cache", "write_shard"]
