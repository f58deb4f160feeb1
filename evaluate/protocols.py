"""Which images a model is scored on: the three evaluation protocols.

- ``holdout``: exactly the images the training run held out, read from its split manifest
  (docs/method.md#the-holdout-split: all train/good + 80 % of the official test set train; the other 20 % is scored).
- ``transfer``: every official test image of another dataset's cache, no fine-tuning
  (a model trained on MVTec AD scored on VisA, and the reverse).
- ``official``: every official test image of the dataset (zero-shot methods such as WinCLIP, or a
  model trained on another dataset).

Every results file records the protocol and the hash of the exact image list
(``train.split.image_list_hash``); ``report`` refuses to compare rows with different hashes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raml.cache.files import read_json_checked
from raml.errors import UserError
from raml.train.checkpoint import load_checkpoint
from raml.train.split import image_list_hash, manifest_problem, rows_for

PROTOCOLS = ("holdout", "transfer", "official")


@dataclass(frozen=True)
class ImageList:
    """The exact images a results file was scored on, and where that list came from."""

    protocol: str
    relpaths: tuple  # sorted, relative to the dataset root
    dataset: dict  # {"kind": ..., "root": ...} of the images
    source: str  # the split manifest it was read from, or the cache / dataset root

    @property
    def hash(self) -> str:
        return image_list_hash(list(self.relpaths))

    def describe(self) -> dict:
        """What a results file records about the protocol."""
        return {
            "name": self.protocol,
            "image_list_hash": self.hash,
            "n_images": len(self.relpaths),
            "dataset": self.dataset,
            "source": self.source,
        }


def held_out_relpaths(manifest: dict, source: str) -> list[str]:
    """The held-out images of a training run's split manifest, checked (there must be some)."""
    if not isinstance(manifest, dict) or "heldout" not in manifest or "train" not in manifest:
        raise UserError(f"{source}: not a split manifest with 'train' and 'heldout' image lists")
    if not manifest["heldout"]:
        raise UserError(
            f"{source} held out no images (its split put every image into training), so there is "
            "nothing to score under the holdout protocol; retrain it on a cache whose categories have "
            "at least 2 normal and 2 anomalous test images"
        )
    overlap = set(manifest["train"]) & set(manifest["heldout"])
    if overlap:
        raise UserError(
            f"{source}: {len(overlap)} images are both in the training and the held-out "
            f"set (e.g. {sorted(overlap)[0]}); the split manifest is corrupt"
        )
    return sorted(manifest["heldout"])


def read_split_manifest(run: str | Path) -> tuple[dict, str]:
    """The split manifest of a training run directory (``split.json``) or of its checkpoint."""
    run = Path(run)
    path = run / "split.json" if run.is_dir() else run
    if path.suffix == ".json":
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no split manifest; is {run} a training run directory (written by raml train --out ...)?"
            )
        return read_json_checked(path, manifest_problem), str(path)
    return load_checkpoint(run).manifest, str(run)


def trained_on(manifest: dict, table, training_dataset: dict | None = None) -> bool:
    """Whether ``table`` is (part of) the dataset the run was trained on.

    Yes when its cache fingerprint names the dataset the training cache named (``kind`` and
    ``root``; ``training_dataset`` is what the checkpoint recorded, absent in older checkpoints),
    or when it holds any of the run's training images. Relative paths identify images within a
    dataset (a model trained on MVTec AD shares none with VisA), and scoring a training image
    under another protocol would be wrong whatever the fingerprint says. The held-out list plays
    no part: an empty one must not make the training dataset look like another.
    """
    dataset = table.meta.get("dataset") or {}
    if training_dataset and {k: training_dataset.get(k) for k in ("kind", "root")} == {
        k: dataset.get(k) for k in ("kind", "root")
    }:
        return True
    keys = table.keys()
    return any(relpath in keys for relpath in manifest.get("train", ()))


def default_protocol(manifest: dict, table, training_dataset: dict | None = None) -> str:
    """holdout on the training dataset, transfer on any other."""
    return "holdout" if trained_on(manifest, table, training_dataset) else "transfer"


def select_images(
    protocol: str | None, manifest: dict, manifest_source: str, table, training_dataset: dict | None = None
) -> tuple[np.ndarray, ImageList]:
    """Rows of ``table`` to score under ``protocol`` for a model trained with ``manifest`` on the
    dataset ``training_dataset`` (the checkpoint's record of its cache's ``dataset``, if any)."""
    protocol = protocol or default_protocol(manifest, table, training_dataset)
    if protocol not in PROTOCOLS:
        raise UserError(f"unknown protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
    dataset = table.meta.get("dataset", {})
    same_dataset = trained_on(manifest, table, training_dataset)
    if protocol == "holdout":
        if not same_dataset:
            raise UserError(
                f"{table.cache_dir}: neither its fingerprint nor its images match the training data "
                f"of {manifest_source}, so it is not the dataset the model was trained on; use "
                "--protocol transfer to score another dataset"
            )
        relpaths = held_out_relpaths(manifest, manifest_source)
        return rows_for(table, relpaths), ImageList("holdout", tuple(relpaths), dataset, manifest_source)
    if same_dataset:
        raise UserError(
            f"{table.cache_dir} is the dataset the model of {manifest_source} was trained on: its "
            f"official test set includes the training images. Use --protocol holdout here, and "
            f"{protocol} only on another dataset"
        )
    rows = np.flatnonzero(table.split == "test")
    if rows.size == 0:
        raise UserError(f"{table.cache_dir}: no image of the official test split in this cache")
    relpaths = sorted(table.relpath[rows].tolist())
    return rows_for(table, relpaths), ImageList(protocol, tuple(relpaths), dataset, str(table.cache_dir))


def dataset_images(
    protocol: str, records: list, dataset: dict, split_from: str | Path | None
) -> tuple[list, ImageList]:
    """Records of a dataset (``extract.datasets`` records) to score a zero-shot method on.

    With ``split_from`` (a training run) the images are exactly that run's held-out set, so the
    method is compared with the trained model on the same images; else the official test split.
    """
    by_relpath = {record.relpath: record for record in records}
    if split_from is not None:
        manifest, source = read_split_manifest(split_from)
        relpaths = held_out_relpaths(manifest, source)
        missing = [relpath for relpath in relpaths if relpath not in by_relpath]
        if missing:
            raise UserError(
                f"{len(missing)} held-out images of {source} are not in the dataset at "
                f"{dataset.get('root')} (e.g. {missing[0]}); is --root the dataset the run was "
                "trained on?"
            )
        return [by_relpath[r] for r in relpaths], ImageList("holdout", tuple(relpaths), dataset, source)
    if protocol != "official":
        raise UserError(f"--protocol {protocol} needs a training run: pass --split-from RUN_DIR")
    relpaths = sorted(r.relpath for r in records if r.split == "test")
    if not relpaths:
        raise UserError(f"no image of the official test split under {dataset.get('root')}")
    return [by_relpath[r] for r in relpaths], ImageList("official", tuple(relpaths), dataset, str(dataset.get("root")))
