"""The checks a shard must pass: checksums of every dataset, and rows that can have been encoded
from images.

XXH3-64 (the ``xxhash`` package) rather than HDF5's Fletcher-32 filter, zlib's CRC-32 or a
SHA-256, because the checks must stay under 10 % of reading a cache: on this project's CPU it
hashes the 115 MB of an MVTec-sized cache's features in 5 ms, against 30–43 ms for CRC-32 and
~60 ms for the others, and it detects more than Fletcher-32, which cannot tell a 0x0000 word from
0xFFFF. It detects corruption; it is not a signature against deliberate tampering.
"""

from __future__ import annotations

import numpy as np
import xxhash

from raml.cache.format import EVAL_MASK, KNOWN_SPLITS, N_CROPS, TOKEN_DEFECT, TOKEN_ROW_CHECKSUM, TOKENS
from raml.cache.tokens import EVAL_MASK_BYTES
from raml.errors import printable

ATTRIBUTES = "@attributes"  # the checksum entry of a shard's attributes (format 2 on); no dataset has this name

# Features are stored as float16, which keeps an L2 norm within ~1e-3 of 1; ten times that is a fault.
UNIT_NORM_TOLERANCE = 1e-2


def dataset_checksum(array: np.ndarray) -> int:
    """XXH3-64 of a numeric dataset: of its bytes, little-endian, in C order."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))


def attributes_checksum(attributes: dict) -> int:
    """XXH3-64 of a shard's attributes (name → the JSON text stored), every one but the checksums':
    the fingerprint, the engine, the dataset record, the code version. Sorted by name, each
    ``name=value`` ended by a NUL byte."""
    return xxhash.xxh3_64_intdigest(
        b"".join(f"{name}={attributes[name]}".encode("utf-8", "surrogateescape") + b"\0" for name in sorted(attributes))
    )


def strings_checksum(encoded: list[bytes]) -> int:
    """XXH3-64 of a string dataset: of its length, then of its UTF-8 values, each ended by a NUL
    byte (HDF5 strings cannot hold one)."""
    return xxhash.xxh3_64_intdigest(len(encoded).to_bytes(8, "little") + b"\0".join(encoded) + b"\0")


def token_row_checksum(tokens: np.ndarray, eval_mask: np.ndarray) -> int:
    """XXH3-64 of one image's patch tokens (float16) and scoring mask (uint8), read together as one row."""
    state = xxhash.xxh3_64()
    state.update(np.ascontiguousarray(tokens, dtype=np.dtype("<f2")))
    state.update(np.ascontiguousarray(eval_mask, dtype=np.uint8))
    return state.intdigest()


def tokens_problem(columns: dict, setting: dict, embed_dim: int) -> str | None:
    """Why the token datasets of ``columns`` (``patch_tokens``, ``eval_mask``, ``token_defect``; all of
    them, or ``token_defect`` alone as the reader loads it) cannot be what stage one wrote, or ``None``."""
    n, count = len(columns["relpath"]), setting["tokens"]
    defect = columns[TOKEN_DEFECT]
    if defect.shape != (n, count):
        return f"{TOKEN_DEFECT} is {list(defect.shape)}, expected [{n}, {count}]"
    values = defect[~np.isnan(defect)]
    if values.size and not (values.min() >= 0 and values.max() <= 1):  # inf fails too
        return f"{TOKEN_DEFECT} holds values outside [0, 1]"
    unknown = np.isnan(defect).any(axis=1)
    if (unknown & (columns["label"] == 0)).any():
        return f"{TOKEN_DEFECT} is unknown (NaN) for a normal image"
    if TOKENS in columns:
        problem = token_rows_problem(columns[TOKENS], columns[EVAL_MASK], setting, embed_dim)
        if problem:
            return problem
    return None


