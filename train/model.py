"""The RAML head (SPEC.md §2–3, §7): cross-scale attention, fusion, text-visual fusion, two heads.

Pure torch, no training machinery. Input: the 21 cached crop embeddings of each image, in the
cache's crop order (``cache.SCALE_SLICES``: global, 2×2 grid, 4×4 grid, row-major), and the
category's text tokens (mean normal and mean anomalous prompt embedding).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cache import CROP_LAYOUT, SCALE_SLICES


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


class CrossAttention(nn.Module):
    """Single-head attention of query tokens over key tokens, returning the attended context.

    Queries and keys are projected to ``attn_dim`` (cheap scores). The values are the attended
    tokens themselves, with no output projection: they are already learned projections of their
    scale, and the fusion MLP that follows mixes everything anyway; this halves the cost of a step.
    The caller adds the residual.
    """

    def __init__(self, dim: int, attn_dim: int):
        super().__init__()
        self.query = nn.Linear(dim, attn_dim, bias=False)
        self.key = nn.Linear(dim, attn_dim, bias=False)
        self.scale = attn_dim ** -0.5

    def attention_weights(self, queries: torch.Tensor, keys: torch.Tensor, mask=None) -> torch.Tensor:
        """[B, Q, K] softmax weights."""
        scores = self.query(queries) @ self.key(keys).transpose(1, 2) * self.scale
        if mask is not None:
            scores = scores + mask
        return scores.softmax(dim=-1)

    def forward(self, queries: torch.Tensor, keys: torch.Tensor, mask=None) -> torch.Tensor:
        return self.attention_weights(queries, keys, mask) @ keys


class RAMLHead(nn.Module):
    """Scores one image from its 21 crop embeddings.

    ``forward`` returns ``(features, logits)``: the L2-normalised MACCL feature [B, feature_dim]
    (unit sphere: distances lie in [0, 2], so margins such as 0.905 are meaningful) and the
    visual logit [B].
    """

    def __init__(self, input_dim: int, hidden_dim: int = 256, attn_dim: int = 64, feature_dim: int = 128,
                 fusion_scale_init: float = 0.1):
        super().__init__()
        self.project = nn.ModuleList(nn.Linear(input_dim, hidden_dim) for _ in SCALE_SLICES)
        # The README's three arrows. None of them is a softmax over a single key:
        # 1. f1' = CrossAttn(f1 → F2): the global token attends over the 4 quadrant tiles.
        self.global_to_quadrants = CrossAttention(hidden_dim, attn_dim)
        # 2. f2' = CrossAttn(f2 → F3): each quadrant attends over its own 4 children in the 4×4
        #    grid (``children_mask``), so it refines itself with the tiles that lie inside it.
        self.quadrants_to_tiles = CrossAttention(hidden_dim, attn_dim)
        # 3. f3' = CrossAttn(f3 → f1): a key set of f1 alone would give every tile weight 1 on it
        #    (a fixed copy, not attention). Instead each fine tile attends over [f1; F3], the
        #    global token and the 16 tiles: the softmax spreads over 17 keys and decides, per
        #    tile, how much global context to take and which peers to compare itself with (a
        #    defective tile differs from its siblings).
        self.tiles_to_global = CrossAttention(hidden_dim, attn_dim)
        self.register_buffer("quadrant_children", children_mask(), persistent=False)
        self.arrow_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in SCALE_SLICES)  # after each residual
        # Fusion: f1', then mean and max over the tiles of each finer scale (a defect usually
        # lies in one tile; the mean alone would dilute it by 1/4 or 1/16).
        self.fuse = nn.Sequential(nn.Linear(5 * hidden_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        # Text-visual fusion (SPEC §3): the fused vector attends over the category's projected
        # normal and anomalous text tokens (two keys); added with a learnable scale, then LayerNorm.
        self.text_project = nn.Linear(input_dim, hidden_dim)
        self.text_attention = CrossAttention(hidden_dim, attn_dim)
        self.fusion_scale = nn.Parameter(torch.tensor(float(fusion_scale_init)))
        self.text_norm = nn.LayerNorm(hidden_dim)
        self.feature_head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                          nn.Linear(hidden_dim, feature_dim))
        self.classifier = nn.Sequential(nn.Linear(hidden_dim, hidden_dim // 4), nn.GELU(),
                                        nn.Linear(hidden_dim // 4, 1))

    def scales(self, crops: torch.Tensor) -> list[torch.Tensor]:
        """[B, 21, D] → the three projected scales [B, 1|4|16, hidden]."""
        return [project(crops[:, rows]) for project, rows in zip(self.project, SCALE_SLICES)]

    def cross_scale(self, crops: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three arrows: f1' [B, 1, h], f2' [B, 4, h], f3' [B, 16, h]."""
        f1, f2, f3 = self.scales(crops)
        contexts = (self.global_to_quadrants(f1, f2),
                    self.quadrants_to_tiles(f2, f3, self.quadrant_children),
                    self.tiles_to_global(f3, torch.cat([f1, f3], dim=1)))
        return tuple(norm(tokens + context) for norm, tokens, context in zip(self.arrow_norms, (f1, f2, f3), contexts))

    def visual_vector(self, crops: torch.Tensor) -> torch.Tensor:
        f1, f2, f3 = self.cross_scale(crops)
        pooled = torch.cat([f1[:, 0], f2.mean(1), f2.amax(1), f3.mean(1), f3.amax(1)], dim=1)
        return self.fuse(pooled)

    def fuse_text(self, visual: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``text_bank`` [C, 2, D] (normal, anomalous) per category; ``category`` [B] indices into it."""
        text = self.text_project(text_bank)[category]                       # [B, 2, h]
        return self.text_norm(visual + self.fusion_scale * self.text_attention(visual[:, None], text)[:, 0])

    def forward(self, crops: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor):
        fused = self.fuse_text(self.visual_vector(crops), text_bank, category)
        features = F.normalize(self.feature_head(fused), dim=-1)
        return features, self.classifier(fused)[:, 0]
