"""What a cache is: the directory's files, a shard's datasets, the fingerprint, the shard names.

The format is specified once, in docs/cache-format.md (the directory, a shard's datasets and
attributes, the patch-token datasets, ``cache.json``, what a reader can rely on); this module holds
its names and the fingerprint's rules. ``cache.writer`` writes shards, ``cache.reader`` reads a
cache back as one table, ``cache.checks`` holds the checksums, ``cache.tokens`` the patch tokens.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from raml.cache.files import atomic_write_text, create_exclusively, make_dirs, read_json_checked
from raml.errors import CacheError

FORMAT_VERSION = 2  # 2: the shard's attributes are under the checksum too (cache.checks)
CROP_LAYOUT = ((1, 1), (2, 2), (4, 4))  # (rows, cols) per scale: 1 + 4 + 16 = 21 crops
N_CROPS = sum(rows * cols for rows, cols in CROP_LAYOUT)
SCALE_SLICES = (slice(0, 1), slice(1, 5), slice(5, 21))  # rows of ``features`` for each scale
CHECKSUM_ATTRIBUTE = "xxh3_64"  # shard attribute: {dataset name: XXH3-64 of its bytes}
CACHE_JSON = "cache.json"
SHARD_SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"
KNOWN_SPLITS = ("train", "test")

# The fields of the fingerprint that must agree for two sets of features to be comparable.
FINGERPRINT_KEYS = (
    "backbone",
    "model_config",
    "weights",
    "random_weights",
    "input_size",
    "embed_dim",
    "normalisation",
    "crop_layout",
    "preprocessing",
    "precision",
)
# What a cache written before a field existed was made with: such caches stay valid.
FINGERPRINT_DEFAULTS = {
    "preprocessing": "pil-bicubic",  # tiles resized by PIL (bicubic) on the CPU, float32 normalisation
    "precision": "fp32",  # the image encoder's numeric precision (int8: a quantised encoder)
}
# Fields with no default are "not recorded" (``None``) where they are missing: ``model_config``
# (the SHA-256 of the resolved open_clip config; caches before it recorded the config's name only)
# and, in checkpoints written before them, ``model_config`` and ``normalisation``. See
# ``mismatched_fields`` for what an unrecorded field matches.
TOKENS, EVAL_MASK, TOKEN_DEFECT, TOKEN_ROW_CHECKSUM = "patch_tokens", "eval_mask", "token_defect", "token_row_xxh3"
TOKEN_SETTING_ATTRIBUTE = "patch_tokens"  # shard attribute and cache.json field: ``cache.tokens.token_setting``
STRING_COLUMNS = ("category", "defect_type", "relpath", "split", "mask_relpath")
NUMERIC_COLUMNS = ("label", "height", "width")
_SLOT_OF_NAME = re.compile(r"^features-(\d+)of(\d+)-\d+" + re.escape(PARTIAL_SUFFIX) + "$")


def grid_edges(size: int, parts: int):
    """Edges (px) of ``parts`` tiles along a side of ``size`` px: edge k at ⌊k·size/parts⌋, so that the
    tiles of a grid cover the side exactly, without overlap, differing by at most 1 px."""
    return np.arange(parts + 1) * size // parts


def fingerprint(
    *,
    backbone,
    weights,
    random_weights,
    input_size,
    embed_dim,
    code_version,
    dataset,
    prompts,
    mean,
    std,
    model_config=None,
    preprocessing=FINGERPRINT_DEFAULTS["preprocessing"],
    precision=FINGERPRINT_DEFAULTS["precision"],
) -> dict:
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
    """``cache.json`` of ``cache_dir`` (None when there is none), checked (``fingerprint_problem``)."""
    path = Path(cache_dir) / CACHE_JSON
    if not path.exists():
        return None
    return read_json_checked(
        path,
        fingerprint_problem,
        error=CacheError,
        advice="; was it edited by hand? Extract into a new --cache-dir, or restore it.",
    )


# What each field of a fingerprint must be (None allowed where ``FINGERPRINT_DEFAULTS`` or older
# caches leave it out: see ``fingerprint_field``).
_FIELD_TYPES = {
    "backbone": str,
    "model_config": (str, type(None)),
    "weights": str,
    "random_weights": bool,
    "input_size": int,
    "embed_dim": int,
    "preprocessing": str,
    "precision": str,
}


def fingerprint_problem(meta) -> str | None:
    """Why ``meta`` is not a cache fingerprint RAML wrote, or None: an object with every field of
    the right kind, positive sizes, the crop layout, a mean and std of three numbers each."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    for key, kind in _FIELD_TYPES.items():
        value = meta.get(key, FINGERPRINT_DEFAULTS.get(key))
        if key not in meta and key not in FINGERPRINT_DEFAULTS and key != "model_config":
            return f"no {key}"
        if isinstance(value, bool) and kind is int or not isinstance(value, kind):
            return f"{key} is {value!r}, of the wrong kind"
    if meta["input_size"] <= 0 or meta["embed_dim"] <= 0:
        return "input_size and embed_dim must be positive"
    if meta.get("crop_layout") != [list(grid) for grid in CROP_LAYOUT]:
        return f"crop_layout is {meta.get('crop_layout')!r}, not RAML's {[list(g) for g in CROP_LAYOUT]}"
    if TOKEN_SETTING_ATTRIBUTE in meta:
        problem = token_setting_problem(meta[TOKEN_SETTING_ATTRIBUTE])
        if problem:
            return problem
    normalisation = meta.get("normalisation")
    if not (
        isinstance(normalisation, dict)
        and all(
            isinstance(normalisation.get(k), list)
            and len(normalisation[k]) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in normalisation[k])
            for k in ("mean", "std")
        )
    ):
        return 'normalisation is not {"mean": [3 numbers], "std": [3 numbers]}'
    return None


