"""Repairing a cache from what its shards hold: a lost ``cache.json``, images stored twice.

Every shard carries the cache's fingerprint in its attributes, under the attribute checksum
(``cache.checks``), so a ``cache.json`` that was deleted (a sync tool that skips small files, a
cleanup script, a hand edit gone wrong) can be rebuilt from them: ``restore_fingerprint``, only
when every shard records the same backbone identity (and, for ``extract``, the run's own).

``extract`` calls it before anything else, and resumes: the shards are the source of truth, their
identity is checksummed and must agree, so the rebuilt file is the one that was lost, and stopping
instead would only make the user run the repair command by hand before the same re-run. A cache
whose shards disagree, or that holds another backbone than the run's, stops the run with what is
there and what to do; nothing is encoded a second time.

``repair_cache`` (``raml info --repair``) rebuilds ``cache.json`` the same way (without a backbone
to match) and removes the images stored more than once (``cache.duplicates``): the first copy of
each (shard-name order, then row order) is kept, the rows and patch tokens of the others are
checked against their checksums, and each shard holding later copies is written anew without them
(``cache.writer.write_shard``: ``.partial``, fsync, rename) or, if it holds nothing else, deleted.
Only later copies are ever removed, so a ``kill -9`` at any point leaves every image with its
first copy and every shard old or new: the cache reads as before, and running the repair again
finishes it. The repair holds the writer slot 0/1 (``cache.lock``), so no ``extract`` writes the
cache meanwhile.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from raml.cache.checks import ATTRIBUTES, attributes_checksum, shard_problem
from raml.cache.duplicates import REPAIR_COMMAND, named_shards, shard_count
from raml.cache.files import create_exclusively, remove_durably
from raml.cache.format import (
    CACHE_JSON,
    CHECKSUM_ATTRIBUTE,
    FINGERPRINT_KEYS,
    STRING_COLUMNS,
    TOKEN_DEFECT,
    TOKEN_SETTING_ATTRIBUTE,
    fingerprint_field,
    fingerprint_problem,
    mismatched_fields,
    shard_paths,
)
from raml.cache.lock import WriterSlot
from raml.cache.reader import SHARD_FIX, FeatureTable, load_shard, read_cache, read_token_rows
from raml.cache.writer import ShardRows, write_shard
from raml.errors import CacheError, human_bytes

NOT_FINGERPRINT = ("engine", TOKEN_SETTING_ATTRIBUTE)  # shard attributes that are not the cache's fingerprint


class StoredImage(NamedTuple):
    """A stored row's index columns, as ``write_shard`` takes its records."""

    category: str
    label: int
    defect_type: str
    relpath: str
    split: str
    mask_relpath: str


@dataclass
class RepairSummary:
    """What ``repair_cache`` did."""

    restored: str | None = None  # the line saying that cache.json was rebuilt
    copies_removed: int = 0
    rewritten: list = field(default_factory=list)  # shards written anew without their copies
    deleted: list = field(default_factory=list)  # shards that held copies only
    bytes_freed: int = 0

    def lines(self) -> list[str]:
        lines = [f"repair: {self.restored}"] if self.restored else []
        if self.copies_removed:
            lines.append(
                f"repair: removed {self.copies_removed} extra copies of images ({len(self.rewritten)} shards "
                f"rewritten, {len(self.deleted)} deleted, {human_bytes(self.bytes_freed)} freed); the first copy "
                "of each image is kept"
            )
        return lines or ["repair: nothing to repair"]


def shard_attributes(path: Path) -> dict:
    """The attributes of the shard at ``path``, parsed, once they match their checksum (shards written
    before the attributes had one are taken as they are; reading the cache validates their rows)."""
    try:
        with h5py.File(path, "r") as h5:
            stored = {key: str(value) for key, value in h5.attrs.items() if key != CHECKSUM_ATTRIBUTE}
            checksums = json.loads(h5.attrs[CHECKSUM_ATTRIBUTE]) if CHECKSUM_ATTRIBUTE in h5.attrs else {}
        attributes = {key: json.loads(value) for key, value in stored.items()}
    except Exception as err:  # h5py raises many types for a damaged file; json a ValueError
        raise CacheError(f"{path}: unreadable shard ({type(err).__name__}: {err}). {SHARD_FIX}") from None
    if ATTRIBUTES in checksums and attributes_checksum(stored) != checksums[ATTRIBUTES]:
        raise CacheError(f"{path}: its attributes do not match their checksum (corrupted). {SHARD_FIX}")
    return attributes


def describe_backbone(meta: dict) -> str:
    """``ViT-B-16 (sha256:0123456789ab; openai), fp32``: a fingerprint in a few words."""
    config = (fingerprint_field(meta, "model_config") or "config not recorded")[:19]
    random = ", random weights" if meta.get("random_weights") else ""
    return f"{meta.get('backbone')} ({config}; {meta.get('weights')}{random}), {fingerprint_field(meta, 'precision')}"


