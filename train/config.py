"""Every hyper-parameter of stage two, in one place.

``TrainConfig`` is the single source of the defaults: the CLI builds one option per field from it
(``train.cli.train_options``), checkpoints store it whole, and a sweep compares it to decide
whether a finished run may be reused. Each field's comment gives where its default comes from:

- "orig:N" — line N of the original release's training code, ``train_raml_model.py`` of
  voveed/RAML_INDUSTRIAL_ANOMALY_DETECTION (read at commit 6ee7c979): the original's value;
- "README" — the original release's README (restated in docs/method.md), where it gives a value;
  where README and code disagree the comment names both, and the README wins (it is our spec);
- "ours" — a choice of this project, the original's value named beside it where it has one
  (docs/method.md#deviations-from-the-original-release says why, and how to restore it).

Loss constants where the original's value differs from ours (``VARIANT_DEFAULTS``) default to
None and are resolved by ``--loss-variant``, as the margin values are by ``--margin``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from raml.errors import UserError

# name → (m_base, λ_σ, λ_res). adaptive: orig:121 and orig:481 (README, docs/method.md#the-margin); fixed and
# strong: the README's two ablation baselines (docs/method.md#the-margin).
MARGIN_PRESETS = {
    "adaptive": (0.5, 0.3, 0.3),
    "fixed": (0.5, 0.0, 0.0),
    "strong": (1.0, 0.0, 0.0),
}
MARGIN_FIELDS = ("margin_base", "lambda_sigma", "lambda_res")
CUSTOM_MARGIN = "custom"  # any (m_base, λ_σ, λ_res) that is not a preset's
R_MAX_MODES = ("image", "category")  # or a number of pixels, e.g. "900" (the original constant)
LOSS_VARIANTS = ("raml", "original")  # see train/loss.py and the README's deviations table
SCALE_CHOICES = ("1", "1,2", "1,2,3")  # which crop scales the head sees (ablation)
PIXEL_HEAD_CHOICES = ("auto", "on", "off")


def _valid_r_max(value: str) -> bool:
    if value in R_MAX_MODES:
        return True
    try:
        return math.isfinite(float(value)) and float(value) > 0
    except ValueError:
        return False


def switch_problems(n_scales: int, cross_attention: bool, tile_pool: str) -> list[str]:
    """Why a combination of the head's ablation switches cannot be built (none: an empty list):
    each switch must remove something the head would otherwise have."""
    scales = ",".join(str(k) for k in range(1, n_scales + 1))
    problems = []
    if n_scales not in range(1, len(SCALE_CHOICES) + 1):
        problems.append(f"the head reads 1 to {len(SCALE_CHOICES)} crop scales, not {n_scales}")
    if tile_pool not in ("max", "mean"):
        problems.append(f"tile_pool {tile_pool!r} is not one of max, mean")
    if cross_attention and n_scales == 1:
        problems.append(
            "--scales 1 leaves a single scale: there is no cross-scale attention to switch on; "
            "pass --cross-attention off with --scales 1"
        )
    if tile_pool != "max" and n_scales < len(SCALE_CHOICES):
        problems.append(
            f"--tile-pool {tile_pool} pools the 4x4 tiles, which --scales {scales} leaves out; "
            "keep --tile-pool max or use --scales 1,2,3"
        )
    return problems


# Loss constants whose default depends on ``loss_variant``: field → {variant: value}. As with the
# margin presets, a value given explicitly is kept and one left None takes its variant's.
VARIANT_DEFAULTS = {
    "center_momentum": {
        "raml": 0.9,  # ours: a slower center (see the README's deviations table)
        "original": 0.8,
    },  # orig:140
}


@dataclass(frozen=True)
class Bounds:
    """The values a number may take (None: no limit on that side), each end included unless open."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value) -> bool:
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        low = None if self.low is None else f"{'>' if self.low_open else '≥'} {self.low:g}"
        high = None if self.high is None else f"{'<' if self.high_open else '≤'} {self.high:g}"
        return " and ".join(part for part in (low, high) if part) or "finite"


