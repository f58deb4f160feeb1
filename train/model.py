"""The RAML head: cross-scale attention, fusion, text-visual fusion, two heads (docs/method.md#cross-scale-attention
and the sections after it).

Pure torch, no training machinery. Input: the 21 cached crop embeddings of each image, in the
cache's crop order (``cache.SCALE_SLICES``: global, 2×2 grid, 4×4 grid, row-major), and the
category's text tokens (mean normal and mean anomalous prompt embedding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raml.cache import CROP_LAYOUT, SCALE_SLICES
from raml.train.config import switch_problems


def children_mask(coarse=CROP_LAYOUT[1], fine=CROP_LAYOUT[2]) -> torch.Tensor:
    """Additive attention mask [coarse tiles, fine tiles]: 0 where the fine tile lies inside the
    coarse one (its children: 4 for 2×2 → 4×4), −inf elsewhere."""
    (coarse_rows, coarse_cols), (fine_rows, fine_cols) = coarse, fine
    step_r, step_c = fine_rows // coarse_rows, fine_cols // coarse_cols
    mask = torch.full((coarse_rows * coarse_cols, fine_rows * fine_cols), float("-inf"))
    for r in range(fine_rows):
        for c in range(fine_cols):
            mask[(r // step_r) * coarse_cols + c // step_c, r * fine_cols + c] = 0.0
    return mask


class TokenLinear(nn.Linear):
    """``nn.Linear`` over the last axis of ``[..., in]`` tokens, computed as one 2-D matrix product.

    Same result as ``nn.Linear``. The reshape matters when many runs train at once: train/fit.py
    vmaps this head over a leading run axis, and vmap turns a Linear on a 3-D input with a per-run
    weight into a broadcast product that copies the weight once per image (measured 4× slower).
    """

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return super().forward(tokens.reshape(-1, tokens.shape[-1])).reshape(*tokens.shape[:-1], self.out_features)


def attend(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask=None) -> torch.Tensor:
    """Single-head scaled dot-product attention: softmax(q·kᵀ/√d + mask) · values."""
    scores = queries @ keys.transpose(-1, -2) * keys.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask
    return scores.softmax(dim=-1) @ values


class PixelHead(nn.Module):
    """Scores each patch token of an image (``cache.tokens``): its anomaly map.

    One hidden layer per token, read by two heads as in the image head: an L2-normalised feature,
    on which the per-token margin loss acts (train/loss.py, ``pixel_step``), and a logit,
    ``sigmoid`` of which is the token's score. Tokens are scored independently: the map needs no
    image-level context that the tokens, taken from the encoder's last layer, do not carry.
    """

    def __init__(self, input_dim: int, hidden_dim: int, feature_dim: int):
        super().__init__()
        self.project = TokenLinear(input_dim, hidden_dim)
        self.feature = TokenLinear(hidden_dim, feature_dim)
        self.classifier = TokenLinear(hidden_dim, 1)

    def forward(self, tokens: torch.Tensor):
        """[B, T, D] tokens → features [B, T, feature_dim] (unit length) and logits [B, T]."""
        hidden = F.gelu(self.project(tokens))
        return F.normalize(self.feature(hidden), dim=-1), self.classifier(hidden)[..., 0]


class RAMLHead(nn.Module):
    """Scores one image from its 21 crop embeddings.

    ``forward(crops, text_bank, category)`` returns ``(features, logits)``: the L2-normalised
    MACCL feature [B, feature_dim] (unit sphere: distances lie in [0, 2], so margins such as
    0.905 are meaningful) and the visual logit [B].

    Attention is single-head, with queries and keys projected to ``attn_dim``; each scale has
    one key projection, shared by the arrows that attend over it. The values are the attended
    tokens themselves, without an output projection: they already are learned projections of
    their scale, and the fusion MLP that follows mixes everything. Keeping the head this lean
    is what lets 25 epochs of MVTec train in seconds on a CPU (``bench train``).

    Parameters
    ----------
    input_dim : int
        Width D of the cached crop embeddings (512 for ViT-B/16).
    hidden_dim, attn_dim, feature_dim : int
        Width of the per-scale projections and the fused vector; of attention queries and keys;
        of the MACCL feature.
    fusion_scale_init : float
        Initial value of the learnable text-visual fusion scale.
    n_scales : {1, 2, 3}
        Ablation: how many crop scales the head reads, coarse to fine (``--scales 1``, ``1,2``,
        ``1,2,3``). Crops of the other scales are never read, and their projections, keys,
        queries and norms are not built.
    cross_attention : bool
        Ablation: False replaces every arrow by the identity (each scale is only projected, then
        pooled by the fusion as usual); no query, key or arrow-norm parameter is built. With one
        scale there is nothing to attend across, so ``n_scales=1`` requires False.
    text_fusion : bool
        Ablation: False feeds the fused visual vector to the heads directly; the text query and
        key, the fusion scale and the text norm are not built, and ``text_bank`` is ignored.
    tile_pool : {"max", "mean"}
        Ablation: how the fusion pools the 16 tiles of the 4×4 grid. Only scale 3 has them, so
        "mean" requires ``n_scales=3``.
    pixel_hidden_dim : int or None
        With a width, a ``PixelHead`` (``pixel``) scores the patch tokens given to ``forward``;
        None builds none (caches without tokens, ``--pixel-head off``).

    Every switch is static (decided here): ``forward`` has no data-dependent control flow, no
    in-place op and no buffer update, so many heads can run at once under ``torch.func.vmap``
    with ``stack_module_state`` and ``functional_call``. The defaults are the method, and build
    exactly the parameters of checkpoints written before the switches existed.
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int = 256,
        attn_dim: int = 64,
        feature_dim: int = 128,
        fusion_scale_init: float = 0.1,
        n_scales: int = 3,
        cross_attention: bool = True,
        text_fusion: bool = True,
        tile_pool: str = "max",
        pixel_hidden_dim: int | None = None,
    ):
        super().__init__()
        _check_switches(n_scales, cross_attention, tile_pool)
        self.n_scales, self.cross_attention, self.text_fusion, self.tile_pool = (
            n_scales,
            cross_attention,
            text_fusion,
            tile_pool,
        )
        self.project = nn.ModuleList(TokenLinear(input_dim, hidden_dim) for _ in range(n_scales))
        if cross_attention:
            self.keys = nn.ModuleList(TokenLinear(hidden_dim, attn_dim, bias=False) for _ in range(n_scales))
            self.queries = nn.ModuleList(TokenLinear(hidden_dim, attn_dim, bias=False) for _ in range(n_scales))
            self.arrow_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in range(n_scales))
            self.register_buffer("quadrant_children", children_mask(), persistent=False)
        # Fusion (reference: concat → MLP → 256, LayerNorm) of one summary per scale read: f1',
        # the mean of the quadrants f2', and the max over the 16 tiles f3' (a small defect lies
        # in one tile; a mean would dilute it 16-fold: ``tile_pool="mean"`` measures how much).
        self.fuse = nn.Sequential(
            nn.Linear(n_scales * hidden_dim, hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.LayerNorm(hidden_dim),
        )
        if text_fusion:
            # Text-visual fusion (docs/method.md#text-visual-fusion). The text tokens are projected by the global crop's
            # projection: CLIP embeds images and texts in one space, and a shared projection keeps
            # them in one space after it (and costs no extra layer).
            self.text_query = nn.Linear(hidden_dim, attn_dim, bias=False)
            self.text_key = TokenLinear(hidden_dim, attn_dim, bias=False)
            self.fusion_scale = nn.Parameter(torch.tensor(float(fusion_scale_init)))
            self.text_norm = nn.LayerNorm(hidden_dim)
        self.feature_head = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, feature_dim)
        )
        self.classifier = nn.Sequential(
            nn.Linear(hidden_dim, hidden_dim // 4), nn.GELU(), nn.Linear(hidden_dim // 4, 1)
        )
        self.pixel = None if pixel_hidden_dim is None else PixelHead(input_dim, pixel_hidden_dim, feature_dim)

    def scales(self, crops: torch.Tensor) -> list[torch.Tensor]:
        """[B, 21, D] → the projected scales read: f1 [B, 1, h], F2 [B, 4, h], F3 [B, 16, h]
        (the first ``n_scales`` of them)."""
        return [project(crops[:, rows]) for project, rows in zip(self.project, SCALE_SLICES)]

    def arrow_attention(self, *tokens):
        """The README's arrows, as (queries, keys, values, mask) per arrow; ``tokens`` are the
        projected scales f1, F2[, F3].

        None of them is a softmax over a single key. With all three scales:
        1. f1' = CrossAttn(f1 → F2): the global token attends over the 4 quadrants.
        2. f2' = CrossAttn(f2 → F3): each quadrant attends over its own 4 children in the 4×4
           grid (``children_mask``): it refines itself with the tiles that lie inside it.
        3. f3' = CrossAttn(f3 → f1): over f1 alone every tile would put weight 1 on it (a fixed
           copy, not attention). Each tile attends over [f1; F3] instead, the global token and
           the 16 tiles: the softmax over 17 keys decides per tile how much global context to
           take and which peers to compare itself with (a defective tile differs from them).
        In general every scale but the finest attends over the next finer one (arrow 1, 2), and
        the finest over [f1; itself] (arrow 3); with scales 1,2 that is f1 → F2 and F2 → [f1; F2].
        """
        keys = [key(scale) for key, scale in zip(self.keys, tokens)]
        queries = [query(scale) for query, scale in zip(self.queries, tokens)]
        masks = (None, self.quadrant_children)  # the global token's children are all of F2: no mask
        finer = [(queries[i], keys[i + 1], tokens[i + 1], masks[i]) for i in range(len(tokens) - 1)]
        return (
            *finer,
            (queries[-1], torch.cat([keys[0], keys[-1]], dim=1), torch.cat([tokens[0], tokens[-1]], dim=1), None),
        )

    def cross_scale(self, *tokens):
        """f1' [B, 1, h], f2' [B, 4, h], f3' [B, 16, h]: each scale plus what it attended to,
        normalised; the scales unchanged when cross-attention is off."""
        if not self.cross_attention:
            return tuple(tokens)
        return tuple(
            norm(scale + attend(*arrow))
            for norm, scale, arrow in zip(self.arrow_norms, tokens, self.arrow_attention(*tokens))
        )

    def scale_summaries(self, crops: torch.Tensor) -> torch.Tensor:
        """The fusion's input [B, n_scales·h]: f1', the mean of the quadrants f2', and the
        ``tile_pool`` (max or mean) of the 16 tiles f3'."""
        tokens = self.cross_scale(*self.scales(crops))
        pool_tiles = torch.amax if self.tile_pool == "max" else torch.mean
        pools = (lambda f1: f1[:, 0], lambda f2: f2.mean(dim=1), lambda f3: pool_tiles(f3, dim=1))
        return torch.cat([pool(scale) for pool, scale in zip(pools, tokens)], dim=1)

    def visual_vector(self, crops: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.scale_summaries(crops))

    def fuse_text(self, visual: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """Residual attention of the visual vector over its category's two text tokens (normal,
        anomalous). ``text_bank`` [C, 2, D] per category; ``category`` [B] indices into it."""
        text = self.project[0](text_bank)[category]  # [B, 2, h]
        attended = attend(self.text_query(visual)[:, None], self.text_key(text), text)[:, 0]
        return self.text_norm(visual + self.fusion_scale * attended)

    def forward(self, crops: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor, tokens=None):
        """``(features, logits)``; with ``tokens`` [B, T, D] also the pixel head's ``(features, logits)``
        of every token (a head without one refuses them)."""
        fused = self.visual_vector(crops)
        if self.text_fusion:
            fused = self.fuse_text(fused, text_bank, category)
        features = F.normalize(self.feature_head(fused), dim=-1)
        if tokens is None:
            return features, self.classifier(fused)[:, 0]
        return (features, self.classifier(fused)[:, 0], *self.pixel(tokens))


def _check_switches(n_scales: int, cross_attention: bool, tile_pool: str) -> None:
    """Refuse switch combinations that would record an ablation the head cannot perform."""
    problems = switch_problems(n_scales, cross_attention, tile_pool)
    if problems:
        raise ValueError("; ".join(problems))


def build_head(config, input_dim: int, pixel_head: bool = False) -> RAMLHead:
    """The head a ``TrainConfig`` (or its dict) describes, for features of width ``input_dim``,
    ablation switches included (``scales`` "1", "1,2" or "1,2,3" → ``n_scales`` 1, 2 or 3), with a
    pixel head when ``pixel_head`` (whether there is one depends on the data: ``train.fit``)."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return RAMLHead(
        input_dim,
        hidden_dim=get("hidden_dim"),
        attn_dim=get("attn_dim"),
        feature_dim=get("feature_dim"),
        fusion_scale_init=get("fusion_scale_init"),
        n_scales=len(get("scales").split(",")),
        cross_attention=get("cross_attention"),
        text_fusion=get("text_fusion"),
        tile_pool=get("tile_pool"),
        pixel_hidden_dim=get("pixel_hidden_dim") if pixel_head else None,
    )
