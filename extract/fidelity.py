"""The fidelity gate of every engine below fp32 (int8, bf16): its features against fp32 on the
user's own images, and refused below the limits.

Quantisation and rounding errors depend on the weights and on the images (real CLIP weights have
activation outliers that random weights lack), so no check on random inputs says whether a
reduced precision is good enough. ``measure_fidelity`` encodes a sample of the user's own images
with the engine and with its fp32 reference and reports the per-crop cosine (min, mean) and, given
a scorer (from a checkpoint), the Spearman rank agreement of s_final; ``require_fidelity`` stops
below ``MIN_COSINE`` or ``MIN_SPEARMAN``. extract checks on first use with a feature cache
(``check_on_dataset``); predict and export check in evaluate/deploy/int8_check.py.

A backbone that passes through the gate has ``precision`` (not "fp32"), ``engine``,
``encode_images`` (its own encoder), ``reference_encode`` (the fp32 encoder it is compared with)
and ``fidelity_key`` (what identifies its encoder: a check recorded under that key is not repeated).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from raml.cache.files import atomic_write_text, make_dirs
from raml.errors import CacheError, UserError
from raml.extract.engines import FIDELITY_SAMPLE

# Limits of the first reduced-precision engine (int8), kept for every one: below either, its
# features are not trusted and the user is told to use fp32.
MIN_COSINE = 0.995  # per-crop cosine between the engine's and the fp32 embedding, smallest of the sample
MIN_SPEARMAN = 0.99  # Spearman rank correlation of s_final over the sample's images
MIN_RANKED_IMAGES = 3  # fewer images give no meaningful rank correlation
FIDELITY_RECORD = "fidelity.json"  # checks that passed, kept where they were needed (see check_on_dataset)


class FidelityError(UserError):
    """An engine's features are too far from fp32 on the user's images."""


@dataclass
class Fidelity:
    """How close an engine of ``precision`` is to fp32 on a sample of the user's images."""

    precision: str
    images: int
    crops: int
    cosine_min: float
    cosine_mean: float
    spearman: float | None = None  # of s_final, fp32 vs reduced features; None without a scorer or enough images

    @property
    def passed(self) -> bool:
        cosine_ok = self.cosine_min >= MIN_COSINE  # written so that NaN fails
        return cosine_ok and (self.spearman is None or self.spearman >= MIN_SPEARMAN)

    def summary(self) -> str:
        text = (
            f"per-crop cosine of {self.precision} to fp32 min {self.cosine_min:.4f} (limit {MIN_COSINE}), mean "
            f"{self.cosine_mean:.4f}, on {self.crops} crops of {self.images} images"
        )
        if self.spearman is None:
            return (
                text + "; Spearman of s_final not measured (needs a checkpoint and at least "
                f"{MIN_RANKED_IMAGES} images)"
            )
        shown = "undefined (the scores are constant)" if np.isnan(self.spearman) else f"{self.spearman:.4f}"
        return text + f"; Spearman of s_final {shown} (limit {MIN_SPEARMAN})"

    def to_dict(self) -> dict:
        return {
            **asdict(self),
            "min_cosine": MIN_COSINE,
            "min_spearman": MIN_SPEARMAN,
            "passed": self.passed,
            "summary": self.summary(),
        }


def measure_fidelity(backbone, images: list[np.ndarray], score=None) -> Fidelity:
    """Encode each image's crops (``images``: [21, 3, S, S] normalised pixels each) with ``backbone``'s
    encoder and its fp32 reference. ``score`` (optional) maps features [N, 21, D] to s_final [N]."""
    if not hasattr(backbone, "reference_encode"):
        raise ValueError(f"measure_fidelity needs an engine below fp32, not {backbone.engine}")
    fp32 = np.stack([backbone.reference_encode(crops) for crops in images])
    reduced = np.stack([backbone.encode_images(crops) for crops in images])
    cosine = (fp32 * reduced).sum(-1) / (np.linalg.norm(fp32, axis=-1) * np.linalg.norm(reduced, axis=-1))
    spearman = None
    if score is not None and len(images) >= MIN_RANKED_IMAGES:
        from scipy.stats import spearmanr

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constant scores: NaN (reported as undefined, and fails) is enough
            spearman = float(spearmanr(score(fp32), score(reduced))[0])
    return Fidelity(
        precision=backbone.precision,
        images=len(images),
        crops=int(cosine.size),
        cosine_min=float(cosine.min()),
        cosine_mean=float(cosine.mean()),
        spearman=spearman,
    )