def token_rows_problem(tokens: np.ndarray, masks: np.ndarray, setting: dict, embed_dim: int) -> str | None:
    """Why rows of ``patch_tokens`` and ``eval_mask`` are not tokens and masks of ``setting``, or ``None``."""
    if tokens.dtype != np.float16 or tokens.shape[1:] != (setting["tokens"], embed_dim):
        return (
            f"{TOKENS} are {tokens.dtype} {list(tokens.shape)}, expected float16 [N, {setting['tokens']}, {embed_dim}]"
        )
    if masks.shape[1:] != (EVAL_MASK_BYTES,):
        return f"{EVAL_MASK} is {list(masks.shape)}, expected [N, {EVAL_MASK_BYTES}]"
    norms = np.sqrt(float16_squared_norms(tokens))
    bad = np.argwhere(~(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE))
    if len(bad):
        return (
            f"token {bad[0][1]} of row {bad[0][0]} has L2 norm {norms[tuple(bad[0])]:.4g} (expected 1 ± "
            f"{UNIT_NORM_TOLERANCE}; {len(bad)} such tokens, non-finite values included)"
        )
    return None


def rows_problem(columns: dict, embed_dim: int) -> str | None:
    """Why ``columns`` (numpy arrays named as a shard's datasets: features, label, height, width and
    the string columns) cannot be rows encoded from images, or ``None``."""
    n = len(columns["relpath"])
    lengths = {name: len(values) for name, values in columns.items()}
    if any(length != n for length in lengths.values()):
        return "columns of different lengths (" + ", ".join(f"{k} {v}" for k, v in lengths.items()) + ")"
    features = columns["features"]
    if features.dtype != np.float16 or features.shape[1:] != (N_CROPS, embed_dim):
        return f"features are {features.dtype} {list(features.shape)}, expected float16 [N, {N_CROPS}, {embed_dim}]"
    norms = np.sqrt(float16_squared_norms(features))
    bad = np.argwhere(~(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE))  # NaN fails too
    if len(bad):
        row, crop = bad[0]
        return (
            f"crop {crop} of {printable(str(columns['relpath'][row]))} has L2 norm {norms[row, crop]:.4g} "
            f"(expected 1 ± {UNIT_NORM_TOLERANCE}; {len(bad)} such crops, non-finite values included)"
        )
    labels = columns["label"]
    if not np.isin(labels, (0, 1)).all():
        return f"labels {sorted(set(labels[~np.isin(labels, (0, 1))].tolist()))} are not 0 or 1"
    for name in ("relpath", "category", "split"):
        empty = np.flatnonzero(columns[name] == "")
        if len(empty):
            return f"{len(empty)} rows with an empty {name} (row {empty[0]})"
    unknown = sorted(set(columns["split"].tolist()) - set(KNOWN_SPLITS))
    if unknown:
        return f"splits {unknown} are none of {', '.join(KNOWN_SPLITS)}"
    if n and (columns["height"].min() <= 0 or columns["width"].min() <= 0):
        return "image sizes of 0 px or less"
    return None


def text_problem(text: dict, embed_dim: int) -> str | None:
    """Why the prompt embeddings ``{category: {"normal": [P, D], "anomalous": [P, D]}}`` are not
    what an encoder wrote, or ``None``."""
    for category, kinds in text.items():
        for kind in ("normal", "anomalous"):
            vectors = np.asarray(kinds[kind], np.float32)
            if vectors.ndim != 2 or vectors.shape[1] != embed_dim or not len(vectors):
                return f"text/{category}/{kind} has shape {list(vectors.shape)}, expected [P, {embed_dim}]"
            norms = np.linalg.norm(vectors, axis=-1)
            if not (np.abs(norms - 1) <= UNIT_NORM_TOLERANCE).all():
                return f"text/{category}/{kind} holds vectors that are not finite or not of unit norm"
    return None


_FLOAT16_EXPONENT_REBIAS = np.uint32((127 - 15) << 23)  # float16 exponent bias 15 → float32 bias 127


