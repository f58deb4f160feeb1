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


class RAMLHead(nn.Module):
    """Scores one image from its 21 crop embeddings.

    ``forward`` returns ``(features, logits)``: the L2-normalised MACCL feature [B, feature_dim]
    (unit sphere: distances lie in [0, 2], so margins such as 0.905 are meaningful) and the
    visual logit [B].

    Attention is single-head, with queries and keys projected to ``attn_dim``; each scale has
    one key projection, shared by the arrows that attend over it. The values are the attended
    tokens themselves, without an output projection: they already are learned projections of
    their scale, and the fusion MLP that follows mixes everything. Keeping the head this lean
    is what lets 25 epochs of MVTec train in seconds on a CPU (``bench train``).
    """

    def __init__(self, input_dim: int, hidden_dim: int = 256, attn_dim: int = 64, feature_dim: int = 128,
                 fusion_scale_init: float = 0.1):
        super().__init__()
        self.project = nn.ModuleList(TokenLinear(input_dim, hidden_dim) for _ in SCALE_SLICES)
        self.keys = nn.ModuleList(TokenLinear(hidden_dim, attn_dim, bias=False) for _ in SCALE_SLICES)
        self.queries = nn.ModuleList(TokenLinear(hidden_dim, attn_dim, bias=False) for _ in SCALE_SLICES)
        self.arrow_norms = nn.ModuleList(nn.LayerNorm(hidden_dim) for _ in SCALE_SLICES)
        self.register_buffer("quadrant_children", children_mask(), persistent=False)
        # Fusion (reference: concat → MLP → 256, LayerNorm) of one summary per scale: f1', the
        # mean of the quadrants f2', and the max over the 16 tiles f3' (a small defect lies in
        # one tile; a mean would dilute it 16-fold).
        self.fuse = nn.Sequential(nn.Linear(3 * hidden_dim, hidden_dim), nn.GELU(),
                                  nn.Linear(hidden_dim, hidden_dim), nn.LayerNorm(hidden_dim))
        # Text-visual fusion (SPEC §3). The text tokens are projected by the global crop's
        # projection: CLIP embeds images and texts in one space, and a shared projection keeps
        # them in one space after it (and costs no extra layer).
        self.text_query = nn.Linear(hidden_dim, attn_dim, bias=False)
        self.text_key = TokenLinear(hidden_dim, attn_dim, bias=False)
        self.fusion_scale = nn.Parameter(torch.tensor(float(fusion_scale_init)))
        self.text_norm = nn.LayerNorm(hidden_dim)
        self.feature_head = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                          nn.Linear(hidden_dim, feature_dim))
        self.classifier = nn.Sequential(nn.Linear(hidden_dim, hidden_dim // 4), nn.GELU(),
                                        nn.Linear(hidden_dim // 4, 1))

    def scales(self, crops: torch.Tensor) -> list[torch.Tensor]:
        """[B, 21, D] → the three projected scales f1 [B, 1, h], F2 [B, 4, h], F3 [B, 16, h]."""
        return [project(crops[:, rows]) for project, rows in zip(self.project, SCALE_SLICES)]

    def arrow_attention(self, f1, f2, f3):
        """The README's three arrows, as (queries, keys, values, mask) per arrow.

        None of them is a softmax over a single key:
        1. f1' = CrossAttn(f1 → F2): the global token attends over the 4 quadrants.
        2. f2' = CrossAttn(f2 → F3): each quadrant attends over its own 4 children in the 4×4
           grid (``children_mask``): it refines itself with the tiles that lie inside it.
        3. f3' = CrossAttn(f3 → f1): over f1 alone every tile would put weight 1 on it (a fixed
           copy, not attention). Each tile attends over [f1; F3] instead, the global token and
           the 16 tiles: the softmax over 17 keys decides per tile how much global context to
           take and which peers to compare itself with (a defective tile differs from them).
        """
        k1, k2, k3 = (key(tokens) for key, tokens in zip(self.keys, (f1, f2, f3)))
        q1, q2, q3 = (query(tokens) for query, tokens in zip(self.queries, (f1, f2, f3)))
        return ((q1, k2, f2, None),
                (q2, k3, f3, self.quadrant_children),
                (q3, torch.cat([k1, k3], dim=1), torch.cat([f1, f3], dim=1), None))

    def cross_scale(self, f1, f2, f3):
        """f1' [B, 1, h], f2' [B, 4, h], f3' [B, 16, h]: each scale plus what it attended to, normalised."""
        return tuple(norm(tokens + attend(*arrow)) for norm, tokens, arrow
                     in zip(self.arrow_norms, (f1, f2, f3), self.arrow_attention(f1, f2, f3)))

    def visual_vector(self, crops: torch.Tensor) -> torch.Tensor:
        f1, f2, f3 = self.cross_scale(*self.scales(crops))
        return self.fuse(torch.cat([f1[:, 0], f2.mean(dim=1), f3.amax(dim=1)], dim=1))

    def fuse_text(self, visual: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """Residual attention of the visual vector over its category's two text tokens (normal,
        anomalous). ``text_bank`` [C, 2, D] per category; ``category`` [B] indices into it."""
        text = self.project[0](text_bank)[category]                              # [B, 2, h]
        attended = attend(self.text_query(visual)[:, None], self.text_key(text), text)[:, 0]
        return self.text_norm(visual + self.fusion_scale * attended)

    def forward(self, crops: torch.Tensor, text_bank: torch.Tensor, category: torch.Tensor):
        fused = self.fuse_text(self.visual_vector(crops), text_bank, category)
        features = F.normalize(self.feature_head(fused), dim=-1)
        return features, self.classifier(fused)[:, 0]


def build_head(config, input_dim: int) -> RAMLHead:
    """The head a ``TrainConfig`` (or its dict) describes, for features of width ``input_dim``."""
    get = config.get if isinstance(config, dict) else lambda key: getattr(config, key)
    return RAMLHead(input_dim, hidden_dim=get("hidden_dim"), attn_dim=get("attn_dim"),
                    feature_dim=get("feature_dim"), fusion_scale_init=get("fusion_scale_init"))