def restore_fingerprint(cache_dir: Path, expected: dict | None = None) -> str | None:
    """Rebuild the ``cache.json`` of a directory that holds shards but none (see the module
    docstring), atomically; return the line that says so, or None when there was nothing to do
    (a ``cache.json``, or no shard). ``expected``: the fingerprint of the run that wants to add to
    the cache, which the shards must match. A ``CacheError`` says what the shards hold when they
    disagree, or differ from ``expected``, and writes nothing."""
    cache_dir = Path(cache_dir)
    shards = shard_paths(cache_dir)
    if (cache_dir / CACHE_JSON).exists() or not shards:
        return None
    recorded = {path: shard_attributes(path) for path in shards}
    backbones = {}
    for path, attributes in recorded.items():
        identity = json.dumps([fingerprint_field(attributes, key) for key in FINGERPRINT_KEYS], sort_keys=True)
        backbones.setdefault(identity, []).append(path)
    if len(backbones) > 1:
        found = "; ".join(
            f"{named_shards([path.name for path in paths])}: {describe_backbone(recorded[paths[0]])}"
            for paths in backbones.values()
        )
        raise CacheError(
            f"{cache_dir} has no {CACHE_JSON}, and its shards record {len(backbones)} different backbones ({found}). "
            "Features of different backbones cannot share a cache: move each backbone's shards into a directory "
            f"of its own, then run {REPAIR_COMMAND.format(cache_dir='DIR')} on each."
        )
    settings = {
        json.dumps(attributes[TOKEN_SETTING_ATTRIBUTE], sort_keys=True)
        for attributes in recorded.values()
        if attributes.get(TOKEN_SETTING_ATTRIBUTE) is not None
    }
    if len(settings) > 1:
        raise CacheError(
            f"{cache_dir} has no {CACHE_JSON}, and its shards hold patch tokens of {len(settings)} different "
            f"settings ({', '.join(sorted(settings))}); tokens of two settings cannot share a cache: move the shards "
            "of each setting into a directory of its own."
        )
    # The fields that are not the backbone's (dataset, prompts, code version, backbone source) are
    # the first shard's: the first written under the lost file, which its first run created.
    meta = {key: value for key, value in recorded[shards[0]].items() if key not in NOT_FINGERPRINT}
    if settings:
        meta[TOKEN_SETTING_ATTRIBUTE] = json.loads(settings.pop())
    problem = fingerprint_problem(meta)
    if problem:
        raise CacheError(
            f"{cache_dir} has no {CACHE_JSON}, and the fingerprint its shards record is not one RAML wrote "
            f"({problem}), so none can be rebuilt. Extract into a new --cache-dir."
        )
    bad = [] if expected is None else mismatched_fields(meta, expected, unrecorded_matches=False)
    if bad:
        details = "; ".join(f"{key}: shards {meta.get(key)!r}, this run {expected.get(key)!r}" for key in bad)
        raise CacheError(
            f"{cache_dir} has no {CACHE_JSON}, and the features in its {shard_count(len(shards))} are of another "
            f"backbone than this run's ({details}). Extract into another --cache-dir; to use this cache as it is, "
            f"rebuild its {CACHE_JSON}: {REPAIR_COMMAND.format(cache_dir=cache_dir)}"
        )
    if not create_exclusively(cache_dir / CACHE_JSON, json.dumps(meta, indent=2)):
        return None  # another process rebuilt it at the same moment, from the same shards
    return (
        f"{cache_dir} had no {CACHE_JSON}: rebuilt it from the backbone identity recorded in its "
        f"{shard_count(len(shards))} ({describe_backbone(meta)})"
    )


def repair_cache(cache_dir: Path) -> RepairSummary:
    """Rebuild a lost ``cache.json`` and remove the extra copies of images (see the module docstring)."""
    cache_dir = Path(cache_dir)
    summary = RepairSummary()
    with WriterSlot(cache_dir, 0, 1) as slot:
        slot.remove_stale_partials()  # those of killed runs, a killed repair's included
        summary.restored = restore_fingerprint(cache_dir)
        table = read_cache(cache_dir, with_features=False, report_duplicates=False)
        for number in np.unique(table.duplicate_rows[:, 0]):
            path = table.shards[number]
            copies = table.duplicate_rows[table.duplicate_rows[:, 0] == number, 1]
            before = path.stat().st_size
            if _write_without(path, table, number, set(copies.tolist())):
                summary.rewritten.append(path)
                summary.bytes_freed += before - path.stat().st_size
            else:
                summary.deleted.append(path)
                summary.bytes_freed += before
            summary.copies_removed += len(copies)
    return summary


def _write_without(path: Path, table: FeatureTable, number: int, copies: set) -> bool:
    """Write shard ``number`` of ``table`` (at ``path``) anew without its rows ``copies``, or delete it
    when nothing else is left; returns whether it still exists. Its other rows, prompts, skipped
    files and attributes are kept as stored, their patch tokens read and checked row by row."""
    shard = load_shard(path, table.meta)
    problem = shard_problem(shard, table.meta["embed_dim"])  # read_cache checked it; it is copied from here
    if problem:
        raise CacheError(f"{path}: {problem}. {SHARD_FIX}")
    columns = shard.columns
    kept = [row for row in range(len(columns["relpath"])) if row not in copies]
    if not kept and not shard.skipped:
        remove_durably(path)
        return False
    rows = ShardRows(
        features=[columns["features"][row] for row in kept],
        records=[
            StoredImage(label=int(columns["label"][row]), **{name: str(columns[name][row]) for name in STRING_COLUMNS})
            for row in kept
        ],
        sizes=[(int(columns["height"][row]), int(columns["width"][row])) for row in kept],
        skipped=list(shard.skipped.items()),
    )
    if shard.token_setting is not None:
        mine = np.flatnonzero(table.shard_file == number)  # the table holds exactly the kept rows
        mine = mine[np.argsort(table.shard_row[mine])]
        if table.shard_row[mine].tolist() != kept:
            raise AssertionError(f"{path}: the table's rows {table.shard_row[mine].tolist()} are not the kept {kept}")
        tokens, masks = read_token_rows(table, mine) if kept else ([], [])
        rows.tokens, rows.eval_masks = list(tokens), list(masks)
        rows.token_defect = [columns[TOKEN_DEFECT][row] for row in kept]
    meta = {key: json.loads(value) for key, value in shard.attributes.items() if key not in NOT_FINGERPRINT}
    write_shard(path, rows, meta, shard.text, shard.engine, shard.token_setting)
    return True
