"""Dataset readers: turn a dataset on disk into a sorted list of ``ImageRecord``.

Every reader returns records sorted by (category, relpath); that order decides how extraction
splits work into shards and chunks, so it must not depend on the file system's listing order.

Nothing in an image folder is left out without a word: given a ``not_read`` list, a reader adds
to it every entry of an image folder that it does not read, with the reason (a suffix that is not
an image's, e.g. an animated ``.gif``; a dangling symbolic link; a sub-folder; an entry that
cannot be read). Hidden files (``.DS_Store``, ...) are not images and are passed over.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from raml.errors import OptionError, UserError, printable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
NORMAL = "good"  # defect_type of every normal image

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)
VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

MVTEC_LAYOUT = """\
  <root>/<category>/train/good/*.png
  <root>/<category>/test/good/*.png
  <root>/<category>/test/<defect_type>/*.png
  <root>/<category>/ground_truth/<defect_type>/<name>_mask.png   (optional)"""
VISA_LAYOUT = (
    """\
  <root>/split_csv/1cls.csv            (columns: object,split,label,image,mask)
  <root>/<category>/Data/Images/Normal/*.JPG
  <root>/<category>/Data/Images/Anomaly/*.JPG
  <root>/<category>/Data/Masks/Anomaly/*.png
or VisA converted to the MVTec AD layout:
"""
    + MVTEC_LAYOUT
)
FOLDER_LAYOUT = """\
  <root>/<category>/good/*.png                  (normal images)
  <root>/<category>/<defect_type>/*.png         (one folder per defect type)
  <root>/<category>/masks/<defect_type>/<name>.png or <name>_mask.png   (optional)
or a single category: <root>/good/, <root>/<defect_type>/, <root>/masks/"""


# Where each dataset is published, under which licence: what a user without it needs to know.
DATASET_SOURCES = {
    "mvtec": "MVTec AD is published at https://www.mvtec.com/company/research/datasets/mvtec-ad "
    "(licence CC BY-NC-SA 4.0: non-commercial use)",
    "visa": "VisA is published at https://github.com/amazon-science/spot-diff (licence CC BY 4.0)",
    "folder": "folder is your own images",
}
LAYOUTS = {"mvtec": MVTEC_LAYOUT, "visa": VISA_LAYOUT, "folder": FOLDER_LAYOUT}


class DatasetLayoutError(UserError):
    """The dataset root is missing or not laid out as the chosen reader expects."""


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset, as stage one sees it and as the cache stores it."""

    category: str
    label: int  # 0 normal, 1 anomalous
    defect_type: str  # "good" for normal images
    relpath: str  # POSIX path relative to the dataset root; unique key in a cache
    split: str  # official split: "train" or "test" ("test" where there is none)
    mask_relpath: str = ""  # "" when there is no mask


def name_problem(record: ImageRecord) -> str | None:
    """Why ``record`` cannot go into a cache, or ``None``: its names are keys in the shards and in
    the JSON and CSV files of stage two, all UTF-8, so a file or folder name that is not valid
    UTF-8 (Python keeps its bytes as surrogate escapes) is refused, by name, rather than stored."""
    for column in ("category", "defect_type", "relpath", "mask_relpath"):
        value = getattr(record, column)
        if printable(value) != value:
            return (
                f"{column} {printable(value)!r} is not valid UTF-8; rename the file or folder "
                "(e.g. convmv -f latin1 -t utf-8 --notest)"
            )
    return None


def is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def not_an_image(path: Path) -> str:
    """Why the folder entry ``path`` is not read as an image (for one that ``is_image`` refuses)."""
    try:
        if path.is_symlink() and not path.exists():
            return f"a dangling symbolic link (its target {os.readlink(path)} does not exist)"
        if path.is_dir():
            return "a folder: images are read only directly inside their folder"
        if not path.is_file():
            return "not a regular file"
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    return (
        f"suffix {path.suffix or '(none)'!r} is not one RAML reads ({' '.join(sorted(IMAGE_SUFFIXES))}); "
        "convert the file, or move it out of the folder"
    )


def _images_in(folder: Path, not_read: list | None = None) -> list[Path]:
    """The images directly inside ``folder``, sorted; what else is there goes to ``not_read``
    as ``(path, reason)`` (see the module docstring)."""
    if not folder.is_dir():
        return []
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        if not_read is not None:
            not_read.append((folder, f"the folder cannot be listed ({err.strerror})"))
        return []
    images = [path for path in entries if is_image(path)]
    if not_read is not None:
        kept = set(images)
        not_read += [
            (path, not_an_image(path)) for path in entries if not path.name.startswith(".") and path not in kept
        ]
    return images


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_root(root: Path, layout: str, kind: str) -> Path:
    if root is None:
        raise DatasetLayoutError(f"--root is required for --dataset {kind}. Expected layout:\n{layout}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: dataset root does not exist. Expected layout for {kind}:\n{layout}")
    return root


def _select(found: dict, wanted, root: Path, layout: str, kind: str) -> list[str]:
    if not found:
        raise DatasetLayoutError(f"{root}: no {kind} category found. Expected layout:\n{layout}")
    if not wanted:
        return sorted(found)
    unknown = [c for c in wanted if c not in found]
    if unknown:
        raise OptionError(
            "--categories", f"{root} has no category {', '.join(unknown)} (it has: {', '.join(sorted(found))})"
        )
    return list(wanted)


def read_mvtec(root: Path, categories=None, kind: str = "mvtec", not_read: list | None = None) -> list[ImageRecord]:
    """MVTec AD: train/good, test/<good|defect>, ground_truth/<defect>/<name>_mask.png."""
    root = _require_root(root, MVTEC_LAYOUT, kind)
    found = {d.name: d for d in root.iterdir() if d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir())}
    records = []
    for category in _select(found, categories, root, MVTEC_LAYOUT, kind):
        base = found[category]
        for path in _images_in(base / "train" / NORMAL, not_read):
            records.append(ImageRecord(category, 0, NORMAL, _rel(path, root), "train"))
        test_dir = base / "test"
        for defect_dir in sorted(d for d in test_dir.iterdir() if d.is_dir()) if test_dir.is_dir() else []:
            for path in _images_in(defect_dir, not_read):
                mask = base / "ground_truth" / defect_dir.name / f"{path.stem}_mask.png"
                label = int(defect_dir.name != NORMAL)
                records.append(
                    ImageRecord(
                        category,
                        label,
                        defect_dir.name,
                        _rel(path, root),
                        "test",
                        _rel(mask, root) if label and mask.is_file() else "",
                    )
                )
        if not any(r.category == category for r in records):
            raise DatasetLayoutError(f"{base}: no images in train/good or test/*. Expected layout:\n{MVTEC_LAYOUT}")
    return sorted(records, key=lambda r: (r.category, r.relpath))


def read_visa(root: Path, categories=None, not_read: list | None = None) -> list[ImageRecord]:
    """VisA, original release (``split_csv/1cls.csv``) or already converted to the MVTec layout."""
    root = _require_root(root, VISA_LAYOUT, "visa")
    split_csv = root / "split_csv" / "1cls.csv"
    if not split_csv.is_file():
        if any((d / "train").is_dir() for d in root.iterdir() if d.is_dir()):
            return read_mvtec(root, categories, kind="visa", not_read=not_read)
        raise DatasetLayoutError(
            f"{root}: neither {split_csv.relative_to(root)} nor the MVTec layout found. Expected layout:\n{VISA_LAYOUT}"
        )
    with open(split_csv, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"object", "split", "label", "image"} - set(reader.fieldnames or ())
        if missing:
            raise DatasetLayoutError(
                f"{split_csv}: missing columns {sorted(missing)}; expected object,split,label,image,mask"
            )
        rows = list(reader)
    found = {row["object"] for row in rows}
    wanted = set(_select(dict.fromkeys(found), categories, root, VISA_LAYOUT, "visa"))
    records = []
    for line, row in enumerate(rows, start=2):
        if row["object"] not in wanted:
            continue
        if row["label"] not in ("normal", "anomaly"):
            raise DatasetLayoutError(f"{split_csv}:{line}: label {row['label']!r} is neither 'normal' nor 'anomaly'")
        image = root / row["image"]
        if not image.is_file():
            raise DatasetLayoutError(f"{split_csv}:{line}: image {row['image']} does not exist under {root}")
        label = int(row["label"] == "anomaly")
        records.append(
            ImageRecord(
                row["object"],
                label,
                "anomaly" if label else NORMAL,
                _rel(image, root),
                row["split"],
                (row.get("mask") or "") if label else "",
            )
        )
    return sorted(records, key=lambda r: (r.category, r.relpath))


def read_folder(root: Path, categories=None, not_read: list | None = None) -> list[ImageRecord]:
    """Generic folders: ``good/`` plus one folder per defect type, optional ``masks/``."""
    root = _require_root(root, FOLDER_LAYOUT, "folder")
    if (root / NORMAL).is_dir():
        found = {root.name: root}
    else:
        found = {d.name: d for d in root.iterdir() if (d / NORMAL).is_dir()}
    records = []
    for category in _select(found, categories, root, FOLDER_LAYOUT, "folder"):
        base = found[category]
        for defect_dir in sorted(d for d in base.iterdir() if d.is_dir() and d.name != "masks"):
            for path in _images_in(defect_dir, not_read):
                label = int(defect_dir.name != NORMAL)
                mask = ""
                for name in (path.name, f"{path.stem}.png", f"{path.stem}_mask.png"):
                    candidate = base / "masks" / defect_dir.name / name
                    if label and candidate.is_file():
                        mask = _rel(candidate, root)
                        break
                records.append(ImageRecord(category, label, defect_dir.name, _rel(path, root), "test", mask))
    return sorted(records, key=lambda r: (r.category, r.relpath))


TEXTILE_CATEGORY = "textile"
TEXTILE_DEFECTS = {"nominal": NORMAL, "local": "local", "global": "global"}


def textile_root() -> Path:
    """Where the ``conformal-clip-data`` package keeps its simulated textile images."""
    try:
        import conformal_clip_data
    except ImportError as err:
        raise DatasetLayoutError(
            "--dataset textile needs the package conformal-clip-data (pip install conformal-clip-data)"
        ) from err
    return conformal_clip_data.textile_simulated_root()


def read_textile(root: Path | None = None, categories=None, not_read: list | None = None) -> list[ImageRecord]:
    """The 2,000 simulated textile images of ``conformal-clip-data`` as one category.

    nominal → normal; local and global defects → anomalous, defect types "local" and "global".
    """
    root = Path(root) if root else textile_root()
    if categories and list(categories) != [TEXTILE_CATEGORY]:
        raise DatasetLayoutError(f"--dataset textile has one category, {TEXTILE_CATEGORY!r}")
    records = []
    for folder, defect in TEXTILE_DEFECTS.items():
        images = _images_in(root / folder, not_read)
        if not images:
            raise DatasetLayoutError(
                f"{root / folder}: no images; expected {', '.join(TEXTILE_DEFECTS)} "
                "folders of the conformal-clip-data package"
            )
        records += [ImageRecord(TEXTILE_CATEGORY, int(defect != NORMAL), defect, _rel(p, root), "test") for p in images]
    return sorted(records, key=lambda r: (r.category, r.relpath))


READERS = {"mvtec": read_mvtec, "visa": read_visa, "folder": read_folder, "textile": read_textile}


def read_dataset(kind: str, root, categories=None, not_read: list | None = None) -> tuple[Path, list[ImageRecord]]:
    """Records of dataset ``kind`` and the root their ``relpath`` is relative to; ``not_read``
    (a list) receives ``(path, reason)`` of every entry of an image folder not read."""
    if kind not in READERS:
        raise DatasetLayoutError(f"unknown dataset {kind!r}; choose one of {', '.join(READERS)}")
    if kind == "textile":
        root = Path(root) if root else textile_root()
    records = READERS[kind](root, categories, not_read=not_read)
    return Path(root).expanduser(), records
