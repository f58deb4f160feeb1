"""The HDF5 shard store: the one contract between stage one and stage two.

A cache is a directory::

    cache.json                  fingerprint of the backbone that wrote it (see ``fingerprint``)
    features-000of001-00000.h5  finalised shards (any number, from any number of processes)
    features-*.h5.partial       a shard being written; never read, removed on the next run

Each shard holds, for its images (one row each):

    features     [N, 21, D] float16  L2-normalised CLIP image embeddings of the 21 crops
                                     (crop order: ``CROP_LAYOUT`` — global, 2x2, 4x4, row-major)
    label        [N] int8            0 normal, 1 anomalous
    category, defect_type, relpath, split   [N] utf-8 strings (relpath relative to the dataset root)
    mask_relpath [N] utf-8           "" when there is no mask
    height, width [N] int32          original image size in pixels
    text/<category>/normal, text/<category>/anomalous   [P, D] float32, L2-normalised prompt embeddings
    skipped/relpath, skipped/reason  files that ``--skip-bad`` left out

and, as attributes, the cache fingerprint plus ``engine`` (which image encoder wrote it).

A shard is written to ``*.partial``, flushed, fsync'ed and renamed: a reader only ever sees
complete shards, so killing a writer at any point loses at most the shard in progress.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from cache.errors import UserError

FORMAT_VERSION = 1
CROP_LAYOUT = ((1, 1), (2, 2), (4, 4))  # (rows, cols) per scale: 1 + 4 + 16 = 21 crops
N_CROPS = sum(rows * cols for rows, cols in CROP_LAYOUT)
SCALE_SLICES = (slice(0, 1), slice(1, 5), slice(5, 21))  # rows of ``features`` for each scale
CACHE_JSON = "cache.json"
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"

# The fields of the fingerprint that must agree for two sets of features to be comparable.
FINGERPRINT_KEYS = ("backbone", "weights", "random_weights", "input_size", "embed_dim", "crop_layout",
                    "preprocessing", "precision")
# What a cache written before a field existed was made with: such caches stay valid.
FINGERPRINT_DEFAULTS = {
    "preprocessing": "pil-bicubic",   # tiles resized by PIL (bicubic) on the CPU, float32 normalisation
    "precision": "fp32",              # the image encoder's numeric precision (int8: a quantised encoder)
}
_STRING_COLUMNS = ("category", "defect_type", "relpath", "split", "mask_relpath")
_STR = h5py.string_dtype("utf-8")


class CacheError(UserError):
    """A cache directory that cannot be read or written as asked."""


def fingerprint(*, backbone, weights, random_weights, input_size, embed_dim, code_version,
                dataset, prompts, mean, std, preprocessing=FINGERPRINT_DEFAULTS["preprocessing"],
                precision=FINGERPRINT_DEFAULTS["precision"]) -> dict:
    """Describe the features of a cache. Only ``FINGERPRINT_KEYS`` must match to add images."""
    return {
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
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
    """``meta[key]``, or the value a cache written before ``key`` existed was made with."""
    return meta.get(key, FINGERPRINT_DEFAULTS.get(key))


def mismatched_fields(a: dict, b: dict) -> list[str]:
    """Names of fingerprint fields on which two caches (or a cache and a checkpoint) disagree."""
    return [key for key in FINGERPRINT_KEYS if fingerprint_field(a, key) != fingerprint_field(b, key)]


def read_fingerprint(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / CACHE_JSON
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); was it edited by hand?") from err


def claim_cache(cache_dir: Path, meta: dict) -> None:
    """Create the cache or check that ``meta`` may add images to it; refuse a different backbone."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    existing = read_fingerprint(cache_dir)
    if existing is not None:
        bad = mismatched_fields(existing, meta)
        if bad:
            details = "; ".join(f"{k}: cache has {existing.get(k)!r}, this run {meta.get(k)!r}" for k in bad)
            raise CacheError(
                f"{cache_dir} holds features from another backbone ({details}). Features from "
                "different backbones cannot be mixed: choose another --cache-dir.")
        return
    atomic_write_text(cache_dir / CACHE_JSON, json.dumps(meta, indent=2))


def remove_partial_shards(cache_dir: Path, prefix: str = "features-") -> list[Path]:
    """Delete shards that a killed writer left half-written; they never count as cached."""
    removed = sorted(Path(cache_dir).glob(f"{prefix}*{PARTIAL_SUFFIX}"))
    for path in removed:
        path.unlink()
    return removed


def shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(Path(cache_dir).glob(f"features-*{SHARD_SUFFIX}"))


