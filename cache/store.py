"""The HDF5 shard store: the one contract between stage one and stage two.

A cache is a directory::

    cache.json                  fingerprint of the backbone that wrote it (see ``fingerprint``)
    features-000of001-00000.h5  finalised shards (any number, from any number of processes)
    features-*.h5.partial       a shard being written; never read
    extract-000of001.lock       the lock of one writer slot, (cache, shard i/n): see ``cache.lock``

Each shard holds, for its images (one row each):

    features     [N, 21, D] float16  L2-normalised CLIP image embeddings of the 21 crops
                                     (crop order: ``CROP_LAYOUT`` — global, 2x2, 4x4, row-major)
    label        [N] int8            0 normal, 1 anomalous
    category, defect_type, relpath, split   [N] utf-8 strings (relpath relative to the dataset root)
    mask_relpath [N] utf-8           "" when there is no mask
    height, width [N] int32          original image size in pixels
    text/<category>/normal, text/<category>/anomalous   [P, D] float32, L2-normalised prompt embeddings
    skipped/relpath, skipped/reason  files that ``--skip-bad`` left out

and, as attributes, the cache fingerprint, ``engine`` (which image encoder wrote it) and
``xxh3_64``: the XXH3-64 hash of every dataset (``dataset_checksum``, ``strings_checksum``), recorded
when the shard is finalised. XXH3 (the ``xxhash`` package) rather than HDF5's Fletcher-32 filter,
zlib's CRC-32 or a SHA-256, because the checks must stay under 10 % of reading a cache: on this
project's CPU it hashes the 115 MB of an MVTec-sized cache's features in 5 ms, against 30–43 ms for
CRC-32 and ~60 ms for the others, and it detects more than Fletcher-32, which cannot tell a 0x0000
word from 0xFFFF.

What the store guarantees:

- A shard is written to ``*.partial``, flushed, fsync'ed and renamed: a reader only ever sees
  complete shards, so killing a writer at any point loses at most the shard in progress.
- ``write_shard`` refuses (``AssertionError``: a bug in its caller) any row that cannot have been
  encoded from an image: features of the wrong shape, not finite or not of unit norm, an empty
  relpath, category or split, a label other than 0 and 1.
- ``read_cache`` verifies every shard's checksums and validates what it loads by the same rules;
  a shard that fails is named with the reason and the fix (delete it and re-run extract).
  Shards written before checksums existed are validated only.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from concurrent.futures import ThreadPoolExecutor

import h5py
import numpy as np
import xxhash

from cache.errors import UserError

FORMAT_VERSION = 1
CROP_LAYOUT = ((1, 1), (2, 2), (4, 4))  # (rows, cols) per scale: 1 + 4 + 16 = 21 crops
N_CROPS = sum(rows * cols for rows, cols in CROP_LAYOUT)
SCALE_SLICES = (slice(0, 1), slice(1, 5), slice(5, 21))  # rows of ``features`` for each scale
CHECKSUM_ATTRIBUTE = "xxh3_64"   # shard attribute: {dataset name: XXH3-64 of its bytes}
CACHE_JSON = "cache.json"
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
KNOWN_SPLITS = ("train", "test")
# Features are stored as float16, which keeps an L2 norm within ~1e-3 of 1; ten times that is a fault.
UNIT_NORM_TOLERANCE = 1e-2
_FIX = "Delete it and re-run extract to recompute its images."   # for a shard that cannot be used

# The fields of the fingerprint that must agree for two sets of features to be comparable.
FINGERPRINT_KEYS = ("backbone", "model_config", "weights", "random_weights", "input_size", "embed_dim",
                    "normalisation", "crop_layout", "preprocessing", "precision")
# What a cache written before a field existed was made with: such caches stay valid.
FINGERPRINT_DEFAULTS = {
    "preprocessing": "pil-bicubic",   # tiles resized by PIL (bicubic) on the CPU, float32 normalisation
    "precision": "fp32",              # the image encoder's numeric precision (int8: a quantised encoder)
}
# Fields with no default are "not recorded" (``None``) where they are missing: ``model_config``
# (the SHA-256 of the resolved open_clip config; caches before it recorded the config's name only)
# and, in checkpoints written before them, ``model_config`` and ``normalisation``. See
# ``mismatched_fields`` for what an unrecorded field matches.
_STRING_COLUMNS = ("category", "defect_type", "relpath", "split", "mask_relpath")
_NUMERIC_COLUMNS = ("label", "height", "width")
_STR = h5py.string_dtype("utf-8")
_SLOT_OF_NAME = re.compile(r"^features-(\d+)of(\d+)-\d+" + re.escape(PARTIAL_SUFFIX) + "$")


class CacheError(UserError):
    """A cache directory that cannot be read or written as asked."""


def fingerprint(*, backbone, weights, random_weights, input_size, embed_dim, code_version,
                dataset, prompts, mean, std, model_config=None, preprocessing=FINGERPRINT_DEFAULTS["preprocessing"],
                precision=FINGERPRINT_DEFAULTS["precision"]) -> dict:
    """Describe the features of a cache. Only ``FINGERPRINT_KEYS`` must match to add images.

    ``model_config`` identifies the architecture by content ("sha256:..." of the resolved open_clip
    config, see ``extract.identity``); ``None`` where there is none (synthetic caches).
    """
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "model_config": model_config,
        "weights": weights,
        "random_weights": bool(random_weights),
        "input_size": int(input_size),
        "embed_dim": int(embed_dim),
        "crop_layout": [list(grid) for grid in CROP_LAYOUT],
        "preprocessing": preprocessing,
        "precision": precision,
        "normalisation": {"mean": list(mean), "std": list(std)},
        "prompts": prompts,
        "code_version": code_version,
        "dataset": dataset,
    }


def fingerprint_field(meta: dict, key: str):
    """``meta[key]``, or the value a cache written before ``key`` existed was made with
    (``None``: not recorded)."""
    return meta.get(key, FINGERPRINT_DEFAULTS.get(key))


def mismatched_fields(a: dict, b: dict, *, unrecorded_matches: bool = True) -> list[str]:
    """Names of fingerprint fields on which two caches (or a cache and a checkpoint) disagree.

    With ``unrecorded_matches`` (the default, for reading), a field that one side did not record
    matches anything, so that caches and checkpoints written before the field existed are still
    read and scored as before; every recorded field must still agree. Adding features to a cache
    (``claim_cache``) and reading its shards pass ``False``: there, an unrecorded field is a
    difference.
    """
    bad = []
    for key in FINGERPRINT_KEYS:
        mine, theirs = fingerprint_field(a, key), fingerprint_field(b, key)
        if mine != theirs and not (unrecorded_matches and (mine is None or theirs is None)):
            bad.append(key)
    return bad


def read_fingerprint(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / CACHE_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); was it edited by hand?") from err


def claim_cache(cache_dir: Path, meta: dict, *, create: bool = True) -> bool:
    """Check that features described by ``meta`` may be added to the cache; refuse a different
    backbone. ``create``: create the cache if there is none. Returns whether the cache exists.

    ``cache.json`` is created exclusively (a hard link of a complete temporary file), so that of two
    writers starting at once on a new cache one creates it and the other is checked against it.
    """
    cache_dir = Path(cache_dir)
    path = cache_dir / CACHE_JSON
    if not path.exists():
        if not create:
            return False
        cache_dir.mkdir(parents=True, exist_ok=True)
        _create_exclusively(path, json.dumps(meta, indent=2))
    existing = read_fingerprint(cache_dir)
    if fingerprint_field(existing, "model_config") is None and meta.get("model_config") is not None:
        raise CacheError(
            f"{cache_dir} was written before RAML recorded the content of the model config ({path} has "
            "no model_config, only the config's name), so this run cannot prove that its features come from "
            "the same architecture. train and evaluate still read this cache; to add images to it, extract "
            "them into a new --cache-dir.")
    bad = mismatched_fields(existing, meta, unrecorded_matches=False)
    if bad:
        details = "; ".join(f"{k}: cache has {existing.get(k)!r}, this run {meta.get(k)!r}" for k in bad)
        raise CacheError(
            f"{cache_dir} holds features from another backbone ({details}). Features from "
            "different backbones cannot be mixed: choose another --cache-dir.")
    return True


def slot_prefix(shard_index: int, shard_count: int) -> str:
    """The name prefix of the shards of writer slot ``shard_index``/``shard_count``."""
    return f"features-{shard_index:03d}of{shard_count:03d}-"


def shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(Path(cache_dir).glob(f"features-*{SHARD_SUFFIX}"))


def partial_shards(cache_dir: Path) -> list[Path]:
    """``*.h5.partial`` files: shards being written, or left behind by a killed writer."""
    return sorted(Path(cache_dir).glob(f"features-*{PARTIAL_SUFFIX}"))


def slot_of_partial(path: Path) -> tuple[int, int] | None:
    """(shard index, shard count) of the writer slot a partial shard belongs to."""
    match = _SLOT_OF_NAME.match(Path(path).name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def next_shard_path(cache_dir: Path, shard_index: int, shard_count: int) -> Path:
    """``features-{i}of{n}-{seq}.h5``: the prefix keeps the writer slots apart; within a slot the
    slot's lock (``cache.lock.WriterSlot``) keeps a second writer out."""
    prefix = slot_prefix(shard_index, shard_count)
    taken = [int(p.name[len(prefix):-len(SHARD_SUFFIX)]) for p in Path(cache_dir).glob(f"{prefix}*{SHARD_SUFFIX}")]
    return Path(cache_dir) / f"{prefix}{max(taken, default=-1) + 1:05d}{SHARD_SUFFIX}"


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (Python's surrogate escapes) written as
    ``\\xNN``: what RAML shows and stores for a name that is not valid UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:   # a surrogate that no file name decodes to: show it as \\udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class ShardRows:
    """What one shard holds; also the in-memory batch that extraction accumulates."""

    features: list = field(default_factory=list)        # each [21, D] float16
    records: list = field(default_factory=list)         # objects with the _STRING_COLUMNS and .label
    sizes: list = field(default_factory=list)           # (height, width)
    skipped: list = field(default_factory=list)         # (relpath, reason)

    def __len__(self) -> int:
        return len(self.records) + len(self.skipped)


def write_shard(path: Path, rows: ShardRows, meta: dict, text: dict, engine: str | None) -> None:
    """Write ``rows`` to ``path`` atomically (``.partial`` → flush → fsync → rename), with checksums.

    Raises ``AssertionError``, writing nothing, if a row could not have been encoded from an image
    (see the module docstring): that is a bug in the caller, never something to store.
    ``engine`` is ``None`` for a shard that lists skipped files only.
    """
    path = Path(path)
    partial = path.with_name(path.name[: -len(SHARD_SUFFIX)] + PARTIAL_SUFFIX)
    n, dim = len(rows.records), meta["embed_dim"]
    if len(rows.features) != n or len(rows.sizes) != n:
        raise AssertionError(f"write_shard({path.name}): {len(rows.features)} feature rows and {len(rows.sizes)} "
                             f"sizes for {n} records")
    sizes = np.array(rows.sizes, dtype=np.int32).reshape(-1, 2)
    columns = {
        "features": np.stack(rows.features).astype(np.float16) if n else np.zeros((0, N_CROPS, dim), np.float16),
        "label": np.array([r.label for r in rows.records], dtype=np.int64),
        "height": sizes[:, 0], "width": sizes[:, 1],
        **{column: np.array([getattr(r, column) or "" for r in rows.records], dtype=str)
           for column in _STRING_COLUMNS},
    }
    categories = sorted(set(columns["category"].tolist()))
    unstorable = [printable(str(value)) for column in _STRING_COLUMNS for value in columns[column]
                  if printable(str(value)) != value]
    problem = (rows_problem(columns, dim)
               or (f"{unstorable[0]} is not valid UTF-8 (the caller must skip such names)" if unstorable else None)
               or next((f"no prompt embeddings for category {c!r}" for c in categories if c not in text), None)
               or text_problem({c: text[c] for c in categories}, dim))
    if problem:
        raise AssertionError(f"write_shard({path.name}): {problem}. Every row must be encoded from an image; "
                             "this is a bug in the caller, and nothing was written.")
    columns["label"] = columns["label"].astype(np.int8)
    checksums = {}
    with h5py.File(partial, "w") as h5:
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

        numeric("features", columns["features"], chunks=(min(n, 64), N_CROPS, dim) if n else None)
        for name in _NUMERIC_COLUMNS:
            numeric(name, columns[name])
        for name in _STRING_COLUMNS:
            strings(name, columns[name].tolist())
        for category in categories:
            for kind in ("normal", "anomalous"):
                numeric(f"text/{category}/{kind}", np.asarray(text[category][kind], np.float32))
        strings("skipped/relpath", [printable(relpath) for relpath, _ in rows.skipped])
        strings("skipped/reason", [printable(reason) for _, reason in rows.skipped])
        h5.attrs[CHECKSUM_ATTRIBUTE] = json.dumps(checksums)
        h5.flush()
        os.fsync(h5.id.get_vfd_handle())
    os.replace(partial, path)
    _fsync_dir(path.parent)


def dataset_checksum(array: np.ndarray) -> int:
    """XXH3-64 of a numeric dataset: of its bytes, little-endian, in C order."""
    return xxhash.xxh3_64_intdigest(np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")))


def strings_checksum(encoded: list[bytes]) -> int:
    """XXH3-64 of a string dataset: of its length, then of its UTF-8 values, each ended by a NUL
    byte (HDF5 strings cannot hold one)."""
    return xxhash.xxh3_64_intdigest(len(encoded).to_bytes(8, "little") + b"\0".join(encoded) + b"\0")


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
    bad = np.argwhere(~(np.abs(norms - 1) <= UNIT_NORM_TOLERANCE))   # NaN fails too
    if len(bad):
        row, crop = bad[0]
        return (f"crop {crop} of {printable(str(columns['relpath'][row]))} has L2 norm {norms[row, crop]:.4g} "
                f"(expected 1 ± {UNIT_NORM_TOLERANCE}; {len(bad)} such crops, non-finite values included)")
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


_FLOAT16_EXPONENT_REBIAS = np.uint32((127 - 15) << 23)   # float16 exponent bias 15 → float32 bias 127


def float16_squared_norms(features: np.ndarray, block: int = 1024) -> np.ndarray:
    """Squared L2 norms (float32) of float16 vectors along the last axis (of even length).

    numpy casts float16 to float32 in scalar code, about 4 ns a value: 0.2 s for an MVTec-sized
    cache, as long as reading it. Instead, each 32-bit word (two float16 values) is split into two
    float32 values by moving exponent and mantissa into place with vectorised integer operations,
    a block of rows at a time so that the buffers stay in the CPU cache. Exact for normal numbers.
    A subnormal (|x| < 6.1e-5) comes out below 6.2e-5, which moves a 512-d squared norm by less
    than 2e-6; inf and NaN come out at 65536 or more, so they fail any unit-norm test.
    """
    if features.shape[-1] % 2:   # no pairs to split: numpy's exact, slow cast
        values = features.astype(np.float32)
        return np.einsum("...k,...k->...", values, values)
    words = np.ascontiguousarray(features).reshape(-1, features.shape[-1]).view(np.uint32)
    squared = np.empty(len(words), np.float32)
    low = np.empty((min(block, len(words)), words.shape[1]), np.uint32)
    high = np.empty_like(low)
    for start in range(0, len(words), block):
        pairs = words[start:start + block]
        even, odd = low[:len(pairs)], high[:len(pairs)]
        np.bitwise_and(pairs, 0x7FFF, out=even)        # the first value of each pair, without its sign
        np.left_shift(even, 13, out=even)
        np.right_shift(pairs, 3, out=odd)              # the second value, moved to the same place
        np.bitwise_and(odd, 0x0FFFE000, out=odd)       # ... without its sign and the first value's bits
        for values in (even, odd):
            np.add(values, _FLOAT16_EXPONENT_REBIAS, out=values)
        even_f, odd_f = even.view(np.float32), odd.view(np.float32)
        squared[start:start + len(pairs)] = np.einsum("ij,ij->i", even_f, even_f) + np.einsum("ij,ij->i", odd_f, odd_f)
    return squared.reshape(features.shape[:-1])


@dataclass
class FeatureTable:
    """All finalised shards of a cache as one table, rows sorted by (category, relpath).

    ``features`` is [N, 21, D] float16; the other columns are length-N numpy arrays.
    ``text[category]`` holds ``{"normal": [P, D], "anomalous": [P, D]}`` float32 arrays.
    """

    features: np.ndarray
    label: np.ndarray
    category: np.ndarray
    defect_type: np.ndarray
    relpath: np.ndarray
    split: np.ndarray
    mask_relpath: np.ndarray
    height: np.ndarray
    width: np.ndarray
    text: dict
    meta: dict
    engines: list
    skipped: list  # (relpath, reason), sorted, for files that still have no features
    cache_dir: Path

    def __len__(self) -> int:
        return len(self.relpath)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.category.tolist()))

    def keys(self) -> set[str]:
        return set(self.relpath.tolist())

    def select(self, mask: np.ndarray) -> "FeatureTable":
        """Rows where ``mask`` (bool array or index array) holds; text and meta are shared."""
        columns = {name: getattr(self, name)[mask] for name in ("features", "label", "height", "width",
                                                                  *_STRING_COLUMNS)}
        return FeatureTable(**columns, text=self.text, meta=self.meta, engines=self.engines,
                            skipped=self.skipped, cache_dir=self.cache_dir)


