"""Divergence: a run whose loss or gradient stops being finite (``train.fit``): where it happened,
in words, and when training stops. The check of each step is ``train.step.PassStep.step``'s."""

from __future__ import annotations

import math

import torch

from raml.errors import UserError
from raml.train.config import TrainConfig
from raml.train.loss import PIXEL_TERMS, TERMS


class TrainingDiverged(UserError):
    """A run's loss or gradient stopped being finite (``record``: ``divergence_record``); nothing of
    it was written."""

    def __init__(self, record: dict):
        super().__init__(divergence_message(record))
        self.record = record


def divergence_record(config: TrainConfig, step: int, steps: int, stats: dict) -> dict:
    """Where run ``config`` diverged: global ``step`` (1-based; ``steps`` per epoch), the first loss term
    that was not finite at that step (``stats``: the step's terms; "gradient" when every term was
    finite but a gradient was not), and what to try."""
    terms = {name: value for name, value in stats.items() if name in TERMS + PIXEL_TERMS}
    term = next(
        (name for name, value in terms.items() if name != "loss" and not math.isfinite(value)),
        "loss" if not math.isfinite(terms.get("loss", 0.0)) else "gradient",
    )
    hint = f"lower --lr (now {config.lr:g}; try {config.lr / 10:g})"
    if not config.grad_clip_norm:
        hint += " or clip each step's gradient with --grad-clip-norm 1.0"
    return {
        "seed": config.seed,
        "epoch": (step - 1) // steps + 1,
        "step": (step - 1) % steps + 1,
        "steps_per_epoch": steps,
        "term": term,
        "hint": hint,
        "terms": {name: value if math.isfinite(value) else repr(value) for name, value in terms.items()},
    }


def divergence_message(record: dict) -> str:
    value = record["terms"].get(record["term"], "not finite")
    what = (
        "a gradient stopped being finite"
        if record["term"] == "gradient"
        else f"the {record['term']} term became {value}"
    )
    return (
        f"training diverged (seed {record['seed']}) at epoch {record['epoch']}, step {record['step']} of "
        f"{record['steps_per_epoch']}: {what}. No checkpoint was written. Try: {record['hint']}."
    )


def should_stop(failed_at: torch.Tensor, stop_on_divergence: bool) -> bool:
    """Whether training stops here: a run diverged and the pass stops on one, or every run diverged."""
    failed = failed_at > 0
    return bool(failed.any()) if stop_on_divergence else bool(failed.all())
