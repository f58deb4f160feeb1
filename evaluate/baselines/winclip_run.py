"""``baseline winclip``: score a dataset's images with zero-shot WinCLIP and write results files
in the same format as ``evaluate``, on the same images as the model it is compared with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from raml.cache.tokens import EVAL_MASK_BYTES, eval_mask
from raml.errors import UserError
from raml.evaluate.bootstrap_settings import DEFAULT_BOOTSTRAP
from raml.evaluate.localisation import MapImages, not_scored_block, pixel_block
from raml.evaluate.protocols import dataset_images
from raml.evaluate.results import MAP_EXAMPLES, MapSet, ScoredRun, config_entry, pick_examples, write_results
from raml.evaluate.run import backbone_fields
from raml.extract.datasets import read_dataset
from raml.extract.pyramid import load_mask, load_rgb

CONFIG = "WinCLIP zero-shot"  # the results' configuration name; "(global+map)" is appended for that rule
MAP_SOURCE = "WinCLIP's multi-scale patch map (its patch grid over the whole image)"
# Which images get WinCLIP's multi-scale map: its windows cost ~12 times the global pass, and the
# paper's zero-shot image score (the default) does not use them.
MAPS = {
    "all": "every image (for pixel metrics)",
    "examples": f"only the {MAP_EXAMPLES} images a report shows with their maps",
    "none": "no image (image scores only)",
}


def whole_image_pixels(image: Image.Image, size: int, mean, std) -> np.ndarray:
    """The whole image resized (bicubic, no centre crop: a defect at the border must stay in the
    picture) to [3, size, size], normalised as the model expects."""
    pixels = np.asarray(image.resize((size, size), Image.BICUBIC), np.float32).transpose(2, 0, 1) / 255.0
    return (pixels - np.asarray(mean, np.float32)[:, None, None]) / np.asarray(std, np.float32)[:, None, None]


class _ImageDataset(Dataset):
    """Decodes one record in a DataLoader worker; an unreadable image stops the run (the baseline
    must score exactly the images the compared model was scored on)."""

    def __init__(self, root: Path, records, size: int, mean, std):
        self.root, self.records, self.size, self.mean, self.std = root, records, size, mean, std

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        image = load_rgb(self.root / self.records[index].relpath)
        return index, whole_image_pixels(image, self.size, self.mean, self.std), (image.height, image.width)


def _category_batches(records, batch_size: int) -> list[list[int]]:
    """Batches of record indices, never mixing categories (one text prototype pair per batch)."""
    batches, start = [], 0
    while start < len(records):
        end = start
        while end < len(records) and end - start < batch_size and records[end].category == records[start].category:
            end += 1
        batches.append(list(range(start, end)))
        start = end
    return batches


def run_winclip(
    dataset: str,
    root,
    out_dir,
    backbone_loader,
    *,
    protocol: str = "official",
    split_from=None,
    categories=None,
    batch_size: int = 8,
    workers: int = 2,
    n_resamples: int = DEFAULT_BOOTSTRAP,
    bootstrap_seed: int = 0,
    progress: bool = True,
    image_score: str = "global",
    maps: str = "all",
) -> tuple[Path, dict]:
    """Score the chosen images with WinCLIP; write results.json, scores.csv, anomaly_maps.npz.

    ``image_score``: ``global`` (the paper's zero-shot rule, default) or ``global+map``
    (``evaluate.baselines.winclip.IMAGE_SCORES``); the results record which, and name the configuration
    "WinCLIP zero-shot" or "WinCLIP zero-shot (global+map)". ``maps`` (a key of ``MAPS``) says
    which images get a map; the image scores of the ``global`` rule do not depend on it.
    """
    from raml.evaluate.baselines.winclip import IMAGE_SCORES, WINDOW_SIZES, WinClip, compositional_prompts

    root, records = read_dataset(dataset, root, categories)
    records, image_list = dataset_images(protocol, records, {"kind": dataset, "root": str(root)}, split_from)
    records = sorted(records, key=lambda r: (r.category, r.relpath))
    if image_score not in IMAGE_SCORES:
        raise UserError(f"--image-score {image_score}: choose one of {', '.join(IMAGE_SCORES)}")
    if maps not in MAPS:
        raise UserError(f"--maps {maps}: choose one of {', '.join(MAPS)}")
    if image_score != "global" and maps != "all":
        raise UserError(f"--image-score {image_score} uses every image's map: it needs --maps all")
    columns = [
        {"category": r.category, "relpath": r.relpath, "defect_type": r.defect_type, "label": r.label} for r in records
    ]
    mapped = np.full(len(records), maps == "all")
    if maps == "examples":
        mapped[[columns.index(example) for example in pick_examples(columns, MAP_EXAMPLES)]] = True
    config = CONFIG if image_score == "global" else f"{CONFIG} ({image_score})"
    backbone = backbone_loader()
    winclip = WinClip(backbone, image_score=image_score)
    loader = DataLoader(
        _ImageDataset(root, records, backbone.input_size, backbone.mean, backbone.std),
        batch_sampler=_category_batches(records, batch_size),
        num_workers=workers,
        collate_fn=list,
    )
    n = len(records)
    scores = {name: np.zeros(n) for name in ("final", "global", "map_max")}
    image_maps, sizes = np.zeros((n, *winclip.grid), np.float32), np.zeros((n, 2), np.int64)
    with tqdm(total=n, unit="img", desc="winclip", disable=not progress, dynamic_ncols=True) as bar:
        for batch in loader:
            index = [item[0] for item in batch]
            result = winclip.score(
                np.stack([item[1] for item in batch]), records[index[0]].category, with_map=mapped[index]
            )
            for name in scores:
                scores[name][index] = result[name]
            image_maps[index] = result["map"]
            sizes[index] = [item[2] for item in batch]
            bar.update(len(batch))

    column = {name: np.array([getattr(r, name) for r in records]) for name in ("category", "relpath", "defect_type")}
    run = ScoredRun(
        config,
        None,
        f"{backbone.name}/{backbone.weights}",
        column["category"],
        column["relpath"],
        column["defect_type"],
        np.array([r.label for r in records]),
        scores,
    )
    mask_relpaths = np.array([r.mask_relpath for r in records])
    if mapped.all():
        images = MapImages(
            column["category"],
            run.label,
            (run.label == 0) | (mask_relpaths != ""),
            sizes[:, 0],
            sizes[:, 1],
            scoring_masks(root, records, sizes),
        )
        pixel = pixel_block(
            [image_maps], images, MAP_SOURCE, tiles=1, n_resamples=n_resamples, bootstrap_seed=bootstrap_seed
        )
    else:
        pixel = not_scored_block(MAP_SOURCE, f"--maps {maps}: {MAPS[maps]}", column["category"])
    example = compositional_prompts(records[0].category)
    entry = config_entry(
        [run],
        image_list.describe(),
        backbone_fields(
            {
                "backbone": backbone.name,
                "weights": backbone.weights,
                "random_weights": backbone.random_weights,
                "input_size": backbone.input_size,
            }
        ),
        n_resamples=n_resamples,
        bootstrap_seed=bootstrap_seed,
        pixel=pixel,
        extra={
            "method": "WinCLIP (Jeong et al., CVPR 2023), zero-shot",
            "image_score": image_score,
            "image_score_rule": IMAGE_SCORES[image_score],
            "maps": f"{maps}: {MAPS[maps]}",
            "window_sizes": list(WINDOW_SIZES),
            "patch_grid": list(winclip.grid),
            "prompts_per_class": {k: len(v) for k, v in example.items()},
        },
    )
    description = f"WinCLIP: multi-scale patch map, {winclip.grid[0]}x{winclip.grid[1]} over the whole image"
    path = write_results(
        out_dir,
        {config: entry},
        [run],
        maps={config: MapSet(column["relpath"][mapped], mask_relpaths[mapped], image_maps[mapped], 1, description)}
        if mapped.any()
        else None,
    )
    return path, {config: entry}


def scoring_masks(root: Path, records, sizes: np.ndarray) -> np.ndarray:
    """[n, EVAL_MASK_BYTES] each image's defect mask at the scoring points, as stage one stores it
    beside the patch tokens (``cache.tokens.eval_mask``): empty for normal images and missing masks. A mask
    of another size than its image is a ``BadImageError`` naming both (``extract.pyramid.load_mask``)."""
    masks = np.zeros((len(records), EVAL_MASK_BYTES), np.uint8)
    for i, (record, (height, width)) in enumerate(zip(records, sizes)):
        if record.label and record.mask_relpath:
            mask = load_mask(
                Path(root) / record.mask_relpath, int(width), int(height), image=Path(root) / record.relpath
            )
            masks[i] = eval_mask(mask)
    return masks
