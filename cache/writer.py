"""Writing a shard: ``write_shard``, atomically, with the checksum of every dataset.

What the writer guarantees:

- A shard is built in memory, then written to ``*.partial``, flushed, fsync'ed and renamed
  (``cache.files.atomic_write``): a reader only ever sees complete shards, so killing a writer at
  any point loses at most the shard in progress, and a full or read-only disk is a ``WriteError``
  naming the shard (nothing is left of it).
- ``write_shard`` refuses (``AssertionError``: a bug in its caller) any row that cannot have been
  encoded from an image: features of the wrong shape, not finite or not of unit norm, an empty
  relpath, category or split, a label other than 0 and 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from raml.cache.checks import (
    ATTRIBUTES,
    attributes_checksum,
    dataset_checksum,
    rows_problem,
    strings_checksum,
    text_problem,
    token_row_checksum,
    tokens_problem,
)
from raml.cache.files import atomic_write_bytes
from raml.cache.format import (
    CHECKSUM_ATTRIBUTE,
    EVAL_MASK,
    N_CROPS,
    NUMERIC_COLUMNS,
    PARTIAL_SUFFIX,
    SHARD_SUFFIX,
    STRING_COLUMNS,
    TOKEN_DEFECT,
    TOKEN_ROW_CHECKSUM,
    TOKEN_SETTING_ATTRIBUTE,
    TOKENS,
)
from raml.cache.tokens import EVAL_MASK_BYTES
from raml.errors import printable

_STR = h5py.string_dtype("utf-8")
FEATURE_CHUNK_ROWS = 64  # rows of ``features`` per HDF5 chunk; a shard's last chunk is allocated whole
# What a shard takes beyond its features, for extract's space check (the demo's ViT-B/16 shard:
# ~1 KB per row for labels, sizes and path strings, and HDF5's own metadata and the prompt
# embeddings per shard; both rounded up).
ROW_EXTRA_BYTES = 1024
SHARD_EXTRA_BYTES = 128 * 1024


def estimated_bytes(images: int, embed_dim: int, shard_size: int) -> int:
    """About how many bytes ``images`` new rows of ``embed_dim``-d features take in shards of
    ``shard_size`` rows (an over- rather than an underestimate): the features of whole chunks,
    plus ``ROW_EXTRA_BYTES`` per row and ``SHARD_EXTRA_BYTES`` per shard."""
    sizes = [shard_size] * (images // shard_size) + ([images % shard_size] if images % shard_size else [])
    allocated = sum(
        rows if rows <= FEATURE_CHUNK_ROWS else -(-rows // FEATURE_CHUNK_ROWS) * FEATURE_CHUNK_ROWS for rows in sizes
    )
    return allocated * N_CROPS * embed_dim * 2 + images * ROW_EXTRA_BYTES + len(sizes) * SHARD_EXTRA_BYTES


@dataclass
class ShardRows:
    """What one shard holds; also the in-memory batch that extraction accumulates."""

    features: list = field(default_factory=list)  # each [21, D] float16
    records: list = field(default_factory=list)  # objects with the STRING_COLUMNS and .label
    sizes: list = field(default_factory=list)  # (height, width)
    skipped: list = field(default_factory=list)  # (relpath, reason)
    # With patch tokens (cache.tokens), one entry per record in each, or none at all:
    tokens: list = field(default_factory=list)  # [T, D] float16, L2-normalised
    token_defect: list = field(default_factory=list)  # [T] float: defect fraction per token, NaN if unknown
    eval_masks: list = field(default_factory=list)  # [EVAL_MASK_BYTES] uint8: the mask's scoring points

    def __len__(self) -> int:
        return len(self.records) + len(self.skipped)


def write_shard(
    path: Path, rows: ShardRows, meta: dict, text: dict, engine: str | None, token_setting: dict | None = None
) -> None:
    """Write ``rows`` to ``path`` atomically (``.partial`` → flush → fsync → rename), with checksums.
    An existing shard at ``path`` is replaced (adding tokens to it).

    Raises ``AssertionError``, writing nothing, if a row could not have been encoded from an image
    (see the module docstring): that is a bug in the caller, never something to store.
    ``engine`` is ``None`` for a shard that lists skipped files only. ``token_setting``
    (``cache.tokens.token_setting``) must be given with rows that hold patch tokens.
    """
    path = Path(path)
    partial = path.with_name(path.name[: -len(SHARD_SUFFIX)] + PARTIAL_SUFFIX)
    n, dim = len(rows.records), meta["embed_dim"]
    if len(rows.features) != n or len(rows.sizes) != n:
        raise AssertionError(
            f"write_shard({path.name}): {len(rows.features)} feature rows and {len(rows.sizes)} sizes for {n} records"
        )
    sizes = np.array(rows.sizes, dtype=np.int32).reshape(-1, 2)
    columns = {
        "features": np.stack(rows.features).astype(np.float16) if n else np.zeros((0, N_CROPS, dim), np.float16),
        "label": np.array([r.label for r in rows.records], dtype=np.int64),
        "height": sizes[:, 0],
        "width": sizes[:, 1],
        **{column: np.array([getattr(r, column) or "" for r in rows.records], dtype=str) for column in STRING_COLUMNS},
    }
    categories = sorted(set(columns["category"].tolist()))
    unstorable = [
        printable(str(value))
        for column in STRING_COLUMNS
        for value in columns[column]
        if printable(str(value)) != value
    ]
    problem = (
        rows_problem(columns, dim)
        or (f"{unstorable[0]} is not valid UTF-8 (the caller must skip such names)" if unstorable else None)
        or next((f"no prompt embeddings for category {c!r}" for c in categories if c not in text), None)
        or text_problem({c: text[c] for c in categories}, dim)
    )
    if rows.tokens or token_setting is not None:
        columns.update(_token_columns(rows, n, token_setting))
        problem = problem or tokens_problem(columns, token_setting, meta["embed_dim"])
    if problem:
        raise AssertionError(
            f"write_shard({path.name}): {problem}. Every row must be encoded from an image; "
            "this is a bug in the caller, and nothing was written."
        )
    columns["label"] = columns["label"].astype(np.int8)
    checksums = {}
    # Built in memory, written by Python: a full or read-only disk is then an OSError of our own
    # write (a WriteError), never an HDF5 write failure, which crashed the process (cache.files).
    with h5py.File(path.name, "w", driver="core", backing_store=False) as h5:
        for key, value in meta.items():
            h5.attrs[key] = json.dumps(value)
        h5.attrs["engine"] = json.dumps(engine)

        def numeric(name, data, **options):
            h5.create_dataset(name, data=data, **options)
            checksums[name] = dataset_checksum(data)

        def strings(name, values):
            encoded = [value.encode("utf-8") for value in values]
            h5.create_dataset(name, data=np.array(encoded, dtype=object), dtype=_STR)
            checksums[name] = strings_checksum(encoded)

        numeric("features", columns["features"], chunks=(min(n, FEATURE_CHUNK_ROWS), N_CROPS, dim) if n else None)
        for name in NUMERIC_COLUMNS:
            numeric(name, columns[name])
        for name in STRING_COLUMNS:
            strings(name, columns[name].tolist())
        for category in categories:
            for kind in ("normal", "anomalous"):
                numeric(f"text/{category}/{kind}", np.asarray(text[category][kind], np.float32))
        if token_setting is not None:
            # one image's tokens and scoring mask are one chunk each, read together and checked by
            # their row checksum; the small per-token targets are read with the table
            h5.attrs[TOKEN_SETTING_ATTRIBUTE] = json.dumps(token_setting)
            for name, dtype in ((TOKENS, np.float16), (EVAL_MASK, np.uint8)):
                h5.create_dataset(
                    name, data=columns[name], dtype=dtype, chunks=(1, *columns[name].shape[1:]) if n else None
                )
            numeric(TOKEN_ROW_CHECKSUM, columns[TOKEN_ROW_CHECKSUM])
            numeric(TOKEN_DEFECT, columns[TOKEN_DEFECT])
        strings("skipped/relpath", [printable(relpath) for relpath, _ in rows.skipped])
        strings("skipped/reason", [printable(reason) for _, reason in rows.skipped])
        checksums[ATTRIBUTES] = attributes_checksum({key: str(value) for key, value in h5.attrs.items()})
        h5.attrs[CHECKSUM_ATTRIBUTE] = json.dumps(checksums)
        h5.flush()
        image = h5.id.get_file_image()
    atomic_write_bytes(path, image, tmp=partial)


def _token_columns(rows: ShardRows, n: int, setting: dict | None) -> dict:
    """The token datasets of ``rows`` as arrays, with each row's checksum (see ``token_row_checksum``)."""
    if setting is None or not (len(rows.tokens) == len(rows.token_defect) == len(rows.eval_masks) == n):
        raise AssertionError(
            f"patch tokens for {len(rows.tokens)} of {n} rows ({len(rows.token_defect)} defect "
            f"fractions, {len(rows.eval_masks)} masks; setting {setting}): a shard holds the tokens "
            "of every row or of none"
        )
    tokens = (
        np.stack(rows.tokens).astype(np.float16)
        if n
        else np.zeros((0, setting["tokens"], setting["embed_dim"]), np.float16)
    )
    masks = np.stack(rows.eval_masks).astype(np.uint8) if n else np.zeros((0, EVAL_MASK_BYTES), np.uint8)
    return {
        TOKENS: tokens,
        EVAL_MASK: masks,
        TOKEN_DEFECT: np.stack(rows.token_defect).astype(np.float16)
        if n
        else np.zeros((0, setting["tokens"]), np.float16),
        TOKEN_ROW_CHECKSUM: np.array([token_row_checksum(t, m) for t, m in zip(tokens, masks)], np.uint64),
    }
