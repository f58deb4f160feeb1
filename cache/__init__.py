"""The feature cache: HDF5 shards written by stage one (``extract``) and read by stage two."""
from cache.errors import UserError
from cache.store import (CROP_LAYOUT, N_CROPS, SCALE_SLICES, CacheError, FeatureTable, ShardRows,
                         claim_cache, fingerprint, mismatched_fields, read_cache, write_shard)

__all__ = ["CROP_LAYOUT", "N_CROPS", "SCALE_SLICES", "CacheError", "FeatureTable", "ShardRows",
           "UserError", "claim_cache", "fingerprint", "mismatched_fields", "read_cache", "write_shard"]
