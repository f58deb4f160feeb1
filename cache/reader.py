"""Reading a cache back: every finalised shard as one ``FeatureTable``, checked.

``read_cache`` verifies every shard's checksums and validates what it loads (``cache.checks``);
a shard that fails is named with the reason and the fix (delete it and re-run extract). Shards
written before checksums existed are validated only.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from raml.cache.checks import checksum_problem, shard_problem, token_row_checksum, token_rows_problem
from raml.cache.duplicates import REPAIR_COMMAND, first_copies, shard_count
from raml.cache.format import (
    CACHE_JSON,
    CHECKSUM_ATTRIBUTE,
    EVAL_MASK,
    FINGERPRINT_KEYS,
    N_CROPS,
    NUMERIC_COLUMNS,
    STRING_COLUMNS,
    TOKEN_DEFECT,
    TOKEN_ROW_CHECKSUM,
    TOKEN_SETTING_ATTRIBUTE,
    TOKENS,
    mismatched_fields,
    read_fingerprint,
    shard_paths,
)
from raml.cache.tokens import EVAL_MASK_BYTES, add_tokens_command
from raml.errors import CacheError, working_on

SHARD_FIX = "Delete it and re-run extract to recompute its images."  # for a shard that cannot be used
# Per-row columns of a FeatureTable (what ``select`` keeps of each row).
ROW_COLUMNS = (
    "features",
    "label",
    "height",
    "width",
    *STRING_COLUMNS,
    "has_tokens",
    "token_defect",
    "shard_file",
    "shard_row",
)
TOKEN_READ_ROWS = 64  # rows of tokens read at a time by ``token_chunks`` (~51 MB for ViT-B/16)


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
    # Patch tokens (cache.tokens): which rows have them, each token's defect fraction (NaN: unknown,
    # or no tokens; [N, 0] when the cache records no token setting), and where each row is stored,
    # for ``read_token_rows``: ``shards[shard_file[i]]``, row ``shard_row[i]``.
    has_tokens: np.ndarray
    token_defect: np.ndarray
    shard_file: np.ndarray
    shard_row: np.ndarray
    shards: list
    # (shard number, row) of every row left out as a second copy of an image: what ``cache.repair`` removes
    duplicate_rows: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int64))

    @property
    def token_setting(self) -> dict | None:
        """The cache's ``cache.tokens.token_setting``, or None when it holds no patch tokens."""
        return self.meta.get(TOKEN_SETTING_ATTRIBUTE)

    def __len__(self) -> int:
        return len(self.relpath)

    @property
    def categories(self) -> list[str]:
        return sorted(set(self.category.tolist()))

    def keys(self) -> set[str]:
        return set(self.relpath.tolist())

    def select(self, mask: np.ndarray) -> FeatureTable:
        """Rows where ``mask`` (bool array or index array) holds; text and meta are shared."""
        columns = {name: getattr(self, name)[mask] for name in ROW_COLUMNS}
        return FeatureTable(
            **columns,
            text=self.text,
            meta=self.meta,
            engines=self.engines,
            skipped=self.skipped,
            cache_dir=self.cache_dir,
            shards=self.shards,
            duplicate_rows=self.duplicate_rows,
        )


