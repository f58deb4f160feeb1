"""``bench predict``: seconds per image of a whole ``predict`` (decode, 21 crops, encoder, head) for
each engine, against the floors of this CPU's precisions (extract/engine_bench.py) and against zero-shot
WinCLIP (our ``baseline winclip``) on the same images.

Per image means the cost of one more image: (time of ``predict_files`` on n + 1 images − time on
1 image) / n, so that the one-off prompt encoding and file writing cancel out. WinCLIP is timed
image by image (decode, resize, score) once its text prototypes exist, which is its cost per
image in ``baseline winclip``. The head is untrained (its weights do not change its speed) and
the int8 fidelity check, a one-off, is not part of what is timed.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from raml.evaluate.deploy.predict import backbone_fingerprint, predict_files
from raml.extract.bench import synthetic_images
from raml.extract.engine_bench import EngineTimes, model_label, time_rounds, vit_macs_per_image

CATEGORY = "bench"  # the synthetic images' category (extract.bench.synthetic_images)
WINCLIP = "WinCLIP"  # the reference's name in the table


def untrained_checkpoint(backbone, category: str = CATEGORY):
    """A ``Checkpoint`` with a freshly initialised head for ``backbone``'s features: times like a trained one."""
    from raml.train.checkpoint import Checkpoint
    from raml.train.config import TrainConfig
    from raml.train.model import build_head

    config = TrainConfig().to_dict()
    return Checkpoint(
        model=build_head(config, backbone.embed_dim).eval(),
        config=config,
        loss_state={},
        manifest={},
        fingerprint=backbone_fingerprint(backbone),
        categories=[category],
        thresholds={
            "set": "none: an untrained head, for timing",
            "rule": "fixed",
            "pooled": {"threshold": 0.5},
            "categories": {},
        },
        path=Path("untrained-head"),
    )


def compare_predict(backbones: dict, *, images: int, size: int, rounds: int, winclip_backbone=None) -> EngineTimes:
    """``EngineTimes`` of ``predict`` for each backbone (and of WinCLIP on ``winclip_backbone``)."""
    first = next(iter(backbones.values()))
    checkpoint = untrained_checkpoint(first)
    with tempfile.TemporaryDirectory(prefix="raml-bench-") as tmp:
        tmp = Path(tmp)
        paths = synthetic_images(tmp / "data", images + 1, size)

        def predict_seconds(backbone, files):
            start = time.perf_counter()
            predict_files(files, checkpoint, CATEGORY, tmp / "out", backbone, heatmaps=False, progress=False)
            return time.perf_counter() - start

        def per_image(backbone):
            one = predict_seconds(backbone, paths[:1])
            return (predict_seconds(backbone, paths) - one) / images

        per_image_of = {engine: (lambda b=backbone: per_image(b)) for engine, backbone in backbones.items()}
        for backbone in backbones.values():
            predict_seconds(backbone, paths[:1])  # warm-up
        if winclip_backbone is not None:
            per_image_of[WINCLIP] = _winclip_per_image(winclip_backbone, paths)
        times = EngineTimes(
            what=f"bench predict, whole prediction per image ({size} px, no heatmaps)",
            model=model_label(first),
            macs_per_image=vit_macs_per_image(first),
            reference=WINCLIP if winclip_backbone is not None else None,
        )
        return time_rounds(times, per_image_of, rounds)


def _winclip_per_image(backbone, paths: list[Path]):
    """A function timing WinCLIP's per-image work on ``paths``, as ``baseline winclip`` does it."""
    from raml.evaluate.baselines.winclip import WinClip
    from raml.evaluate.baselines.winclip_run import whole_image_pixels
    from raml.extract.pyramid import load_rgb

    winclip = WinClip(backbone)
    winclip.prototypes(CATEGORY)  # once per category in baseline winclip, as prompts are in predict

    def score(path):
        pixels = whole_image_pixels(load_rgb(path), backbone.input_size, backbone.mean, backbone.std)
        winclip.score(pixels[None], CATEGORY)

    score(paths[0])  # warm-up

    def per_image():
        start = time.perf_counter()
        for path in paths:
            score(path)
        return (time.perf_counter() - start) / len(paths)

    return per_image