def read_cache(cache_dir: Path, *, with_features: bool = True) -> FeatureTable:
    """Read every finalised shard of ``cache_dir`` as one ``FeatureTable``.

    Each shard's checksums are verified and its rows validated (``rows_problem``,
    ``text_problem``); a shard that fails raises ``CacheError`` naming it. ``with_features=False``
    returns the index columns only (``features`` is empty), holding one shard's features at a
    time: resuming extraction and ``info`` check every shard without the memory of the whole table.
    """
    cache_dir = Path(cache_dir)
    meta = read_fingerprint(cache_dir)
    if meta is None:
        raise CacheError(f"{cache_dir} is not a RAML feature cache (no {CACHE_JSON}). "
                         "Create one with: python pipeline.py extract --dataset ... --cache-dir "
                         f"{cache_dir}")
    parts = {name: [] for name in (("features",) if with_features else ()) + _NUMERIC_COLUMNS + _STRING_COLUMNS}
    text, engines, skipped = {}, set(), {}
    checks = []
    # Each shard is checked in a second thread while the next one is read: the checks (XXH3,
    # float16 norms) run in xxhash and numpy, which release the GIL, so they overlap the reading.
    with ThreadPoolExecutor(max_workers=1) as checker:
        for path in shard_paths(cache_dir):
            shard = load_shard(path, meta)
            checks.append((path, checker.submit(shard_problem, shard, meta["embed_dim"])))
            for name in parts:
                parts[name].append(shard.columns[name])
            if len(shard.columns["relpath"]):
                engines.add(shard.engine)
            text.update(shard.text)
            skipped.update(shard.skipped)
    for path, check in checks:
        problem = check.result()
        if problem:
            raise CacheError(f"{path}: {problem}. {_FIX}")
    dim = meta["embed_dim"]
    columns = {}
    for name, chunks in parts.items():
        if name == "features":
            columns[name] = (np.concatenate(chunks) if chunks else np.zeros((0, N_CROPS, dim), np.float16))
        elif name in _STRING_COLUMNS:
            columns[name] = np.concatenate(chunks) if chunks else np.array([], dtype=str)
        else:
            columns[name] = np.concatenate(chunks) if chunks else np.array([], dtype=np.int32)
    if not with_features:
        columns["features"] = np.zeros((len(columns["relpath"]), 0, 0), np.float16)
    order = np.lexsort((columns["relpath"], columns["category"]))
    columns = {name: values[order] for name, values in columns.items()}
    unique, first = np.unique(columns["relpath"], return_index=True)
    if len(unique) < len(columns["relpath"]):
        warnings.warn(f"{cache_dir}: {len(columns['relpath']) - len(unique)} images appear in more than "
                      "one shard (two extract runs on the same share?); keeping one copy of each.")
        keep = np.sort(first)
        columns = {name: values[keep] for name, values in columns.items()}
    have = set(columns["relpath"].tolist())
    still_skipped = sorted((p, r) for p, r in skipped.items() if p not in have)
    return FeatureTable(**columns, text=text, meta=meta, engines=sorted(engines), skipped=still_skipped,
                        cache_dir=cache_dir)