def read_cache(cache_dir: Path, *, with_features: bool = True, report_duplicates: bool = True) -> FeatureTable:
    """Read every finalised shard of ``cache_dir`` as one ``FeatureTable``.

    Each shard's checksums are verified and its rows validated (``rows_problem``,
    ``text_problem``); a shard that fails raises ``CacheError`` naming it. ``with_features=False``
    returns the index columns only (``features`` is empty), holding one shard's features at a
    time: resuming extraction and ``info`` check every shard without the memory of the whole table.

    An image stored more than once (two extract runs that did not see each other's work) is read
    from its first copy, in shard-name order, then row order; ``report_duplicates`` says so on
    stderr, once per process and set of shards, naming the shards and the command that removes the
    other copies (``cache.repair``). A shard removed after the listing (by that command) is left out.
    """
    cache_dir = Path(cache_dir)
    meta = read_fingerprint(cache_dir)
    if meta is None and shard_paths(cache_dir):
        raise CacheError(
            f"{cache_dir} holds {shard_count(len(shard_paths(cache_dir)))} but no {CACHE_JSON} (deleted, or not copied "
            "with them). Rebuild it from the backbone identity every shard records: "
            + REPAIR_COMMAND.format(cache_dir=cache_dir)
        )
    if meta is None:
        raise CacheError(
            f"{cache_dir} is not a RAML feature cache (no {CACHE_JSON}). "
            "Create one with: raml extract --dataset ... --cache-dir "
            f"{cache_dir}"
        )
    parts = {
        name: []
        for name in (("features",) if with_features else ())
        + NUMERIC_COLUMNS
        + STRING_COLUMNS
        + ("has_tokens", "token_defect", "shard_file", "shard_row")
    }
    text, engines, skipped = {}, set(), {}
    checks = []
    setting = meta.get(TOKEN_SETTING_ATTRIBUTE)
    token_count = setting["tokens"] if setting else 0
    shards = []
    # Each shard is checked in a second thread while the next one is read: the checks (XXH3,
    # float16 norms) run in xxhash and numpy, which release the GIL, so they overlap the reading.
    with ThreadPoolExecutor(max_workers=1) as checker:
        for path in shard_paths(cache_dir):
            with working_on(f"shard {path}"):
                try:
                    shard = load_shard(path, meta)
                except CacheError:
                    if not path.exists():  # removed since the listing: its rows are copies kept elsewhere
                        continue
                    raise
            number = len(shards)
            shards.append(path)
            checks.append((path, checker.submit(shard_problem, shard, meta["embed_dim"])))
            rows = len(shard.columns["relpath"])
            if shard.token_setting is not None and shard.token_setting != setting:
                raise CacheError(
                    f"{path}: holds patch tokens of another setting than {cache_dir / CACHE_JSON} "
                    f"records ({shard.token_setting} vs {setting}); move it to its own cache."
                )
            # the table's own columns go straight to ``parts``: the checker thread reads ``shard.columns``
            bookkeeping = {
                "has_tokens": np.full(rows, shard.token_setting is not None),
                "token_defect": shard.columns.get(TOKEN_DEFECT, np.full((rows, token_count), np.nan, np.float16)),
                "shard_file": np.full(rows, number, np.int32),
                "shard_row": np.arange(rows, dtype=np.int32),
            }
            for name in parts:
                parts[name].append(bookkeeping[name] if name in bookkeeping else shard.columns[name])
            if rows:
                engines.add(shard.engine)
            text.update(shard.text)
            skipped.update(shard.skipped)
    for path, check in checks:
        problem = check.result()
        if problem:
            raise CacheError(f"{path}: {problem}. {SHARD_FIX}")
    dim = meta["embed_dim"]
    columns = {}
    for name, chunks in parts.items():
        if name == "features":
            columns[name] = np.concatenate(chunks) if chunks else np.zeros((0, N_CROPS, dim), np.float16)
        elif name == "token_defect":
            columns[name] = np.concatenate(chunks) if chunks else np.zeros((0, token_count), np.float16)
        elif name in STRING_COLUMNS:
            columns[name] = np.concatenate(chunks) if chunks else np.array([], dtype=str)
        else:
            columns[name] = np.concatenate(chunks) if chunks else np.array([], dtype=np.int32)
    if not with_features:
        columns["features"] = np.zeros((len(columns["relpath"]), 0, 0), np.float16)
    columns, duplicate_rows = first_copies(columns, shards, cache_dir, report_duplicates)
    order = np.lexsort((columns["relpath"], columns["category"]))
    columns = {name: values[order] for name, values in columns.items()}
    have = set(columns["relpath"].tolist())
    still_skipped = sorted((p, r) for p, r in skipped.items() if p not in have)
    return FeatureTable(
        **columns,
        text=text,
        meta=meta,
        engines=sorted(engines),
        skipped=still_skipped,
        cache_dir=cache_dir,
        shards=shards,
        duplicate_rows=duplicate_rows,
    )


