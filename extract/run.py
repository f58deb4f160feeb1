"""Stage one: run CLIP once per image and write the 21 crop embeddings into the shard store.

Work is split deterministically: the dataset's sorted records are dealt to ``shard_count``
writers (``records[shard_index::shard_count]``); each writer drops the images its cache already
holds and cuts the rest into chunks of ``shard_size`` images, one HDF5 shard each. Batches never
straddle a chunk, so a run that is killed and re-run encodes exactly the same batches as one
uninterrupted run and yields the same features.

**Patch tokens** (``patch_tokens=True``, or a cache that records them: ``cache.tokens``). New
shards hold them from the start, from the same forward pass as the features, with each image's
mask targets (read by the loader's workers). A shard of this writer slot that has none yet is one
more chunk: its images are encoded again, and the shard is written anew (to ``*.partial``, then
renamed over the old one) with its stored features, prompts and skipped files unchanged and the
tokens added. Only such shards are re-encoded; a kill at any point leaves each shard old or new,
never half, and a re-run encodes what is still missing in the same batches.

The crops come from ``extract.loader.CropBatches`` (worker processes, shared memory, batches
staged on the encoder's device ahead of use); finished shards go to a ``ShardWriter`` thread, so
the encoder waits neither for decoding nor for HDF5.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raml.cache import N_CROPS, ShardRows, claim_cache, fingerprint, read_cache, write_shard
from raml.cache.files import atomic_write_text
from raml.cache.format import claim_token_setting, next_shard_path, slot_prefix
from raml.cache.lock import WriterSlot
from raml.cache.reader import LoadedShard, load_shard
from raml.cache.repair import restore_fingerprint
from raml.cache.tokens import TOKEN_CROPS, token_bytes_per_image, token_setting
from raml.errors import printable, working_on
from raml.extract.config import ExtractConfig
from raml.extract.datasets import ImageRecord, name_problem, read_dataset
from raml.extract.engines import usable_cores
from raml.extract.identity import BackboneIdentity, identity_of
from raml.extract.plan import batch_indices, check_free_space, limit_per_category, parse_shard
from raml.extract.prompts import encode_prompts, prompt_spec
from raml.extract.pyramid import BadImageError
from raml.extract.shard_writer import ShardWriter

CODE_VERSION = "0.1.0"


@dataclass
class ExtractSummary:
    cache_dir: Path
    images: int = 0  # newly encoded
    skipped: list = field(default_factory=list)
    already_cached: int = 0
    seconds: float = 0.0
    stale_partials: list = field(default_factory=list)  # partial shards of killed runs, removed
    not_read: list = field(default_factory=list)  # (path, reason): entries of image folders not read
    report: Path | None = None  # the report written, if any
    tokens_added: int = 0  # cached images whose shards got their patch tokens in this run
    untokened_elsewhere: list = field(default_factory=list)  # shards of other writer slots still without tokens

    def line(self) -> str:
        rate = (self.images + self.tokens_added) / self.seconds if self.seconds else 0.0
        tokens = f", patch tokens added to {self.tokens_added} cached images" if self.tokens_added else ""
        not_read = f", {len(self.not_read)} not read: see {self.report}" if self.not_read else ""
        return (
            f"extract: {self.images} images encoded, {len(self.skipped)} skipped, "
            f"{self.already_cached} already cached{tokens}{not_read}, {self.seconds:.1f} s, {rate:.2f} images/s "
            f"→ {self.cache_dir}"
        )


@dataclass
class Chunk:
    """The images of one shard, in its row order: a new shard of the writer slot, or (``replaces``)
    an existing shard that is written anew with its patch tokens."""

    records: list  # ImageRecord
    replaces: LoadedShard | None = None  # the stored shard: its features, prompts and skipped files are kept
    path: Path | None = None  # where ``replaces`` lies


def extract_features(
    dataset: str,
    root,
    cache_dir,
    backbone_loader,
    config: ExtractConfig | None = None,
    *,
    identity: BackboneIdentity | None = None,
    backbone_source: dict | None = None,
    progress: bool = True,
) -> ExtractSummary:
    """Encode every image of ``dataset`` not yet in ``cache_dir``, as ``config`` says (default:
    ``ExtractConfig()``; its ``engine`` and ``fidelity_sample`` are the loader's business); see the
    module docstring.

    ``config.patch_tokens``: store the images' patch tokens too (``cache.tokens``), and add them to the
    shards of this writer slot that have none; a cache that records tokens gets them whether or not
    this is given.

    ``backbone_loader`` is called at most once, and only when there is something to encode, to get
    a ``ClipBackbone`` or any object with the same attributes and ``encode_crops``/``encode_texts``.
    ``identity`` (``extract.identity.backbone_identity`` of the options the loader loads) lets the
    run check the cache and find out whether there is anything to encode without loading the
    backbone; without it the backbone is loaded first. A loaded backbone whose identity differs
    from ``identity`` is a bug (``RuntimeError``).
    ``backbone_source`` (``{"model", "weights_file"}``: the model name or config path, and the
    weights file, as given) is recorded in a new cache's ``cache.json`` beside the fingerprint,
    so that a checkpoint trained on it can load its backbone again (``predict``, ``export``).

    The run holds its writer slot (``cache.lock.WriterSlot``) from start to end: another process on
    the same cache and shard stops at once, having written nothing.
    """
    config = config or ExtractConfig()
    cache_dir = Path(cache_dir)
    shard_size = config.shard_size
    if shard_size % config.batch_size:
        shard_size = max(config.batch_size, shard_size - shard_size % config.batch_size)  # batches must tile a shard
    start = time.perf_counter()
    not_read = []
    root, records = read_dataset(dataset, root, config.categories, not_read=not_read)
    records = limit_per_category(records, config.limit)
    shard_index, shard_count = parse_shard(config.shard)
    mine = records[shard_index::shard_count]
    backbone = None
    if identity is None:
        backbone = backbone_loader()
        identity = identity_of(backbone)
    meta = fingerprint(
        **identity.fingerprint_fields(),
        code_version=CODE_VERSION,
        dataset={"kind": dataset, "root": str(root)},
        prompts=prompt_spec(),
    )
    if backbone_source is not None:
        meta["backbone_source"] = backbone_source
    with WriterSlot(cache_dir, shard_index, shard_count) as slot:
        restored = restore_fingerprint(cache_dir, meta)  # shards without cache.json: never encoded a second time
        if restored:
            print(f"extract: {restored}; resuming", file=sys.stderr, flush=True)
        exists = claim_cache(cache_dir, meta, create=False)  # another backbone's cache: refused before loading
        summary = ExtractSummary(
            cache_dir=cache_dir,
            stale_partials=slot.remove_stale_partials(),
            not_read=[(printable(str(path)), reason) for path, reason in not_read],
        )
        cached = read_cache(cache_dir, with_features=False) if exists else None
        done = (
            set()
            if cached is None
            else cached.keys() | (set() if config.retry_skipped else {path for path, _ in cached.skipped})
        )
        pending = [r for r in mine if printable(r.relpath) not in done]
        summary.already_cached = len(mine) - len(pending)
        pending, unstorable = _storable_names(pending, root, config.skip_bad, summary)
        with_tokens = config.patch_tokens or bool(cached is not None and cached.token_setting)
        untokened = _shards_without_tokens(cached, shard_index, shard_count, summary) if with_tokens else []
        if not with_tokens:  # with tokens, checked once the backbone says how large they are
            check_free_space(cache_dir, len(pending), cached, identity.embed_dim, shard_size)
        if (pending or untokened) and backbone is None:
            backbone = backbone_loader()  # may refuse, having checked itself (int8 fidelity): nothing written yet
            if identity_of(backbone) != identity:
                raise RuntimeError(
                    f"backbone_loader loaded {identity_of(backbone)}, but the run was checked "
                    f"against {identity}: they must describe the same backbone"
                )
        chunks = [_rewrite(path, meta) for path in untokened]
        chunks += [Chunk(pending[first : first + shard_size]) for first in range(0, len(pending), shard_size)]
        setting = None
        if with_tokens and chunks:
            setting = token_setting(backbone.patch_grid, backbone.embed_dim)
            check_free_space(
                cache_dir,
                len(pending),
                cached,
                identity.embed_dim,
                shard_size,
                token_images=sum(len(chunk.records) for chunk in chunks),
                token_bytes=token_bytes_per_image(setting),
            )
        claim_cache(cache_dir, meta)
        if setting is not None:
            claim_token_setting(cache_dir, setting)  # refuses tokens of another setting before any is written
        if unstorable:
            write_shard(
                next_shard_path(cache_dir, shard_index, shard_count),
                ShardRows(skipped=unstorable),
                meta,
                text={},
                engine=None,
            )
        destination = _Destination(cache_dir, shard_index, shard_count, meta)
        if not chunks:
            summary.seconds = time.perf_counter() - start
            if summary.skipped or summary.not_read:
                _write_report(destination, summary)
            return summary
        return _encode_chunks(root, chunks, backbone, setting, destination, summary, start, config, progress)


def _storable_names(
    pending: list[ImageRecord], root: Path, skip_bad: bool, summary: ExtractSummary
) -> tuple[list[ImageRecord], list[tuple[str, str]]]:
    """The records of ``pending`` whose names a cache can hold (``name_problem``), and (relpath,
    reason) of the others. Without ``skip_bad`` any such name stops the run, named; with it, they
    are listed in ``summary`` as skipped, and the caller records them in a shard of their own."""
    refused = [(record.relpath, problem) for record in pending if (problem := name_problem(record))]
    if refused and not skip_bad:
        relpath, problem = refused[0]
        raise BadImageError(
            root / relpath, problem + " (pass --skip-bad to skip such files and list them in the cache's report)"
        )
    summary.skipped += [(printable(str(root / relpath)), problem) for relpath, problem in refused]
    return [record for record in pending if not name_problem(record)], refused


def _shards_without_tokens(cached, shard_index: int, shard_count: int, summary: ExtractSummary) -> list[Path]:
    """The shards of this writer slot that hold images without patch tokens (their names carry the slot);
    those of other slots are listed in ``summary``: runs of their own slots add their tokens."""
    if cached is None:
        return []
    lacking = [cached.shards[number] for number in np.unique(cached.shard_file[~cached.has_tokens])]
    prefix = slot_prefix(shard_index, shard_count)
    summary.untokened_elsewhere = [path.name for path in lacking if not path.name.startswith(prefix)]
    return [path for path in lacking if path.name.startswith(prefix)]


def _rewrite(path: Path, meta: dict) -> Chunk:
    """The chunk that writes the stored shard at ``path`` anew with patch tokens: its rows as the
    records they were encoded from, in its order."""
    shard = load_shard(path, meta)
    columns = shard.columns
    records = [
        ImageRecord(
            str(columns["category"][row]),
            int(columns["label"][row]),
            str(columns["defect_type"][row]),
            str(columns["relpath"][row]),
            str(columns["split"][row]),
            str(columns["mask_relpath"][row]),
        )
        for row in range(len(columns["relpath"]))
    ]
    return Chunk(records, shard, path)


@dataclass(frozen=True)
class _Destination:
    """Where a run writes: its cache, its writer slot (``shard_index`` of ``shard_count``) and the
    fingerprint its shards carry."""

    cache_dir: Path
    shard_index: int
    shard_count: int
    meta: dict


def _encode_chunks(
    root: Path,
    chunks: list[Chunk],
    backbone,
    setting: dict | None,
    destination: _Destination,
    summary: ExtractSummary,
    start: float,
    config: ExtractConfig,
    progress: bool,
) -> ExtractSummary:
    """Encode the chunks' images in batches and write them shard by shard (see the module docstring);
    with a token ``setting``, the patch tokens and mask targets of every image too."""
    from raml.extract.loader import CropBatches  # torch: imported only when there is something to encode

    records = [record for chunk in chunks for record in chunk.records]
    text = {
        c: encode_prompts(backbone, c)
        for c in sorted({r.category for chunk in chunks if chunk.replaces is None for r in chunk.records})
    }

    def write(chunk: Chunk, rows: ShardRows) -> None:
        if chunk.replaces is None:
            path = next_shard_path(destination.cache_dir, destination.shard_index, destination.shard_count)
            write_shard(path, rows, destination.meta, text, backbone.engine, setting)
            return
        stored = chunk.replaces.columns
        rows.features, rows.sizes = list(stored["features"]), list(zip(stored["height"], stored["width"]))
        rows.skipped = list(chunk.replaces.skipped.items())
        write_shard(chunk.path, rows, destination.meta, chunk.replaces.text, chunk.replaces.engine, setting)

    rows, chunk_index = ShardRows(), 0
    per_tile, dim = (setting["per_tile"] if setting else None), backbone.embed_dim
    with (
        CropBatches(
            root,
            records,
            batch_indices([len(chunk.records) for chunk in chunks], config.batch_size),
            backbone.input_size,
            workers=usable_cores() if config.workers is None else config.workers,
            device=backbone.crops_device,
            per_tile=per_tile,
        ) as loader,
        ShardWriter(write) as writer,
        tqdm(
            total=len(records),
            unit="img",
            desc=f"extract {destination.shard_index}/{destination.shard_count}",
            disable=not progress,
            dynamic_ncols=True,
        ) as bar,
    ):
        for batch in loader:
            chunk = chunks[chunk_index]
            for image in batch.bad:
                path = root / records[image.index].relpath
                if chunk.replaces is not None:
                    raise BadImageError(
                        path,
                        f"{image.reason}; it is cached in {chunk.path.name}, which cannot get "
                        "its patch tokens without it (its features stay): fix the file and re-run",
                    )
                if not config.skip_bad:
                    raise BadImageError(
                        path, image.reason + " (pass --skip-bad to skip such files and list them in the cache's report)"
                    )
                rows.skipped.append((records[image.index].relpath, image.reason))
                summary.skipped.append((str(path), image.reason))
            good = batch.good
            if good:
                with working_on(f"a batch of {len(good)} images from {root / records[good[0].index].relpath}"):
                    if setting is None:
                        features = backbone.encode_crops(batch.crops)
                    else:
                        features, tokens = backbone.encode_crops_and_tokens(batch.crops)
                        tokens = tokens.reshape(len(good), N_CROPS, -1, dim)[:, TOKEN_CROPS].reshape(len(good), -1, dim)
                for k, image in enumerate(good):
                    rows.features.append(features[k * N_CROPS : (k + 1) * N_CROPS].astype(np.float16))
                    rows.records.append(records[image.index])
                    rows.sizes.append(image.size)
                    if setting is not None:
                        rows.tokens.append(tokens[k].astype(np.float16))
                        rows.token_defect.append(image.targets[0])
                        rows.eval_masks.append(image.targets[1])
                if chunk.replaces is None:
                    summary.images += len(good)
                else:
                    summary.tokens_added += len(good)
            bar.update(len(batch.images))
            if len(rows) == len(chunk.records):
                writer.submit(chunk, rows)
                rows, chunk_index = ShardRows(), chunk_index + 1
    summary.seconds = time.perf_counter() - start
    _write_report(destination, summary)
    return summary


def _write_report(destination: _Destination, summary: ExtractSummary) -> None:
    """A human-readable record of the run next to the shards (the shards stay the source of truth)."""
    report = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "shard": f"{destination.shard_index}/{destination.shard_count}",
        "images": summary.images,
        "already_cached": summary.already_cached,
        "patch_tokens_added": summary.tokens_added,
        "seconds": round(summary.seconds, 2),
        "skipped": [{"path": path, "reason": reason} for path, reason in summary.skipped],
        "not_read": [{"path": path, "reason": reason} for path, reason in summary.not_read],
    }
    path = destination.cache_dir / f"extract-report-{destination.shard_index:03d}of{destination.shard_count:03d}.json"
    atomic_write_text(path, json.dumps(report, indent=2))
    summary.report = path
