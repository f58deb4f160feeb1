"""``calibrate``: each category's decision threshold from the user's own good images, at the
false-alarm rate they choose, written into the deployment's deploy.json.

The rule (split conformal, e.g. Angelopoulos & Bates 2021, "A gentle introduction to conformal
prediction", section 1): score the n good images with the deployment, sort the scores
s(1) <= ... <= s(n), take the rank k = ceil((n + 1)(1 - rate)) and put the threshold just above
s(k) (the next float64). An image is anomalous when its score >= the threshold, that is when it is
> s(k). For a new good image whose score is exchangeable with the n (the same line, the same
conditions), P(false alarm) = P(score > s(k)) <= 1 - k / (n + 1) <= rate, whatever the scores'
distribution, ties included. The rule needs k <= n, so at least ceil((1 - rate) / rate) images: 99
for 1 %, 19 for 5 %, 9 for 10 %; fewer is an error that says so. The rate reached on the n images
themselves, (n - k) / n or less with ties, is recorded beside the bound.

deploy.json keeps the exported threshold in ``threshold_calibration``; ``calibrate`` writes the new
one into ``thresholds`` and a record into ``good_image_calibration`` (rule, rate, images, rank,
rate reached, previous threshold and its source, folder, time), atomically, holding a lock against
a second ``calibrate``. ``predict_onnx.threshold_for`` reads both and says which threshold is used
(serve and predict_onnx.py through it; ``predict --deployment`` through ``deployment_threshold``).
"""

from __future__ import annotations

import fcntl
import json
import math
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from raml.cache.files import atomic_write_text
from raml.errors import UserError
from raml.evaluate.deploy import predict_onnx
from raml.extract.datasets import is_image

CALIBRATION_KEY = "good_image_calibration"
RULE = "k-th smallest good score, k = ceil((n + 1)(1 - rate)); threshold = next float above it"
LOCK_FILE = ".calibrate.lock"


class NotEnoughImagesError(UserError):
    """Fewer good images than the rule needs for the rate asked."""


@dataclass(frozen=True)
class Calibration:
    """The threshold that ``conformal_threshold`` found, and what it rests on."""

    threshold: float
    rate: float  # the false-alarm rate asked
    images: int  # n
    rank: int  # k
    kth_score: float  # s(k)
    false_alarms_on_them: float  # share of the n images at or above the threshold
    bound: float  # 1 - k / (n + 1): the guaranteed false-alarm probability, <= rate

    def record(self) -> dict:
        return {
            "threshold": self.threshold,
            "rule": RULE,
            "false_alarm_rate": self.rate,
            "images": self.images,
            "rank": self.rank,
            "kth_score": self.kth_score,
            "false_alarms_on_them": self.false_alarms_on_them,
            "false_alarm_bound": self.bound,
        }


def _exact(rate: float) -> Fraction:
    """``rate`` as the decimal the user typed (0.01 is 1/100, not the float next to it), so that the
    ranks below are not moved by binary rounding."""
    if not 0 < rate < 1:
        raise ValueError(f"false-alarm rate {rate}: expected a number between 0 and 1 (exclusive)")
    return Fraction(str(rate))


def minimum_images(rate: float) -> int:
    """The fewest good images for which the rule gives a threshold at ``rate``: ceil((1 - rate) / rate)."""
    alpha = _exact(rate)
    return math.ceil((1 - alpha) / alpha)


def check_enough_images(n: int, rate: float, what: str) -> None:
    """``NotEnoughImagesError`` (naming ``what``) when ``n`` good images are too few for ``rate``."""
    needed = minimum_images(rate)
    if n < needed:
        lowest = f"; with {n} the lowest rate it allows is 1/(n+1) = {1 / (n + 1):.3g}" if n else ""
        raise NotEnoughImagesError(
            f"{what}: {n} good images, and a false-alarm rate of {rate:g} needs at least {needed} "
            f"(k = ceil((n+1)(1-rate)) must be <= n){lowest}. Add good images or ask for a higher --false-alarms."
        )


def conformal_threshold(scores, rate: float, what: str = "the good images") -> Calibration:
    """The threshold at false-alarm rate ``rate`` from good images' ``scores`` (the module's rule).

    Raises ``NotEnoughImagesError`` (naming ``what``) when there are fewer than ``minimum_images(rate)``.
    """
    scores = np.sort(np.asarray(scores, np.float64))
    if scores.ndim != 1 or not np.isfinite(scores).all():
        raise ValueError("scores: expected a list of finite numbers")
    n = len(scores)
    check_enough_images(n, rate, what)
    rank = math.ceil((n + 1) * (1 - _exact(rate)))
    kth = float(scores[rank - 1])
    threshold = float(np.nextafter(kth, np.inf))
    return Calibration(
        threshold=threshold,
        rate=rate,
        images=n,
        rank=rank,
        kth_score=kth,
        false_alarms_on_them=float(np.mean(scores >= threshold)),
        bound=float(1 - Fraction(rank, n + 1)),
    )