def read_token_rows(table: FeatureTable, rows) -> tuple[np.ndarray, np.ndarray]:
    """The patch tokens [n, T, D] float16 and packed scoring masks [n, EVAL_MASK_BYTES] uint8 of
    ``table``'s ``rows``, in that order: one read per image, each row checked against its checksum
    and validated (unit-norm tokens). A ``CacheError`` when a row has no tokens says which ``extract``
    command adds them."""
    rows = np.asarray(rows, np.int64)
    require_tokens(table, rows)
    setting = table.token_setting
    tokens = np.empty((len(rows), setting["tokens"], table.meta["embed_dim"]), np.float16)
    masks = np.empty((len(rows), EVAL_MASK_BYTES), np.uint8)
    for number in np.unique(table.shard_file[rows]):
        path = table.shards[number]
        here = np.flatnonzero(table.shard_file[rows] == number)
        try:
            with h5py.File(path, "r") as h5:
                stored_tokens, stored_masks, checksums = h5[TOKENS], h5[EVAL_MASK], h5[TOKEN_ROW_CHECKSUM][...]
                names = h5["relpath"][...]
                for position in here:
                    row = int(table.shard_row[rows[position]])
                    _same_image(path, row, names, table.relpath[rows[position]])
                    tokens[position], masks[position] = stored_tokens[row], stored_masks[row]
                    if token_row_checksum(tokens[position], masks[position]) != checksums[row]:
                        raise CacheError(
                            f"{path}: the patch tokens of row {row} ({table.relpath[rows[position]]}) "
                            f"do not match their checksum (corrupted). {SHARD_FIX}"
                        )
        except CacheError:
            raise
        except Exception as err:  # h5py raises many types for a damaged file (OSError, KeyError, ValueError, ...)
            raise CacheError(f"{path}: unreadable patch tokens ({type(err).__name__}: {err}). {SHARD_FIX}") from None
        problem = token_rows_problem(tokens[here], masks[here], setting, table.meta["embed_dim"])
        if problem:
            raise CacheError(f"{path}: {problem}. {SHARD_FIX}")
    return tokens, masks


def _same_image(path: Path, row: int, names, relpath: str) -> None:
    """A ``CacheError`` unless row ``row`` of the shard (whose relpath dataset is ``names``) is still
    ``relpath``'s: a shard rewritten since the table was read (``cache.repair`` removes rows) has
    moved its rows, and its row checksums cannot tell."""
    stored = names[row] if row < len(names) else b""
    stored = stored.decode("utf-8", "surrogateescape") if isinstance(stored, bytes) else str(stored)
    if stored != relpath:
        raise CacheError(
            f"{path}: row {row} no longer holds {relpath}: the shard was rewritten since this command read the "
            "cache (a repair or an extract meanwhile). Run the command again."
        )


def token_chunks(table: FeatureTable, rows, size: int = TOKEN_READ_ROWS):
    """``read_token_rows`` of ``rows`` in consecutive chunks of ``size``: yields (positions in ``rows``,
    tokens, masks), so that the tokens of many images need not be in memory at once."""
    rows = np.asarray(rows, np.int64)
    require_tokens(table, rows)
    for start in range(0, len(rows), size):
        yield (np.arange(start, min(start + size, len(rows))), *read_token_rows(table, rows[start : start + size]))


def require_tokens(table: FeatureTable, rows=None) -> None:
    """A ``CacheError`` naming the ``extract`` command that adds them, when any of ``rows`` (default:
    all) has no patch tokens."""
    rows = np.arange(len(table)) if rows is None else np.asarray(rows, np.int64)
    missing = int((~table.has_tokens[rows]).sum()) if len(rows) else 0
    if missing:
        raise CacheError(
            f"{table.cache_dir}: {missing} of the {len(rows)} images needed have no patch tokens (maps "
            f"are drawn from them). Add them, re-encoding only those images: "
            f"{add_tokens_command(table.meta, table.cache_dir)}"
        )