def next_shard_path(cache_dir: Path, shard_index: int, shard_count: int) -> Path:
    """``features-{i}of{n}-{seq}.h5``: the prefix keeps concurrent writers apart."""
    prefix = f"features-{shard_index:03d}of{shard_count:03d}-"
    taken = [int(p.name[len(prefix):-len(SHARD_SUFFIX)]) for p in Path(cache_dir).glob(f"{prefix}*{SHARD_SUFFIX}")]
    return Path(cache_dir) / f"{prefix}{max(taken, default=-1) + 1:05d}{SHARD_SUFFIX}"


@dataclass
class ShardRows:
    """What one shard holds; also the in-memory batch that extraction accumulates."""

    features: list = field(default_factory=list)        # each [21, D] float16
    records: list = field(default_factory=list)         # objects with the _STRING_COLUMNS and .label
    sizes: list = field(default_factory=list)           # (height, width)
    skipped: list = field(default_factory=list)         # (relpath, reason)

    def __len__(self) -> int:
        return len(self.records) + len(self.skipped)


def write_shard(path: Path, rows: ShardRows, meta: dict, text: dict, engine: str) -> None:
    """Write ``rows`` to ``path`` atomically (``.partial`` → flush → fsync → rename)."""
    path = Path(path)
    partial = path.with_name(path.name[: -len(SHARD_SUFFIX)] + PARTIAL_SUFFIX)
    n, dim = len(rows.records), meta["embed_dim"]
    with h5py.File(partial, "w") as h5:
        for key, value in meta.items():
            h5.attrs[key] = json.dumps(value)
        h5.attrs["engine"] = json.dumps(engine)
        feats = np.stack(rows.features).astype(np.float16) if n else np.zeros((0, N_CROPS, dim), np.float16)
        h5.create_dataset("features", data=feats, chunks=(max(1, min(n, 64)), N_CROPS, dim) if n else None)
        h5.create_dataset("label", data=np.array([r.label for r in rows.records], dtype=np.int8))
        for column in _STRING_COLUMNS:
            values = [getattr(r, column) or "" for r in rows.records]
            h5.create_dataset(column, data=np.array(values, dtype=object), dtype=_STR)
        sizes = np.array(rows.sizes, dtype=np.int32).reshape(-1, 2)
        h5.create_dataset("height", data=sizes[:, 0])
        h5.create_dataset("width", data=sizes[:, 1])
        for category in sorted({r.category for r in rows.records}):
            for kind in ("normal", "anomalous"):
                h5.create_dataset(f"text/{category}/{kind}", data=np.asarray(text[category][kind], np.float32))
        h5.create_dataset("skipped/relpath", data=np.array([s[0] for s in rows.skipped], dtype=object), dtype=_STR)
        h5.create_dataset("skipped/reason", data=np.array([s[1] for s in rows.skipped], dtype=object), dtype=_STR)
        h5.flush()
        os.fsync(h5.id.get_vfd_handle())
    os.replace(partial, path)
    _fsync_dir(path.parent)


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

    ``with_features=False`` reads only the index columns (cheap; used to resume extraction).
    """
    cache_dir = Path(cache_dir)
    meta = read_fingerprint(cache_dir)
    if meta is None:
        raise CacheError(f"{cache_dir} is not a RAML feature cache (no {CACHE_JSON}). "
                         "Create one with: python pipeline.py extract --dataset ... --cache-dir "
                         f"{cache_dir}")
    parts = {name: [] for name in ("features", "label", "height", "width", *_STRING_COLUMNS)}
    text, engines, skipped = {}, set(), {}
    for path in shard_paths(cache_dir):
        try:
            with h5py.File(path, "r") as h5:
                shard_meta = {key: json.loads(h5.attrs[key]) for key in FINGERPRINT_KEYS if key in h5.attrs}
                bad = mismatched_fields(meta, shard_meta)
                if bad:
                    raise CacheError(f"{path}: written by another backbone than {cache_dir / CACHE_JSON} "
                                     f"(fields {', '.join(bad)}); move it to its own cache.")
                engines.add(json.loads(h5.attrs["engine"]))
                if with_features:
                    parts["features"].append(h5["features"][...])
                for name in ("label", "height", "width"):
                    parts[name].append(h5[name][...])
                for name in _STRING_COLUMNS:
                    parts[name].append(h5[name].asstr()[...].astype(str))
                for category in h5.get("text", {}):
                    text[category] = {kind: h5[f"text/{category}/{kind}"][...] for kind in ("normal", "anomalous")}
                for relpath, reason in zip(h5["skipped/relpath"].asstr()[...], h5["skipped/reason"].asstr()[...]):
                    skipped[relpath] = reason
        except (OSError, KeyError) as err:
            raise CacheError(f"{path}: unreadable shard ({err}). Delete it and re-run extract "
                             "to recompute its images.") from err
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


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