def require_fidelity(fidelity: Fidelity, engine: str, where: str, fp32_advice: str) -> None:
    """Raise ``FidelityError`` (with the figures) when ``fidelity`` is below the limits;
    ``fp32_advice`` says how to run the same command in fp32."""
    if not fidelity.passed:
        raise FidelityError(
            f"the {fidelity.precision} image encoder (--engine {engine}) is too far from fp32 on {where}: "
            f"{fidelity.summary()}. Its features cannot be trusted on these images: {fp32_advice}."
        )


def image_crops(paths: list[Path], backbone) -> tuple[list[np.ndarray], list[int]]:
    """The 21 normalised crops of each readable image of ``paths``, and the positions of those images
    (an unreadable one is left out of a fidelity sample: the command reports it where it scores it)."""
    from raml.extract.pyramid import BadImageError, load_rgb, pyramid_pixels

    crops, kept = [], []
    for position, path in enumerate(paths):
        try:
            image = load_rgb(path)
        except BadImageError:
            continue
        crops.append(pyramid_pixels(image, backbone.input_size, backbone.mean, backbone.std))
        kept.append(position)
    return crops, kept


def read_records(path: Path) -> dict:
    """The fidelity checks recorded in ``path`` (``{}`` when there are none)."""
    try:
        records = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise CacheError(f"{path}: not valid JSON ({err}); delete it and the fidelity check runs again") from err
    return records if isinstance(records, dict) else {}


def write_record(path: Path, key: str, fidelity: Fidelity, images_from: str) -> None:
    """Add a passed check to ``path`` under ``key`` (other keys are kept)."""
    records = read_records(path)
    records[key] = {**fidelity.to_dict(), "images_from": images_from, "checked": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(path, json.dumps(records, indent=2))


def say(message: str) -> None:
    print(f"fidelity check: {message}", file=sys.stderr, flush=True)


def check_on_dataset(
    backbone, cache_dir, dataset: str, root, categories=None, sample: int = FIDELITY_SAMPLE
) -> Fidelity | None:
    """extract's check: on first use of this encoder with ``cache_dir``, encode ``sample`` images of
    the dataset being extracted with it and with fp32, and stop below the limits.

    A passed check is recorded in ``cache_dir/fidelity.json`` under the encoder's ``fidelity_key``,
    so resuming the extraction does not repeat it; a rebuilt encoder is checked again. Returns the
    figures, or ``None`` when this encoder was already checked on this cache.
    """
    from raml.extract.datasets import read_dataset
    from raml.extract.plan import evenly_spaced

    record_path = Path(cache_dir) / FIDELITY_RECORD
    recorded = read_records(record_path).get(backbone.fidelity_key)
    if recorded is not None:
        say(f"{backbone.engine} fidelity on this cache's images: checked on {recorded['checked']} ({record_path})")
        return None
    root, records = read_dataset(dataset, root, categories)
    chosen = evenly_spaced(records, sample)
    crops, _ = image_crops([root / record.relpath for record in chosen], backbone)
    if not crops:
        raise UserError(
            f"the {backbone.engine} fidelity check found no readable image among {len(chosen)} of {root}: fix "
            "the images, or use an fp32 engine (--engine torch or onnx)"
        )
    fidelity = measure_fidelity(backbone, crops)
    where = f"{len(crops)} images of {root}"
    require_fidelity(fidelity, backbone.engine, where, "use an fp32 engine (--engine torch or onnx) instead")
    make_dirs(Path(cache_dir))
    write_record(record_path, backbone.fidelity_key, fidelity, str(root))
    say(f"{backbone.engine} fidelity on {len(crops)} of your images: {fidelity.summary()}")
    return fidelity