def token_setting_problem(setting) -> str | None:
    """Why ``setting`` is not a patch-token setting RAML wrote (``cache.tokens.token_setting``), or
    None (None too for no setting)."""
    if setting is None:
        return None
    sizes = ("tokens", "per_tile", "embed_dim")
    if not (
        isinstance(setting, dict)
        and all(
            isinstance(setting.get(key), int) and not isinstance(setting[key], bool) and 0 < setting[key] <= 1_000_000
            for key in sizes
        )
    ):
        return f"{TOKEN_SETTING_ATTRIBUTE} is not a token setting with whole, positive {', '.join(sizes)}"
    tiles = CROP_LAYOUT[-1][0]
    if setting["tokens"] != tiles * tiles * setting["per_tile"] ** 2:
        return (
            f"{TOKEN_SETTING_ATTRIBUTE}: {setting['tokens']} tokens is not {tiles}x{tiles} tiles of "
            f"{setting['per_tile']}x{setting['per_tile']}"
        )
    return None


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
        make_dirs(cache_dir)
        create_exclusively(path, json.dumps(meta, indent=2))
    existing = read_fingerprint(cache_dir)
    if fingerprint_field(existing, "model_config") is None and meta.get("model_config") is not None:
        raise CacheError(
            f"{cache_dir} was written before RAML recorded the content of the model config ({path} has "
            "no model_config, only the config's name), so this run cannot prove that its features come from "
            "the same architecture. train and evaluate still read this cache; to add images to it, extract "
            "them into a new --cache-dir."
        )
    bad = mismatched_fields(existing, meta, unrecorded_matches=False)
    if bad:
        details = "; ".join(f"{k}: cache has {existing.get(k)!r}, this run {meta.get(k)!r}" for k in bad)
        raise CacheError(
            f"{cache_dir} holds features from another backbone ({details}). Features from "
            "different backbones cannot be mixed: choose another --cache-dir."
        )
    return True


def claim_token_setting(cache_dir: Path, setting: dict) -> None:
    """Record in ``cache.json`` that the cache holds patch tokens of ``setting``; refuse another setting.

    The cache keeps that setting from then on: later runs of ``extract`` add tokens to every image.
    Writers of several slots may record it at once; each writes the same file.
    """
    path = Path(cache_dir) / CACHE_JSON
    meta = read_fingerprint(cache_dir)
    recorded = meta.get(TOKEN_SETTING_ATTRIBUTE)
    if recorded is None:
        atomic_write_text(path, json.dumps({**meta, TOKEN_SETTING_ATTRIBUTE: setting}, indent=2))
    elif recorded != setting:
        differ = sorted(key for key in {*recorded, *setting} if recorded.get(key) != setting.get(key))
        raise CacheError(
            f"{cache_dir} holds patch tokens of another setting ({', '.join(differ)} differ: cache "
            f"{[recorded.get(k) for k in differ]}, this run {[setting.get(k) for k in differ]}); tokens of "
            "two settings cannot share a cache. Extract into another --cache-dir."
        )


def slot_prefix(shard_index: int, shard_count: int) -> str:
    """The name prefix of the shards of writer slot ``shard_index``/``shard_count``."""
    return f"features-{shard_index:03d}of{shard_count:03d}-"


def shard_paths(cache_dir: Path) -> list[Path]:
    return sorted(Path(cache_dir).glob(f"features-*{SHARD_SUFFIX}"))


def shards_bytes(cache_dir: Path) -> int:
    """Bytes that the finalised shards of ``cache_dir`` take on disk."""
    return sum(path.stat().st_size for path in shard_paths(cache_dir))


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
    taken = [int(p.name[len(prefix) : -len(SHARD_SUFFIX)]) for p in Path(cache_dir).glob(f"{prefix}*{SHARD_SUFFIX}")]
    return Path(cache_dir) / f"{prefix}{max(taken, default=-1) + 1:05d}{SHARD_SUFFIX}"
