"""A sweep's grid: the ``--vary FIELD=V1,V2`` axes parsed into values of ``TrainConfig``'s fields."""

from __future__ import annotations

import dataclasses

from raml.errors import UserError
from raml.train.config import TrainConfig

# The words a switch takes, as click's boolean options take them.
SWITCH_WORDS = {
    **dict.fromkeys(("on", "true", "t", "yes", "y", "1"), True),
    **dict.fromkeys(("off", "false", "f", "no", "n", "0"), False),
}


def switch(text: str) -> bool:
    """``"on"`` → True, ``"off"`` → False (and the other words of ``SWITCH_WORDS``); else ValueError."""
    try:
        return SWITCH_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"{text!r} is not a switch: on or off") from None


def parse_vary(specs) -> dict[str, list]:
    """``["lr=1e-4,5e-5", "cross_attention=on,off"]`` → ``{"lr": [1e-4, 5e-5], "cross_attention": [True, False]}``:
    a sweep's grid axes, each value parsed as its ``TrainConfig`` field's type."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    grid = {}
    for spec in specs:
        name, _, values = spec.partition("=")
        name = name.strip().replace("-", "_")
        if name in ("seed", "margin") or name not in fields:
            raise UserError(
                f"--vary {spec!r}: expected FIELD=v1,v2 with FIELD a training option other than seed "
                "and margin (those have --seeds and --margins), e.g. lr=1e-4,5e-5"
            )
        kind = (
            switch
            if isinstance(fields[name].default, bool)
            else (float if fields[name].metadata.get("preset") else type(fields[name].default))
        )
        try:
            grid[name] = [kind(value.strip()) for value in values.split(",") if value.strip()]
        except ValueError:
            expected = "on or off" if kind is switch else kind.__name__
            raise UserError(f"--vary {spec!r}: each value must be {expected}") from None
        if not grid[name]:
            raise UserError(f"--vary {spec!r}: no values")
    return grid