def good_image_sets(deploy: dict, good_dir, category: str | None = None) -> dict[str, list[Path]]:
    """{category: its good images}: ``good_dir``'s images for ``category``, else one sub-folder per
    category (named as in deploy.json), or ``good_dir``'s images when the deployment has one category.
    Only image files count (by extension); sub-folders are not searched further."""
    good_dir, categories = Path(good_dir), deploy["categories"]
    if not good_dir.is_dir():
        raise UserError(f"--good {good_dir}: not a folder")

    def images(folder: Path) -> list[Path]:
        found = sorted(p for p in folder.iterdir() if p.is_file() and is_image(p))
        if not found:
            raise UserError(f"{folder}: no image files (.png .jpg .jpeg .bmp .tif .tiff .webp) in it")
        return found

    if category is not None:
        if category not in categories:
            raise UserError(f"--category {category}: not in the deployment; one of {', '.join(categories)}")
        return {category: images(good_dir)}
    folders = sorted(p for p in good_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders and len(categories) == 1:
        return {categories[0]: images(good_dir)}
    strangers = [p.name for p in folders if p.name not in categories]
    if strangers or not folders:
        what = f"has folders {', '.join(strangers)}, which are not" if strangers else "has no folder named after"
        raise UserError(
            f"--good {good_dir} {what} categories of the deployment ({', '.join(categories)}): give one "
            "folder per category, or a folder of one category's images with --category"
        )
    return {p.name: images(p) for p in folders}


def score_images(deploy_dir, deploy: dict, paths, category: str, progress: bool = False) -> np.ndarray:
    """s_final of each image in ``paths`` as the deployment scores it (``predict_onnx``'s own code);
    ``UserError`` naming every image that cannot be scored: a threshold from part of a folder is no
    threshold."""
    from tqdm import tqdm

    encoder, head = predict_onnx.open_encoder(deploy, deploy_dir), predict_onnx.open_graph(deploy, "head", deploy_dir)
    index = [deploy["categories"].index(category)]
    scores, failed = [], []
    for path in tqdm(paths, unit="img", desc=f"calibrate {category}", disable=not progress):
        try:
            image = predict_onnx.load_rgb(path, deploy["min_image_side"])
        except Exception as err:  # PIL raises many types; each is one file's failure
            failed.append(f"{path}: {err}")
            continue
        crops = predict_onnx.pyramid_pixels(
            image, deploy["input_size"], deploy["mean"], deploy["std"], deploy["crop_layout"]
        )
        scores.append(float(predict_onnx.score_crops(encoder, head, deploy, crops, index)[0][0]))
    if failed:
        raise UserError(
            f"{len(failed)} good images could not be scored, nothing was changed:\n  " + "\n  ".join(failed)
        )
    return np.asarray(scores)


def calibrate_deployment(deploy_dir, good_dir, rate: float, category: str | None = None, progress=False) -> dict:
    """Calibrate the categories found under ``good_dir`` (``good_image_sets``) at ``rate`` and write
    deploy.json; returns {category: its record}. Nothing is written unless every category succeeds."""
    deploy_dir = Path(deploy_dir)
    try:
        deploy = predict_onnx.read_deployment(deploy_dir)
    except ValueError as err:
        raise UserError(str(err)) from None
    sets = good_image_sets(deploy, good_dir, category)
    for paths in sets.values():  # before any scoring: too few images is known from the count
        check_enough_images(len(paths), rate, str(Path(paths[0]).parent))
    records = {}
    for name, paths in sets.items():
        scores = score_images(deploy_dir, deploy, paths, name, progress)
        found = conformal_threshold(scores, rate, str(Path(paths[0]).parent))
        previous, source = predict_onnx.threshold_for(deploy, name)
        records[name] = {
            **found.record(),
            "previous_threshold": previous,
            "previous_source": source,
            "folder": str(Path(paths[0]).parent.resolve()),
            "calibrated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
    _write_records(deploy_dir, deploy, records)
    return records


def _write_records(deploy_dir: Path, scored: dict, records: dict) -> None:
    """Merge ``records`` into deploy.json under a lock, refusing when the deployment was exported
    again since it was scored (``scored`` is the deploy.json the scores came from)."""
    path = deploy_dir / "deploy.json"
    with open(deploy_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another calibrate's write takes an instant: wait for it
        current = predict_onnx.read_deployment(deploy_dir)
        if any(current.get(key) != scored.get(key) for key in ("exported", "encoder", "head")):
            raise UserError(f"{path} was exported again while the good images were scored; run calibrate again")
        for name, record in records.items():
            current["thresholds"][name] = record["threshold"]
            current.setdefault(CALIBRATION_KEY, {})[name] = record
        atomic_write_text(path, json.dumps(current, indent=2))


def deployment_threshold(deploy_dir, checkpoint, category: str) -> tuple[float, str]:
    """The decision threshold of ``category`` in the deployment ``deploy_dir`` (exported from
    ``checkpoint``, perhaps calibrated since by ``raml calibrate``) and where it comes from.
    ``UserError`` when the deployment was exported from another checkpoint (sha256) or lacks the category."""
    from raml.extract.identity import file_sha256

    try:
        deploy = predict_onnx.read_deployment(deploy_dir)
    except ValueError as err:
        raise UserError(f"--deployment: {err}") from None
    if deploy.get("checkpoint_sha256") != file_sha256(checkpoint.path):
        raise UserError(
            f"--deployment {deploy_dir} was exported from another checkpoint ({deploy.get('checkpoint')}), "
            f"not {checkpoint.path}: its thresholds belong to that one"
        )
    if category not in deploy["thresholds"]:
        raise UserError(
            f"--deployment {deploy_dir} has no threshold for {category!r}; it has {', '.join(deploy['thresholds'])}"
        )
    threshold, source = predict_onnx.threshold_for(deploy, category)
    return threshold, f"{source}; from {Path(deploy_dir) / 'deploy.json'}"
