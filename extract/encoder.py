"""Loading the frozen CLIP backbone through open_clip, and encoding crops and prompts with it.

One code path for every model: a built-in open_clip name (``ViT-B-16``) or the path of an
open_clip model-config JSON (the tests use ``model_configs/raml-tiny-test.json``, a 2-layer
32-px CLIP), with weights from a pretrained tag, a local checkpoint file, or — only when asked
explicitly — a seeded random initialisation. What is built, and the identity the cache records,
both come from ``extract.identity.resolve_backbone``.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from raml.cache.tokens import tokens_per_tile
from raml.errors import UserError
from raml.extract.identity import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    RANDOM_WEIGHTS_SEED,
    BackboneIdentity,
    WeightsUnavailableError,
    resolve_backbone,
)
from raml.extract.pyramid import normalise_crops

# On CUDA the image tower runs in fp16; its features must stay this close (cosine) to the fp32 CPU
# features, crop by crop: close enough to share a cache. `bench extract` checks it on the GPU.
FP16_MIN_COSINE = 0.999


def image_tower_dtype(device: torch.device) -> torch.dtype:
    """The precision of the image tower's weights on ``device``.

    fp16 on CUDA: Tensor Cores, and no autocast, so ``nn.MultiheadAttention`` takes its fused
    inference path (scaled-dot-product / flash attention); its features stay within cosine
    ``FP16_MIN_COSINE`` of fp32 ones, which ``bench extract`` checks on the GPU. fp32 elsewhere:
    CPUs have no fast fp16 matrix path, and the CPU features are the reference.
    """
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class ClipBackbone:
    """A frozen open_clip model plus everything the cache records about it: the fields of
    ``BackboneIdentity`` (``identity_of(backbone)``) and the engine."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    model_config: str  # "sha256:<hex>" of the resolved open_clip config
    weights: str  # "openai" (a tag), "sha256:<hex>" of a weights file, or "random(seed=0)"
    random_weights: bool
    input_size: int
    embed_dim: int
    mean: tuple
    std: tuple
    device: torch.device
    engine: str = "torch"  # which implementation runs the image encoder; recorded in each shard
    precision: str = "fp32"  # the image encoder's numeric precision; recorded in the cache's fingerprint
    image_dtype: torch.dtype | None = None  # the image tower's precision; None: image_tower_dtype(device)

    @property
    def crops_device(self) -> torch.device:
        """Where ``encode_crops`` wants its uint8 crops: the loader stages them there ahead of use."""
        return self.device

    @torch.inference_mode()
    def encode_crops(self, crops: torch.Tensor) -> np.ndarray:
        """uint8 crops [N, 3, S, S] (from ``extract.pyramid.pyramid_crops``), on the CPU or already
        on the device → [N, D] float32 L2-normalised embeddings.

        The one entry point of ``extract`` and ``predict``. The conversion to float and the
        normalisation run on the device, after a copy that does not block when ``crops`` are in
        pinned memory.
        """
        return self._encode_pixels(normalise_crops(crops.to(self.device, non_blocking=True), self.mean, self.std))

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """Already normalised float32 pixels [N, 3, S, S] → [N, D] float32 L2-normalised embeddings."""
        return self._encode_pixels(torch.from_numpy(pixels).to(self.device))

    @torch.inference_mode()
    def encode_crops_and_tokens(self, crops: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``encode_crops``, and from the same forward pass each crop's patch tokens in the same joint
        space, pooled as the cache stores them (``pool_tokens``): [N, D] and [N, p, p, D] float32."""
        pixels = normalise_crops(crops.to(self.device, non_blocking=True), self.mean, self.std)
        return self._encode_pixels(pixels, with_tokens=True)

    @property
    def patch_grid(self) -> int:
        """Patches along a side of a crop (14 for ViT-B/16 at 224 px): what ``cache.tokens`` pools."""
        check_patch_tokens(self.model.visual, self.name)
        return int(self.model.visual.grid_size[0])

    @torch.inference_mode()
    def _encode_pixels(self, pixels: torch.Tensor, with_tokens: bool = False):
        tower = self._image_tower
        pixels = pixels.to(next(tower.parameters()).dtype)
        if not with_tokens:
            return torch.nn.functional.normalize(tower(pixels).float(), dim=-1).cpu().numpy()
        check_patch_tokens(tower, self.name)
        embeddings, tokens = embeddings_and_tokens(tower, pixels)
        return (torch.nn.functional.normalize(embeddings.float(), dim=-1).cpu().numpy(), tokens.float().cpu().numpy())

    @functools.cached_property
    def _image_tower(self) -> torch.nn.Module:
        """``model.visual`` in ``image_dtype``: a copy when that is not fp32, so that the fp32 model
        stays intact for the prompts, the ONNX export and its parity checks."""
        dtype = self.image_dtype or image_tower_dtype(self.device)
        visual = self.model.visual
        return visual if dtype == torch.float32 else copy.deepcopy(visual).to(dtype)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Prompts → [P, D] float32 L2-normalised embeddings."""
        tokens = self.tokenizer(texts).to(self.device)
        features = self.model.encode_text(tokens)
        return torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy()


def check_patch_tokens(visual: torch.nn.Module, name: str) -> None:
    """Refuse an image tower whose patch tokens ``embeddings_and_tokens`` cannot take: open_clip's
    ``VisionTransformer`` with its usual pooling (class token, ``ln_post`` over every token)."""
    usual = (
        all(hasattr(visual, attribute) for attribute in ("_embeds", "transformer", "_pool", "grid_size"))
        and getattr(visual, "attn_pool", None) is None
        and not getattr(visual, "final_ln_after_pool", False)
    )
    if not usual:
        raise UserError(
            f"patch tokens need an open_clip ViT with class-token pooling; {name} has "
            f"{type(visual).__name__} without them: extract without --patch-tokens"
        )


def embeddings_and_tokens(visual: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of open_clip's ViT image tower: its embedding [N, D] (``visual(pixels)``, the same
    operations) and its patch tokens taken where the class token is taken, after ``ln_post``, through
    the same ``proj`` into the joint image-text space, then pooled (``pool_tokens``): [N, p, p, D]."""
    pooled, tokens = visual._pool(visual.transformer(visual._embeds(pixels)))
    if visual.proj is not None:
        pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
    return pooled, pool_tokens(tokens)


def pool_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Patch tokens [N, g², D] → [N, p, p, D] (``cache.tokens``: ``p = g // TOKEN_POOL``): each
    L2-normalised, average-pooled over TOKEN_POOL x TOKEN_POOL patches, L2-normalised again."""
    n, count, dim = tokens.shape
    grid = math.isqrt(count)
    unit = torch.nn.functional.normalize(tokens.float(), dim=-1).reshape(n, grid, grid, dim).permute(0, 3, 1, 2)
    pooled = torch.nn.functional.adaptive_avg_pool2d(unit, tokens_per_tile(grid))
    return torch.nn.functional.normalize(pooled.permute(0, 2, 3, 1), dim=-1)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return torch.device(device)


def load_backbone(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    weights: str | None = None,
    random_weights: bool = False,
    device: str = "auto",
) -> ClipBackbone:
    """Create the frozen CLIP model.

    Exactly one weights source is used: ``random_weights`` (seeded, for exercising the pipeline;
    results mean nothing), else ``weights`` (a local checkpoint file), else the ``pretrained`` tag,
    which open_clip downloads once into the user's cache.
    """
    import open_clip

    resolved = resolve_backbone(model, pretrained, weights, random_weights)
    identity, name, source = resolved.identity, resolved.open_clip_name, resolved.source
    torch_device = resolve_device(device)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_WEIGHTS_SEED)
            clip = open_clip.create_model(
                name, pretrained=source, device=torch_device, force_quick_gelu=resolved.quick_gelu
            )
    except Exception as err:  # open_clip raises RuntimeError, OSError, KeyError... for one cause: no weights
        if weights and not random_weights:
            raise WeightsUnavailableError(
                f"--weights {weights}: {_weights_file_problem(Path(weights), name, err)}. "
                f"Pass the open_clip checkpoint of {name} (a .bin, .pt or .pth state dict, or "
                ".safetensors), or --random-weights to exercise the pipeline."
            ) from err
        raise WeightsUnavailableError(_weights_help(name, source, err)) from err
    clip.eval().requires_grad_(False)
    _check_built(clip, identity)
    return ClipBackbone(
        model=clip,
        tokenizer=open_clip.get_tokenizer(name),
        device=torch_device,
        **{f.name: getattr(identity, f.name) for f in fields(identity)},
    )


