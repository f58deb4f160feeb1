"""Every setting of stage one, in one place.

``ExtractConfig`` is to ``extract`` what ``train.config.TrainConfig`` is to ``train``: the single
source of the defaults, which the command line's options read (extract/cli.py), and what
``extract.run.extract_features`` takes. The dataset, its root and the cache directory are the run's
arguments, not settings; the backbone options have their defaults in extract/identity.py
(``DEFAULT_MODEL``, ``DEFAULT_PRETRAINED``).

Each field's comment gives where its default comes from ("ours": a choice of this project).
This module imports neither torch nor click: the command line reads it at start-up.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from raml.extract.engines import FIDELITY_SAMPLE


@dataclass(frozen=True)
class ExtractConfig:
    """How ``extract`` encodes a dataset into a feature cache."""

    categories: tuple | None = None  # category names to encode; None: every category of the dataset
    batch_size: int = 8  # ours: images per forward pass (x 21 crops)
    workers: int | None = None  # image-decoding processes, 0: the main process; None: one per usable core
    limit: int | None = None  # at most this many images per category, spread over the sorted list; None: all
    skip_bad: bool = False  # skip unreadable images and list them, instead of stopping
    retry_skipped: bool = False  # try again the images an earlier skip_bad run skipped
    shard: str | None = None  # "i/n": every n-th image from i; None: torchrun's RANK/WORLD_SIZE, else 0/1
    shard_size: int = 256  # ours: images per HDF5 shard, ~5.5 MB of float16 ViT-B/16 features
    patch_tokens: bool = False  # also store the 4x4 tiles' pooled patch tokens and mask targets (cache.tokens)
    engine: str = "torch"  # runtime of the image encoder (extract.engines.ENGINES)
    fidelity_sample: int = FIDELITY_SAMPLE  # images of the user's own that a reduced precision is checked on

    def __post_init__(self):
        if self.categories is not None:  # a tuple, whatever sequence was given: the config is frozen
            object.__setattr__(self, "categories", tuple(self.categories))

    @classmethod
    def default(cls, name: str):
        """The default of the field ``name``: what the command line's option shows."""
        return next(spec.default for spec in dataclasses.fields(cls) if spec.name == name)
