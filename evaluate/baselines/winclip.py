"""WinCLIP zero-shot (Jeong et al., CVPR 2023), the baseline RAML is compared with.

The original RAML release's "WinCLIP" was plain global zero-shot CLIP scored on other images
(docs/method.md#what-the-original-code-got-wrong). This one follows the paper:

- **Compositional prompt ensemble**: every state word × every template, embedded, averaged per
  class (normal, anomalous) into two text prototypes.
- **Window embeddings**: the image is encoded once up to its patch tokens; for every 2×2 and 3×3
  window of patches (stride 1) the class token and that window's tokens — positional embeddings
  already added — run through the transformer alone, giving one embedding per window. This is
  the paper's efficient window extraction; it needs open_clip's ``VisionTransformer`` internals
  (``_embeds``, ``transformer``, ``_pool``, ``proj``), used in ``window_embeddings`` only.
- **Scores**: each embedding's anomaly score is the softmax (temperature 0.07) probability of the
  anomalous prototype. Window scores become patch scores by harmonic averaging over the windows
  covering a patch; the multi-scale map is the harmonic mean of the global score, the 2×2 map and
  the 3×3 map.
- **Image score** (``IMAGE_SCORES``): by default the paper's zero-shot rule, the global score
  alone (as anomalib's ``WinClipModel``); ``global+map``, the mean of the global score and the
  map's maximum, is WinCLIP+'s few-shot rule, kept as a named variant.

Defaults: ViT-B-16-plus-240 with laion400m_e31 weights (the paper's backbone). No training, no
cache: it reads the images directly, batched, with a progress bar.
"""

from __future__ import annotations

import numpy as np
import torch

from raml.errors import UserError
from raml.extract.prompts import category_words

TEMPERATURE = 0.07  # CLIP's temperature, as in the paper's Eq. (1)
WINDOW_SIZES = (2, 3)  # small and mid windows, in patches; stride 1
WINDOW_BATCH = 1024  # window sequences per transformer call (memory bound)
IMAGE_SCORES = {
    "global": "the global CLIP score alone (the paper's zero-shot rule)",
    "global+map": "mean of the global score and the multi-scale map's maximum (WinCLIP+'s few-shot rule)",
}
DEFAULT_IMAGE_SCORE = "global"

# The paper's compositional prompt ensemble (its appendix): state words × templates.
NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def compositional_prompts(category: str) -> dict[str, list[str]]:
    """Every (state, template) prompt of both classes for ``category``."""
    words = category_words(category)
    return {
        kind: [template.format(state.format(words)) for state in states for template in TEMPLATES]
        for kind, states in (("normal", NORMAL_STATES), ("anomalous", ANOMALOUS_STATES))
    }


def text_prototypes(backbone, category: str) -> torch.Tensor:
    """[2, D] normalised (normal, anomalous) prototypes: the mean of each class's prompt embeddings."""
    prompts = compositional_prompts(category)
    means = [backbone.encode_texts(prompts[kind]).mean(axis=0) for kind in ("normal", "anomalous")]
    return torch.nn.functional.normalize(torch.from_numpy(np.stack(means)), dim=-1)


def window_masks(grid: tuple[int, int], size: int, stride: int = 1) -> torch.Tensor:
    """[n_windows, size*size] indices (row-major in the patch grid) of the patches of each window.

    Windows are listed row-major by their top-left patch. (3, 3) grid, size 2 →
    [[0,1,3,4], [1,2,4,5], [3,4,6,7], [4,5,7,8]].
    """
    rows, cols = grid
    if size > rows or size > cols:
        raise UserError(f"a {size}x{size} window does not fit a {rows}x{cols} patch grid")
    index = torch.arange(rows * cols).reshape(rows, cols)
    windows = index.unfold(0, size, stride).unfold(1, size, stride)  # [n_r, n_c, size, size]
    return windows.reshape(-1, size * size)


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[B, n_windows] window scores → [B, rows, cols] patch scores: at each patch, the harmonic
    mean of the scores of the windows that contain it (a patch no window covers gets 0)."""
    rows, cols = grid
    covers = torch.zeros(masks.shape[0], rows * cols, dtype=window_scores.dtype)
    covers.scatter_(1, masks, 1.0)  # [n_windows, n_patches]
    count = covers.sum(dim=0)
    inverse_sum = (1.0 / window_scores) @ covers  # [B, n_patches]
    patch = torch.where(count > 0, count / inverse_sum, torch.zeros_like(inverse_sum))
    return patch.reshape(-1, rows, cols)


def anomaly_probability(embeddings: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the anomalous prototype: [..., D] embeddings → [...] in (0, 1)."""
    cosine = torch.nn.functional.normalize(embeddings.float(), dim=-1) @ prototypes.T
    return (cosine / TEMPERATURE).softmax(dim=-1)[..., 1]