def _check_built(clip: torch.nn.Module, identity: BackboneIdentity) -> None:
    """The model open_clip built must be the one ``resolve_backbone`` described; if not, RAML's
    resolution no longer follows open_clip's (a bug to fix in extract/identity.py)."""
    cfg = clip.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    embed_dim = (
        clip.text_projection.shape[1] if getattr(clip, "text_projection", None) is not None else clip.visual.output_dim
    )
    built = (int(size), int(embed_dim), tuple(cfg["mean"]), tuple(cfg["std"]))
    resolved = (identity.input_size, identity.embed_dim, identity.mean, identity.std)
    if built != resolved:
        raise RuntimeError(
            f"open_clip built {identity.name} with (input size, embedding size, mean, std) "
            f"{built}, but extract/identity.py resolved {resolved}"
        )


def _weights_file_problem(path: Path, name: str, err: Exception) -> str:
    """Why open_clip could not load the weights file ``path`` for model ``name``, in words."""
    detail = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:200]}"
    with open(path, "rb") as handle:
        head = handle.read(8)
    if "state_dict" in str(err) or "size mismatch" in str(err):
        return (
            f"its tensors do not fit {name} (missing, unexpected or differently shaped entries: the weights of "
            f"another model?) ({detail})"
        )
    if head.startswith(b"PK"):  # torch.save's zip format
        return f"a PyTorch checkpoint that cannot be read whole: truncated or corrupt ({detail})"
    if path.suffix == ".safetensors":
        return f"a .safetensors file that cannot be read: truncated or corrupt ({detail})"
    if head[:1] == b"\x80":  # a pickle (torch.save's legacy format)
        return f"a pickle that does not unpickle into a state dict: truncated, corrupt or not a checkpoint ({detail})"
    return (
        f"not a checkpoint: neither a PyTorch (zip or pickle) nor a safetensors file (e.g. a text file; "
        f"torch said {detail})"
    )


def _weights_help(name: str, source: str | None, err: Exception) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return (
        f"Could not load CLIP weights {source!r} for {name}: {first_line}\n"
        "  - Offline machine? Copy an open_clip checkpoint of this model onto it and pass "
        "--weights PATH (for ViT-B-16/openai: open_clip_pytorch_model.bin of the Hugging Face "
        "repository timm/vit_base_patch16_clip_224.openai).\n"
        "  - Set HF_HUB_OFFLINE=1 to fail at once instead of retrying the download.\n"
        "  - To exercise the pipeline without weights pass --random-weights: everything it writes "
        "is marked as such, and its scores mean nothing."
    )
