"""``bench maps``: what an anomaly map costs per image, and what patch tokens cost in the cache.

On a synthetic cache of ViT-B/16's shape (512-d features; 784 patch tokens per image, 7 x 7 per
4x4 tile; one category of ``normals`` training normals and ``images`` test images of ``size`` px),
per test image, median over the images: reading its tokens and scoring mask (one read, checked),
scoring its tokens with each map kind — an (untrained: the weights do not change the speed) pixel
head, kNN against the category's memory bank (its coreset, built once and timed apart), zero-shot
text — and drawing the map at the image's resolution and at the scoring points. Then the cache's
bytes per image with and without tokens.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.neighbors import NearestNeighbors

from raml.cache import read_cache
from raml.cache.reader import read_token_rows, token_chunks
from raml.cache.synthetic import write_synthetic_cache
from raml.cache.tokens import eval_maps, map_at, token_grid
from raml.evaluate.baselines.features import CORESET_FRACTION, greedy_coreset
from raml.evaluate.localisation import zero_shot_token_scores
from raml.train.config import TrainConfig
from raml.train.infer import pixel_scores, text_tokens
from raml.train.model import build_head

PER_TILE = 7  # ViT-B/16: 14 x 14 patches a tile, pooled 2 x 2
EMBED_DIM = 512


@dataclass
class MapsBench:
    """What ``bench maps`` measured (seconds per image, medians); ``lines()`` is what it prints."""

    images: int
    normals: int
    size: int
    bank: int  # tokens in the kNN memory bank (its coreset)
    coreset_seconds: float  # building that coreset, once per category
    seconds: dict  # step → median seconds per image
    bytes_per_image: tuple  # the cache without and with tokens

    def lines(self) -> list[str]:
        steps = "; ".join(f"{name} {1000 * seconds:.1f} ms" for name, seconds in self.seconds.items())
        without, with_tokens = self.bytes_per_image
        return [
            f"bench maps: ViT-B/16's shape (784 tokens x {EMBED_DIM}), {self.images} test images of {self.size} px, "
            f"a category of {self.normals} training normals",
            f"  per image (median): {steps}",
            f"  kNN memory bank: a {CORESET_FRACTION:.0%} coreset, {self.bank} of {self.normals * 784} tokens, built "
            f"in {self.coreset_seconds:.1f} s once per category",
            f"  cache per image: {without / 1e6:.3f} MB without patch tokens, {with_tokens / 1e6:.3f} MB with them",
        ]


def _median_seconds(work, items) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        work(item)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_maps_bench(images: int = 20, normals: int = 200, size: int = 900) -> MapsBench:
    """Measure on a synthetic cache in a temporary folder (see the module docstring)."""
    shape = {"bench": (normals, images // 2, images - images // 2, size)}
    with tempfile.TemporaryDirectory(prefix="raml-bench-maps-") as tmp:
        plain = write_synthetic_cache(Path(tmp) / "plain", shape, dim=EMBED_DIM)
        table = read_cache(write_synthetic_cache(Path(tmp) / "tokens", shape, dim=EMBED_DIM, tokens_per_tile=PER_TILE))
        sizes = tuple(
            sum(p.stat().st_size for p in Path(cache).glob("*.h5")) / len(table) for cache in (plain, table.cache_dir)
        )
        test = np.flatnonzero(table.split == "test")
        bank = np.concatenate(
            [
                tokens.reshape(-1, EMBED_DIM)
                for _, tokens, _ in token_chunks(table, np.flatnonzero(table.split == "train"))
            ]
        )
        start = time.perf_counter()
        bank = bank[greedy_coreset(bank, int(CORESET_FRACTION * len(bank)))]
        coreset_seconds = time.perf_counter() - start
        index = NearestNeighbors(n_neighbors=1, algorithm="brute").fit(bank.astype(np.float32))
        head = build_head(TrainConfig(), EMBED_DIM, pixel_head=True).eval()
        text_bank = text_tokens(table.text, ["bench"])
        tokens = {row: read_token_rows(table, [row])[0] for row in test}
        scores = {row: pixel_scores(head, tokens[row])[0] for row in test}
        grids = {row: token_grid(scores[row], PER_TILE) for row in test}
        seconds = {
            "reading its tokens": _median_seconds(lambda row: read_token_rows(table, [row]), test),
            "pixel head": _median_seconds(lambda row: pixel_scores(head, tokens[row]), test),
            "kNN": _median_seconds(lambda row: index.kneighbors(tokens[row][0].astype(np.float32)), test),
            "zero-shot text": _median_seconds(lambda row: zero_shot_token_scores(tokens[row], text_bank, [0]), test),
            f"map at {size}x{size} px": _median_seconds(lambda row: map_at(grids[row], size, size), test),
            "map at the 256x256 scoring points": _median_seconds(
                lambda row: eval_maps(grids[row][None], [size], [size]), test
            ),
        }
    return MapsBench(
        images=len(test),
        normals=normals,
        size=size,
        bank=len(bank),
        coreset_seconds=coreset_seconds,
        seconds=seconds,
        bytes_per_image=sizes,
    )