def float16_squared_norms(features: np.ndarray, block: int = 1024) -> np.ndarray:
    """Squared L2 norms (float32) of float16 vectors along the last axis (of even length).

    numpy casts float16 to float32 in scalar code, about 4 ns a value: 0.2 s for an MVTec-sized
    cache, as long as reading it. Instead, each 32-bit word (two float16 values) is split into two
    float32 values by moving exponent and mantissa into place with vectorised integer operations,
    a block of rows at a time so that the buffers stay in the CPU cache. Exact for normal numbers.
    A subnormal (|x| < 6.1e-5) comes out below 6.2e-5, which moves a 512-d squared norm by less
    than 2e-6; inf and NaN come out at 65536 or more, so they fail any unit-norm test.
    """
    if features.shape[-1] % 2:  # no pairs to split: numpy's exact, slow cast
        values = features.astype(np.float32)
        return np.einsum("...k,...k->...", values, values)
    words = np.ascontiguousarray(features).reshape(-1, features.shape[-1]).view(np.uint32)
    squared = np.empty(len(words), np.float32)
    low = np.empty((min(block, len(words)), words.shape[1]), np.uint32)
    high = np.empty_like(low)
    for start in range(0, len(words), block):
        pairs = words[start : start + block]
        even, odd = low[: len(pairs)], high[: len(pairs)]
        np.bitwise_and(pairs, 0x7FFF, out=even)  # the first value of each pair, without its sign
        np.left_shift(even, 13, out=even)
        np.right_shift(pairs, 3, out=odd)  # the second value, moved to the same place
        np.bitwise_and(odd, 0x0FFFE000, out=odd)  # ... without its sign and the first value's bits
        for values in (even, odd):
            np.add(values, _FLOAT16_EXPONENT_REBIAS, out=values)
        even_f, odd_f = even.view(np.float32), odd.view(np.float32)
        squared[start : start + len(pairs)] = np.einsum("ij,ij->i", even_f, even_f) + np.einsum(
            "ij,ij->i", odd_f, odd_f
        )
    return squared.reshape(features.shape[:-1])


def shard_problem(shard, embed_dim: int) -> str | None:
    """Why a loaded shard (``cache.reader.LoadedShard``) cannot be used (its checksums, then its rows), or
    ``None``."""
    missing_text = sorted(set(shard.columns["category"].tolist()) - set(shard.text))
    rows = {name: values for name, values in shard.columns.items() if name not in (TOKEN_DEFECT, TOKEN_ROW_CHECKSUM)}
    return (
        checksum_problem(shard)
        or rows_problem(rows, embed_dim)
        or text_problem(shard.text, embed_dim)
        or (f"no prompt embeddings for categories {missing_text}" if missing_text else None)
        or (tokens_problem(shard.columns, shard.token_setting, embed_dim) if shard.token_setting else None)
    )


def checksum_problem(shard) -> str | None:
    """Which dataset of a loaded shard does not match its recorded checksum, or ``None`` (also for
    shards written before checksums)."""
    if shard.checksums is None:
        return None
    if ATTRIBUTES in shard.checksums:
        if attributes_checksum(shard.attributes) != shard.checksums[ATTRIBUTES]:
            return f"its attributes ({', '.join(sorted(shard.attributes))}) do not match their checksum (corrupted)"
    elif shard.format_version >= 2:
        return "its attributes have no checksum although the shard is of format 2 or later"
    numeric = shard.numeric()
    unchecked = sorted((set(numeric) | set(shard.encoded)) - set(shard.checksums))
    if unchecked:
        return f"datasets {unchecked} have no checksum although the shard records checksums"
    for name, values in numeric.items():
        if dataset_checksum(values) != shard.checksums[name]:
            return f"dataset {name} does not match its checksum (corrupted)"
    for name, values in shard.encoded.items():
        if strings_checksum(values) != shard.checksums[name]:
            return f"dataset {name} does not match its checksum (corrupted)"
    return None