POSITIVE, NON_NEGATIVE = Bounds(0, low_open=True), Bounds(0)
SEED = Bounds(0, 2**32 - 1)  # numpy's and torch's generators take these
MOMENTUM = Bounds(0, 1)  # an EMA's momentum: 1 keeps the first value
SIZE = Bounds(1, 65536)  # widths of the head's layers
SCORE_WEIGHT = Bounds(0, 1)  # s_final = w_v·s_visual + w_t·s_text is a convex combination (orig:315)
# The MACCL features are L2-normalised and the center is a mean of them (norm ≤ 1): no anomalous
# feature lies further than 2 from it, so a larger margin is never met (``largest_margin``).
MAX_FEATURE_DISTANCE = 2.0


def _option(default, help, **kwargs):
    """A ``TrainConfig`` field. ``bounds``: the values a number may take (``Bounds``; any finite
    number without). ``preset=True``: the default is None on the command line and
    ``__post_init__`` fills it in (from the margin preset or the loss variant)."""
    return field(default=default, metadata={"help": help, **kwargs})


def field_kind(spec: dataclasses.Field) -> str:
    """ "int", "float", "str" or "bool": what a ``TrainConfig`` field holds (None aside)."""
    return str(spec.type).split("|")[0].strip()


def field_problem(spec: dataclasses.Field, value) -> str | None:
    """Why ``value`` cannot be ``spec``'s (its kind, then its bounds), or None. Numbers must be
    finite; a whole number is accepted for a float, True/False only for a switch."""
    kind = field_kind(spec)
    if value is None and "None" in str(spec.type):
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    expected = {
        "bool": ("on or off", isinstance(value, bool)),
        "int": ("a whole number", number and isinstance(value, int)),
        "float": ("a finite number", number and math.isfinite(value)),
        "str": ("text", isinstance(value, str)),
    }[kind]
    if not expected[1]:
        return f"{spec.name} {value!r} is not {expected[0]}"
    bounds, choices = spec.metadata.get("bounds"), spec.metadata.get("choices")
    if bounds is not None and value not in bounds:
        return f"{spec.name} {value!r} must be {bounds}"
    if choices is not None and value not in choices:
        return f"{spec.name} {value!r} is not one of {', '.join(choices)}"
    return None


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of one training run.

    Defaults: the original RAML release's where a field's comment cites it (its code, ``orig:N``,
    or its README), ours where the comment says "ours" (with the original's value beside it).
    ``--loss-variant original`` resolves the loss constants of ``VARIANT_DEFAULTS`` to the
    original's; the README's "Method notes" give the command line that restores every setting
    that can be restored.
    """

    # protocol
    # ours: the original seeds neither the weights nor the batch order
    seed: int = _option(0, "Training seed: weight init and batch order.", bounds=SEED)
    # ours: the original shuffles each category's test images with random.seed(42) (orig:352–354)
    split_seed: int = _option(
        0,
        "Seed of the holdout split; kept apart from --seed so that every run of a "
        "sweep is scored on the same held-out images.",
        bounds=SEED,
    )
    # orig:356–357 (train_ratio 0.8, orig:483); the per-class rounding is ours (README "Method notes")
    holdout_fraction: float = _option(
        0.2,
        "Fraction of each category's official test set held out.",
        bounds=Bounds(0, 1, low_open=True, high_open=True),
    )
    # optimisation
    # README (docs/method.md#training-defaults); the original's code trains 20 epochs (orig:481)
    epochs: int = _option(25, "Passes over the training images (the original's code: 20).", bounds=Bounds(1, 100_000))
    # orig:485 (README, docs/method.md#training-defaults); dropping the last incomplete batch is ours (the original keeps it)
    batch_size: int = _option(
        16, "Images per step (an epoch drops its last incomplete batch).", bounds=Bounds(2, 65536)
    )
    lr: float = _option(5e-5, "AdamW learning rate.", bounds=POSITIVE)  # orig:481 (README)
    # README (docs/method.md#training-defaults); the original's code sets none: torch's AdamW default, 0.01 (orig:380)
    weight_decay: float = _option(
        0.02, "AdamW weight decay (the original's code: 0.01, torch's default).", bounds=NON_NEGATIVE
    )
    # model
    hidden_dim: int = _option(
        256, "Width of the per-scale projections and of the fused vector.", bounds=SIZE
    )  # orig:225, :389
    # ours: the original's attention has 4 heads of 256/4 = 64 dimensions each (orig:72)
    attn_dim: int = _option(64, "Width of the attention queries and keys.", bounds=SIZE)
    # ours: the original's feature is the 256-d LayerNorm output of its feature head, not normalised (orig:241)
    feature_dim: int = _option(128, "Width of the (L2-normalised) MACCL feature.", bounds=SIZE)
    fusion_scale_init: float = _option(0.1, "Initial learnable text-visual fusion scale.")  # orig:192
    # ablation switches: the defaults are the method
    scales: str = _option(
        "1,2,3",
        "Crop scales the head sees: 1 (the global crop), 1,2 (+ the 2x2 grid) or 1,2,3 (all 21 crops).",
        choices=SCALE_CHOICES,
    )  # orig:100–104
    cross_attention: bool = _option(
        True, "on: the three cross-scale attention arrows; off: each scale projected and pooled without attention."
    )  # orig:101–103
    text_fusion: bool = _option(True, "on: the visual vector attends to the category's text embeddings.")  # orig:298
    # ours: the original has no tile pooling (its 4x4 query is the mean of the tiles, orig:100)
    tile_pool: str = _option("max", "How the fusion pools the 4x4 tiles: max or mean.", choices=("max", "mean"))
    # pixel head: ours (docs/method.md#the-pixel-head); trained on the cache's patch tokens and the per-token defect fractions
    pixel_head: str = _option(
        "auto",
        "A pixel head scoring every patch token (the anomaly map), trained with the "
        "image head: auto (when the training images have patch tokens and some "
        "anomalous one a mask), on (required), off.",
        choices=PIXEL_HEAD_CHOICES,
    )
    pixel_hidden_dim: int = _option(128, "Width of the pixel head's hidden layer.", bounds=SIZE)
    # ours: 64 of ViT-B/16's 784 tokens per image: a step of both heads takes ~1.7-1.8x the image head's alone (README)
    pixel_tokens: int = _option(
        64,
        "Patch tokens per training image in the pixel loss: its defective tokens "
        "first (up to half), the rest drawn once per image (seeded by its name).",
        bounds=Bounds(2, 65536),
    )
    pixel_weight: float = _option(1.0, "Weight of the pixel loss in the total loss.", bounds=NON_NEGATIVE)
    # MACCL loss
    alpha: float = _option(1.0, "Weight of the center loss.", bounds=NON_NEGATIVE)  # orig:123
    beta: float = _option(1.0, "Weight of the margin loss.", bounds=NON_NEGATIVE)  # orig:123
    gamma: float = _option(0.5, "Weight of the supervised contrastive loss.", bounds=NON_NEGATIVE)  # orig:123
    temperature: float = _option(0.07, "Temperature of the supervised contrastive loss.", bounds=POSITIVE)  # orig:122
    bce_weight: float = _option(
        1.0, "Weight of the BCE loss on the visual logit.", bounds=NON_NEGATIVE
    )  # orig:413 (MACCL + BCE)
    # VARIANT_DEFAULTS: ours 0.9, the original's 0.8 (orig:140)
    center_momentum: float | None = _option(
        None,
        "EMA momentum of the running center of normal features (default: 0.9; 0.8, the original's, "
        "with --loss-variant original).",
        preset=True,
        bounds=MOMENTUM,
    )
    sigma_momentum: float = _option(
        0.9, "EMA momentum of σ, the spread of normal features.", bounds=MOMENTUM
    )  # orig:145
    # ours; "original" is the original's loss (train/original_loss.py). r_max stays its own option:
    # it is a property of the data, not a constant of the loss, and a sweep over loss_variant then
    # changes the loss alone (reproduce the original with --r-max 900 as well).
    loss_variant: str = _option(
        "raml",
        "raml (this project's MACCL) or original (the original release's "
        "loss, formula for formula; sets the center momentum to the "
        "original's 0.8 unless given; add --r-max 900 for the original's "
        "constant resolution).",
        choices=LOSS_VARIANTS,
    )
    # maccl+bce: orig:405–413; bce: the original's "Standard BCE" baseline (orig:382–383, :404)
    loss: str = _option(
        "maccl+bce",
        "Training loss: maccl+bce (the method) or bce (the plain supervised head, an ablation).",
        choices=("maccl+bce", "bce"),
    )
    # ours: the original clips every step at 1.0 (orig:416)
    grad_clip_norm: float = _option(
        0.0,
        "Clip each run's gradient to this L2 norm before the step (0: no clipping; the original's code: 1.0).",
        bounds=NON_NEGATIVE,
    )
    # margin: the presets' values, see MARGIN_PRESETS
    margin: str = _option(
        "adaptive",
        "Margin preset: adaptive, fixed (m=0.5) or strong (m=1.0); 'custom' "
        "when --margin-base/--lambda-sigma/--lambda-res differ from the preset.",
        choices=(*MARGIN_PRESETS, CUSTOM_MARGIN),
    )  # orig:481
    margin_base: float | None = _option(
        None, "m_base (default: the --margin preset's).", preset=True, bounds=NON_NEGATIVE
    )  # orig:121
    lambda_sigma: float | None = _option(
        None, "λ_σ (default: the --margin preset's).", preset=True, bounds=NON_NEGATIVE
    )  # orig:121
    lambda_res: float | None = _option(
        None, "λ_res (default: the --margin preset's).", preset=True, bounds=NON_NEGATIVE
    )  # orig:121
    # ours: the original uses a constant 900 px for every image (orig:122, :130)
    r_max: str = _option(
        "image",
        "Original resolution in the resolution term: 'image' (each image's "
        "max(height, width)), 'category' (its category's mean), or a number "
        "of pixels (900 reproduces the original).",
        check=_valid_r_max,
        accepted="image, category or a positive number of pixels",
    )
    # auto-difficulty
    difficulty_momentum: float = _option(0.7, "EMA momentum of the per-category loss.", bounds=MOMENTUM)  # orig:108
    difficulty_scale: float = _option(
        0.5, "w = 1 + scale·(L_cat − L_global)/L_global.", bounds=NON_NEGATIVE
    )  # orig:108
    difficulty_min: float = _option(
        0.5, "Lower clip of the category weight.", bounds=Bounds(0, 1, low_open=True)
    )  # orig:118
    difficulty_max: float = _option(2.0, "Upper clip of the category weight.", bounds=Bounds(1))  # orig:118
    # inference
    visual_weight: float = _option(0.85, "Weight of s_visual in s_final.", bounds=SCORE_WEIGHT)  # orig:315
    text_weight: float = _option(0.15, "Weight of s_text in s_final.", bounds=SCORE_WEIGHT)  # orig:315

    def __post_init__(self):
        problems = [
            problem for spec in dataclasses.fields(self) if (problem := field_problem(spec, getattr(self, spec.name)))
        ]
        if problems:  # the checks below compare values: they need the right kinds first
            raise UserError("invalid training configuration: " + "; ".join(problems))
        self._resolve_margin(problems)
        self._resolve_variant_defaults()
        problems += switch_problems(len(self.scales.split(",")), self.cross_attention, self.tile_pool)
        margins_known = all(getattr(self, name) is not None for name in MARGIN_FIELDS)  # else: a problem above
        if margins_known and self.largest_margin() > MAX_FEATURE_DISTANCE:
            problems.append(self._unreachable_margin())
        if self.visual_weight + self.text_weight <= 0:
            problems.append("visual_weight and text_weight cannot both be 0 (s_final would be 0 for every image)")
        if not _valid_r_max(self.r_max):
            problems.append(f"r_max {self.r_max!r}: expected image, category or a positive number of pixels")
        if problems:
            raise UserError("invalid training configuration: " + "; ".join(problems))

    def _resolve_margin(self, problems: list) -> None:
        """Fill the margin values the preset leaves open; call a preset with other values 'custom'.

        ``TrainConfig(margin="strong")`` is m = 1.0, whoever builds it; ``margin="fixed",
        margin_base=0.7`` records ``margin="custom"`` with those values, so that no config says
        "fixed" while training with another margin.
        """
        given = {name: getattr(self, name) for name in MARGIN_FIELDS}
        if self.margin == CUSTOM_MARGIN:
            missing = [name for name, value in given.items() if value is None]
            if missing:
                problems.append(f"margin 'custom' needs {', '.join(missing)}")
            return
        preset = dict(zip(MARGIN_FIELDS, MARGIN_PRESETS[self.margin]))
        resolved = {name: preset[name] if value is None else float(value) for name, value in given.items()}
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if resolved != preset:
            object.__setattr__(self, "margin", CUSTOM_MARGIN)

    def sigma_bound(self) -> float:
        """The largest σ of the margin. Ours (and the pixel loss's in either variant), sqrt(Σ‖f_i − f̄‖² / (n − 1))
        over n ≥ 2 unit vectors, is sqrt(n/(n − 1)·(1 − ‖f̄‖²)) ≤ √2 (two opposite normals), as is an EMA of it;
        the original's starts at 1 and moves toward the elementwise std, ≤ sqrt(n/(n·D − 1)) ≤ 1 for D ≥ 2."""
        original = self.loss_variant == "original" and self.pixel_head == "off" and self.feature_dim >= 2
        return 1.0 if original else math.sqrt(2)

    def largest_margin(self) -> float:
        """The largest margin m_base + λ_σ·σ + λ_res·(1 − r/r_max) an image can get (σ ≤ ``sigma_bound``)."""
        return self.margin_base + self.lambda_sigma * self.sigma_bound() + self.lambda_res

    def _unreachable_margin(self) -> str:
        sigma = self.sigma_bound()
        room = MAX_FEATURE_DISTANCE - self.lambda_sigma * sigma - self.lambda_res  # what m_base may be
        return (
            f"--margin-base {self.margin_base:g} --lambda-sigma {self.lambda_sigma:g} --lambda-res {self.lambda_res:g} "
            f"can reach a margin of {self.largest_margin():.3f} (m_base + λ_σ·σ + λ_res·(1 − r/r_max), with σ ≤ "
            f"{sigma:.3f} and 1 − r/r_max < 1), but the MACCL features are L2-normalised: no anomalous image is ever "
            f"more than {MAX_FEATURE_DISTANCE:g} from the center, so a larger margin is never met and stops mattering. "
            f"Keep m_base + {sigma:.3f}·λ_σ + λ_res ≤ {MAX_FEATURE_DISTANCE:g}"
            + (
                f" (with these λ: --margin-base ≤ {room:.3f})"
                if room >= 0
                else " (lower --lambda-sigma or --lambda-res)"
            )
        )

    def _resolve_variant_defaults(self) -> None:
        """Fill the ``VARIANT_DEFAULTS`` fields left None with the loss variant's value; a value
        given explicitly is kept (and recorded: the config says what trained)."""
        for name, values in VARIANT_DEFAULTS.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, values[self.loss_variant])

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        """A config from ``to_dict()`` output; fields that an older RAML did not record take their
        defaults (which are what it trained with), unknown fields are refused."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UserError(f"unknown training options: {', '.join(unknown)}")
        return cls(**values)

    def without_seed(self) -> dict:
        """Every setting but the seed: what seeds of one configuration share."""
        return {key: value for key, value in self.to_dict().items() if key != "seed"}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def make_config(margin: str = "adaptive", **overrides) -> TrainConfig:
    """A ``TrainConfig`` for a margin preset; ``overrides`` that are None keep the preset/default.

    ``make_config("fixed", margin_base=0.7)`` is a custom margin of 0.7 (λ_σ = λ_res = 0).
    """
    return TrainConfig.from_dict({"margin": margin, **{k: v for k, v in overrides.items() if v is not None}})