@dataclass
class LoadedShard:
    """A shard's datasets as read by ``load_shard``, not yet checked (``shard_problem``)."""

    columns: dict    # features, label, height, width and the string columns (decoded)
    text: dict       # category → {"normal": [P, D], "anomalous": [P, D]}
    skipped: dict    # relpath → reason
    engine: str | None
    encoded: dict    # every string dataset by name, as the UTF-8 bytes stored
    checksums: dict | None   # recorded XXH3-64 by dataset name; None in shards written before them

    def numeric(self) -> dict:
        """Every numeric dataset by name, as stored."""
        return {**{name: self.columns[name] for name in ("features", *_NUMERIC_COLUMNS)},
                **{f"text/{category}/{kind}": vectors for category, kinds in self.text.items()
                   for kind, vectors in kinds.items()}}


def load_shard(path: Path, meta: dict) -> LoadedShard:
    """Read a shard's datasets; a ``CacheError`` if it is unreadable or of another backbone."""
    try:
        with h5py.File(path, "r") as h5:
            shard_meta = {key: json.loads(h5.attrs[key]) for key in FINGERPRINT_KEYS if key in h5.attrs}
            columns = {name: h5[name][...] for name in ("features", *_NUMERIC_COLUMNS)}
            text = {category: {kind: h5[f"text/{category}/{kind}"][...] for kind in ("normal", "anomalous")}
                    for category in h5.get("text", {})}
            encoded = {name: [value if isinstance(value, bytes) else value.encode("utf-8")
                              for value in h5[name][...].tolist()]
                       for name in (*_STRING_COLUMNS, "skipped/relpath", "skipped/reason")}
            engine = json.loads(h5.attrs["engine"])
            checksums = json.loads(h5.attrs[CHECKSUM_ATTRIBUTE]) if CHECKSUM_ATTRIBUTE in h5.attrs else None
    except (OSError, KeyError, json.JSONDecodeError) as err:   # HDF5 errors, a missing dataset, bad JSON
        raise CacheError(f"{path}: unreadable shard ({type(err).__name__}: {err}). {_FIX}") from None
    bad = mismatched_fields(meta, shard_meta, unrecorded_matches=False)
    if bad:
        raise CacheError(f"{path}: written by another backbone than {path.parent / CACHE_JSON} "
                         f"(fields {', '.join(bad)}); move it to its own cache.")
    shard = LoadedShard(columns=columns, text=text, skipped={}, engine=engine, encoded=encoded, checksums=checksums)
    strings = {}
    for name, values in encoded.items():
        try:
            strings[name] = np.array([value.decode("utf-8") for value in values], dtype=str)
        except UnicodeDecodeError as err:
            problem = checksum_problem(shard) or f"dataset {name} holds bytes that are not UTF-8 ({err})"
            raise CacheError(f"{path}: {problem}. {_FIX}") from None
    columns.update({name: strings[name] for name in _STRING_COLUMNS})
    shard.skipped = dict(zip(strings["skipped/relpath"].tolist(), strings["skipped/reason"].tolist()))
    return shard


def shard_problem(shard: LoadedShard, embed_dim: int) -> str | None:
    """Why a loaded shard cannot be used (its checksums, then its rows), or ``None``."""
    missing_text = sorted(set(shard.columns["category"].tolist()) - set(shard.text))
    return (checksum_problem(shard) or rows_problem(shard.columns, embed_dim) or text_problem(shard.text, embed_dim)
            or (f"no prompt embeddings for categories {missing_text}" if missing_text else None))


def checksum_problem(shard: LoadedShard) -> str | None:
    """Which dataset of a loaded shard does not match its recorded checksum, or ``None`` (also for
    shards written before checksums)."""
    if shard.checksums is None:
        return None
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


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then move it into place, so that
    readers see the old file or the new one, never a part (and nothing is left on failure)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _create_exclusively(path: Path, text: str) -> None:
    """Create ``path`` holding ``text`` unless it exists (then leave it as it is), atomically: a
    complete temporary file is hard-linked into place, which fails if ``path`` exists."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