@dataclass
class LoadedShard:
    """A shard's datasets as read by ``load_shard``, not yet checked (``shard_problem``)."""

    columns: dict  # features, label, height, width and the string columns (decoded)
    text: dict  # category → {"normal": [P, D], "anomalous": [P, D]}
    skipped: dict  # relpath → reason
    engine: str | None
    encoded: dict  # every string dataset by name, as the UTF-8 bytes stored
    checksums: dict | None  # recorded XXH3-64 by dataset name; None in shards written before them
    attributes: dict = field(default_factory=dict)  # every attribute but the checksums, as stored (JSON text)
    format_version: int = 1
    token_setting: dict | None = None  # the shard's patch-token setting; None without tokens

    def numeric(self) -> dict:
        """Every numeric dataset by name, as stored (of the token datasets, the two read with the table)."""
        tokens = (TOKEN_DEFECT, TOKEN_ROW_CHECKSUM) if self.token_setting else ()
        return {
            **{name: self.columns[name] for name in ("features", *NUMERIC_COLUMNS, *tokens)},
            **{
                f"text/{category}/{kind}": vectors
                for category, kinds in self.text.items()
                for kind, vectors in kinds.items()
            },
        }


def load_shard(path: Path, meta: dict) -> LoadedShard:
    """Read a shard's datasets; a ``CacheError`` if it is unreadable or of another backbone."""
    try:
        with h5py.File(path, "r") as h5:
            shard_meta = {key: json.loads(h5.attrs[key]) for key in FINGERPRINT_KEYS if key in h5.attrs}
            columns = {name: h5[name][...] for name in ("features", *NUMERIC_COLUMNS)}
            text = {
                category: {kind: h5[f"text/{category}/{kind}"][...] for kind in ("normal", "anomalous")}
                for category in h5.get("text", {})
            }
            encoded = {
                name: [value if isinstance(value, bytes) else value.encode("utf-8") for value in h5[name][...].tolist()]
                for name in (*STRING_COLUMNS, "skipped/relpath", "skipped/reason")
            }
            engine = json.loads(h5.attrs["engine"])
            checksums = json.loads(h5.attrs[CHECKSUM_ATTRIBUTE]) if CHECKSUM_ATTRIBUTE in h5.attrs else None
            attributes = {key: str(value) for key, value in h5.attrs.items() if key != CHECKSUM_ATTRIBUTE}
            format_version = json.loads(h5.attrs["format_version"]) if "format_version" in h5.attrs else 1
            token_setting = (
                json.loads(h5.attrs[TOKEN_SETTING_ATTRIBUTE]) if TOKEN_SETTING_ATTRIBUTE in h5.attrs else None
            )
            if token_setting is not None:
                columns.update({name: h5[name][...] for name in (TOKEN_DEFECT, TOKEN_ROW_CHECKSUM)})
    except Exception as err:  # h5py raises many types for a damaged file (OSError, RuntimeError, KeyError, ...)
        raise CacheError(f"{path}: unreadable shard ({type(err).__name__}: {err}). {SHARD_FIX}") from None
    bad = mismatched_fields(meta, shard_meta, unrecorded_matches=False)
    if bad:
        raise CacheError(
            f"{path}: written by another backbone than {path.parent / CACHE_JSON} "
            f"(fields {', '.join(bad)}); move it to its own cache."
        )
    shard = LoadedShard(
        columns=columns,
        text=text,
        skipped={},
        engine=engine,
        encoded=encoded,
        checksums=checksums,
        attributes=attributes,
        format_version=format_version if isinstance(format_version, int) else 2,
        token_setting=token_setting,
    )
    strings = {}
    for name, values in encoded.items():
        try:
            strings[name] = np.array([value.decode("utf-8") for value in values], dtype=str)
        except UnicodeDecodeError as err:
            problem = checksum_problem(shard) or f"dataset {name} holds bytes that are not UTF-8 ({err})"
            raise CacheError(f"{path}: {problem}. {SHARD_FIX}") from None
    columns.update({name: strings[name] for name in STRING_COLUMNS})
    shard.skipped = dict(zip(strings["skipped/relpath"].tolist(), strings["skipped/reason"].tolist()))
    return shard