def _vision_transformer(backbone):
    visual = backbone.model.visual
    if not all(hasattr(visual, name) for name in ("_embeds", "transformer", "_pool", "grid_size")):
        raise UserError(f"WinCLIP needs a ViT backbone with patch tokens; {backbone.name} has {type(visual).__name__}")
    return visual


def _pooled_embeddings(visual, tokens: torch.Tensor) -> torch.Tensor:
    """Run token sequences [N, L, W] through the transformer and pool/project them → [N, D]."""
    pooled, _ = visual._pool(visual.transformer(tokens))
    return pooled @ visual.proj if visual.proj is not None else pooled


@torch.inference_mode()
def window_embeddings(
    backbone, pixels: torch.Tensor, masks: list[torch.Tensor], with_windows: torch.Tensor | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Global embedding [B, D] and, per mask set, window embeddings [B', n_windows, D] of the
    images where ``with_windows`` (bool [B]; default all) holds.

    The patch tokens are computed once (``_embeds``: patchify, class token, positional
    embeddings, ln_pre); each window's sequence is its class token followed by its patches.
    Windows cost ~12 times the global pass (ViT-B-16-plus-240: 2,670 window tokens against 226).
    """
    visual = _vision_transformer(backbone)
    tokens = visual._embeds(pixels)  # [B, 1 + P, W]
    global_embedding = _pooled_embeddings(visual, tokens)
    if with_windows is not None:
        tokens = tokens[with_windows.to(tokens.device)]
    batch = tokens.shape[0]
    per_scale = []
    for mask in masks:
        index = torch.cat([torch.zeros(mask.shape[0], 1, dtype=mask.dtype), mask + 1], dim=1)  # class token first
        sequences = tokens[:, index.to(tokens.device)].reshape(batch * mask.shape[0], index.shape[1], -1)
        pooled = torch.cat([_pooled_embeddings(visual, chunk) for chunk in sequences.split(WINDOW_BATCH)])
        per_scale.append(pooled.reshape(batch, mask.shape[0], -1))
    return global_embedding, per_scale


class WinClip:
    """Zero-shot WinCLIP on one backbone; ``score`` a batch of images of one category.

    ``image_score`` names the rule of the image score "final" (a key of ``IMAGE_SCORES``).
    """

    def __init__(self, backbone, window_sizes=WINDOW_SIZES, image_score: str = DEFAULT_IMAGE_SCORE):
        if image_score not in IMAGE_SCORES:
            raise UserError(f"image score {image_score!r}: choose one of {', '.join(IMAGE_SCORES)}")
        self.backbone = backbone
        self.image_score = image_score
        self.grid = tuple(_vision_transformer(backbone).grid_size)
        self.masks = [window_masks(self.grid, size) for size in window_sizes]
        self._prototypes = {}

    def prototypes(self, category: str) -> torch.Tensor:
        if category not in self._prototypes:
            self._prototypes[category] = text_prototypes(self.backbone, category)
        return self._prototypes[category]

    def score(self, pixels: np.ndarray, category: str, with_map: np.ndarray | None = None) -> dict:
        """[B, 3, S, S] normalised pixels → {"final", "global", "map_max"} [B] and "map" [B, h, w];
        "final" is the image score under ``self.image_score``.

        ``with_map`` (bool [B]; default all) says which images get a map: the others skip the
        window passes and have NaN maps and ``map_max``. The ``global`` rule's image score does
        not use the map, so it is the same either way; ``global+map`` needs every map.
        """
        with_map = np.ones(len(pixels), bool) if with_map is None else np.asarray(with_map, bool)
        if self.image_score != "global" and not with_map.all():
            raise ValueError(f"image score {self.image_score!r} needs the map of every image")
        prototypes = self.prototypes(category).to(self.backbone.device)
        with torch.autocast(
            self.backbone.device.type, dtype=torch.float16, enabled=self.backbone.device.type == "cuda"
        ):
            global_embedding, windows = window_embeddings(
                self.backbone,
                torch.from_numpy(pixels).to(self.backbone.device),
                self.masks if with_map.any() else [],
                torch.from_numpy(with_map),
            )
        global_score = anomaly_probability(global_embedding, prototypes).cpu()
        scale_maps = [global_score[with_map][:, None, None].expand(-1, *self.grid)]
        for embeddings, mask in zip(windows, self.masks):
            scale_maps.append(harmonic_aggregation(anomaly_probability(embeddings, prototypes).cpu(), mask, self.grid))
        multiscale = torch.full((len(pixels), *self.grid), float("nan"))
        multiscale[with_map] = len(scale_maps) / sum(1.0 / m for m in scale_maps)  # harmonic mean over scales
        map_max = multiscale.flatten(1).max(dim=1).values
        final = global_score if self.image_score == "global" else (global_score + map_max) / 2
        return {
            "final": final.numpy(),
            "global": global_score.numpy(),
            "map_max": map_max.numpy(),
            "map": multiscale.numpy(),
        }
