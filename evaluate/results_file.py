"""Reading a results.json back: the shape every entry must have (``_ENTRY_SHAPE``), checked
before a report, an ablation or the tracker reads a number from it, and how a diverged run shows
in a table cell."""

from __future__ import annotations

import math
from pathlib import Path

from raml.cache.files import read_json_checked
from raml.errors import UserError
from raml.evaluate.results import PIXEL_METRICS

NUMBER = (int, float)
_PIXEL_STATS = {"mean!": "percent?", "std!": "number?", "per_seed": ["number?"], "ci95": "pair?"}
# What report reads from a results entry, and what each must be (None is allowed where noted):
# "percent" a number from 0 to 100 ("percent?": or None), "number?"/"int?" a number/whole number or None
# (a baseline has no seed), "pair?" two numbers or None (a confidence interval), dict and list shapes describe
# their values ("*": every key; a name ending in "!" must be there), a tuple of shapes that are not
# all types is any one of them. Other fields pass unchecked.
_ENTRY_SHAPE = {
    "mean_auroc": "percent",
    "std_auroc": "number?",
    "mean_average_precision": "percent?",
    "mean_f1_max": "percent?",
    "details": {"*": "percent"},
    "auroc_over_seeds": {"mean": "number?", "std!": "number?", "n!": int},
    "mean_auroc_ci95": "pair?",
    "per_seed": {"seed!": ["int?"], "auroc!": ["number?"], "average_precision!": ["number?"], "f1_max!": ["number?"]},
    "categories": {
        "*": {
            "auroc": "percent",
            "auroc_ci95": "pair?",
            "auroc_per_seed": ["number?"],
            "auroc_over_seeds": {"mean": "number?", "std!": "number?", "n!": int},
        }
    },
    "not_available": {"*": str},
    "seeds": ["int?"],
    "random_weights": bool,
    "image_score": str,
    "weights": str,
    "protocol": {"name": str, "image_list_hash": str, "n_images": int, "dataset": {"kind": str, "root": str}},
    "pixel": {
        "map!": str,
        "resolution!": str,
        "mean!": {f"{name}!": _PIXEL_STATS for name in PIXEL_METRICS},
        "categories!": {"*": {"images": int, "anomalous": int, **{name: _PIXEL_STATS for name in PIXEL_METRICS}}},
        "not_available!": {"*": str},
    },
    "method": str,
    "diverged": [{"run!": str, "seed!": int, "epoch!": int, "step!": int, "term!": str}],
    "anomalous_inside_margin": "number?",
    "anomalous_inside_margin_over_seeds": {"mean": "number?", "std": "number?"},
    "score_weights": {"visual_weight!": NUMBER, "text_weight!": NUMBER},
    "scores_csv": str,
    "anomaly_maps": (str, {"file!": str, "key!": str, "tiles!": int, "description!": str}),  # str: before token maps
}


def diverged_cell(records: list | None) -> str:
    """``seed 1 (epoch 2, step 5: center)``, one per diverged run; "–" for none."""
    return (
        "; ".join(f"seed {r['seed']} (epoch {r['epoch']}, step {r['step']}: {r['term']})" for r in records or ()) or "–"
    )


def shape_problem(value, shape, where: str) -> str | None:
    """Why ``value`` does not have ``shape`` (see ``_ENTRY_SHAPE``), or None."""
    if shape in ("percent", "percent?"):  # a number from 0 to 100 (or None)
        ok = (value is None and shape == "percent?") or (
            isinstance(value, NUMBER) and not isinstance(value, bool) and 0 <= value <= 100
        )
        return None if ok else f"{where} is {value!r}, not a percentage"
    if shape == "pair?":  # [low, high], or None
        ok = value is None or (
            isinstance(value, list)
            and len(value) == 2
            and all(shape_problem(v, "number?", where) is None and v is not None for v in value)
        )
        return None if ok else f"{where} is {value!r}, not a pair of numbers"
    if shape in ("number?", "int?"):  # a finite number (a whole one), or None
        ok = value is None or (
            isinstance(value, NUMBER if shape == "number?" else int)
            and not isinstance(value, bool)
            and math.isfinite(value)
        )
        return None if ok else f"{where} is {value!r}, not a {'number' if shape == 'number?' else 'whole number'}"
    if isinstance(shape, dict):
        if not isinstance(value, dict):
            return f"{where} is a {type(value).__name__}, not an object"
        missing = [key.rstrip("!") for key in shape if key.endswith("!") and key.rstrip("!") not in value]
        if missing:
            return f"{where} has no {missing[0]}"
        items = (
            value.items()
            if "*" in shape
            else ((k.rstrip("!"), value[k.rstrip("!")]) for k in shape if k.rstrip("!") in value)
        )
        return next(
            (
                problem
                for key, item in items
                if (
                    problem := shape_problem(
                        item, shape.get("*", shape.get(key, shape.get(f"{key}!"))), f"{where}.{key}"
                    )
                )
            ),
            None,
        )
    if isinstance(shape, list):
        if not isinstance(value, list):
            return f"{where} is a {type(value).__name__}, not a list"
        return next(
            (problem for i, item in enumerate(value) if (problem := shape_problem(item, shape[0], f"{where}[{i}]"))),
            None,
        )
    if isinstance(shape, tuple) and not all(isinstance(kind, type) for kind in shape):  # any one of these shapes
        problems = [shape_problem(value, one, where) for one in shape]
        return None if None in problems else problems[-1]
    kinds = shape if isinstance(shape, tuple) else (shape,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    return None if ok else f"{where} is {value!r}, of the wrong kind"


def read_results(path: Path) -> dict:
    """A results file as ``{config: entry}``, checked (``_ENTRY_SHAPE``); entries of the original
    release (no protocol) are accepted too, and marked as such."""
    data = read_json_checked(path)
    if not isinstance(data, dict) or not all(
        isinstance(e, dict) and "mean_auroc" in e and "details" in e for e in data.values()
    ):
        raise UserError(
            f'{path}: not a results file (expected {{"<config>": {{"mean_auroc": ..., "details": {{...}}}}}}}})'
        )
    problem = next(
        (problem for config, entry in data.items() if (problem := shape_problem(entry, _ENTRY_SHAPE, config))), None
    )
    if problem:
        raise UserError(f"{path}: not a results file RAML wrote: {problem} (edited by hand?)")
    return data
