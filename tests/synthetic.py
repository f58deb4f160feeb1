"""Synthetic datasets in the exact on-disk layouts of MVTec AD, VisA and the generic folders.

Normal images are smooth stripes; anomalous ones add a bright square ("defect") in one corner, so
a model that sees the tiles can tell them apart. Sizes are small but uneven on purpose.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image


def part_image(seed: int, size=(97, 83), anomalous: bool = False) -> Image.Image:
    """A deterministic RGB image ``size`` = (width, height); anomalous ones carry a white square."""
    rng = np.random.default_rng(seed)
    width, height = size
    yy, xx = np.mgrid[0:height, 0:width]
    phase = rng.uniform(0, 6.28, 3)
    pixels = np.stack([110 + 60 * np.sin(xx / 7.0 + phase[c]) for c in range(3)], axis=-1)
    pixels += rng.normal(0, 4, pixels.shape)
    if anomalous:
        s = max(6, min(width, height) // 5)
        pixels[height - s - 2 : height - 2, width - s - 2 : width - 2] = 255
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def mask_image(size=(97, 83)) -> Image.Image:
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    s = max(6, min(width, height) // 5)
    mask[height - s - 2 : height - 2, width - s - 2 : width - 2] = 255
    return Image.fromarray(mask)


def make_mvtec(
    root: Path,
    categories=("bottle", "metal_nut"),
    n_train=4,
    n_test_good=2,
    defects=("broken", "scratch"),
    n_defect=2,
    suffix=".png",
    size=(97, 83),
) -> Path:
    """``<root>/<category>/{train/good, test/<type>, ground_truth/<type>}`` as MVTec AD has them."""
    seed = 0
    for category in categories:
        base = Path(root) / category
        for split, folder, count, bad in [("train", "good", n_train, False), ("test", "good", n_test_good, False)] + [
            ("test", d, n_defect, True) for d in defects
        ]:
            (base / split / folder).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                part_image(seed, size, bad).save(base / split / folder / f"{i:03d}{suffix}")
                if bad:
                    (base / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
                    mask_image(size).save(base / "ground_truth" / folder / f"{i:03d}_mask.png")
    return Path(root)


def make_visa(root: Path, categories=("candle", "pcb1"), n_normal=5, n_anomaly=3, size=(101, 89)) -> Path:
    """VisA's original release: ``Data/Images/{Normal,Anomaly}/*.JPG`` and ``split_csv/1cls.csv``."""
    root = Path(root)
    rows, seed = [], 100
    for category in categories:
        for kind, count in (("Normal", n_normal), ("Anomaly", n_anomaly)):
            folder = root / category / "Data" / "Images" / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                seed += 1
                name = f"{i:04d}.JPG"
                part_image(seed, size, kind == "Anomaly").save(folder / name, format="JPEG", quality=95)
                mask = ""
                if kind == "Anomaly":
                    mask_dir = root / category / "Data" / "Masks" / "Anomaly"
                    mask_dir.mkdir(parents=True, exist_ok=True)
                    mask_image(size).save(mask_dir / f"{i:04d}.png")
                    mask = f"{category}/Data/Masks/Anomaly/{i:04d}.png"
                split = "train" if kind == "Normal" and i < n_normal - 2 else "test"
                rows.append(
                    {
                        "object": category,
                        "split": split,
                        "label": kind.lower(),
                        "image": f"{category}/Data/Images/{kind}/{name}",
                        "mask": mask,
                    }
                )
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def make_folder(root: Path, category="widget", n_good=4, defects=("dent",), n_defect=3, size=(90, 90)) -> Path:
    """The generic layout: ``<root>/<category>/good``, ``/<defect>``, ``/masks/<defect>``."""
    base = Path(root) / category
    seed = 500
    for folder, count, bad in [("good", n_good, False)] + [(d, n_defect, True) for d in defects]:
        (base / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            seed += 1
            part_image(seed, size, bad).save(base / folder / f"img{i}.png")
            if bad:
                (base / "masks" / folder).mkdir(parents=True, exist_ok=True)
                mask_image(size).save(base / "masks" / folder / f"img{i}_mask.png")
    return Path(root)
