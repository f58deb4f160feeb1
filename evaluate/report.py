"""``report``: one Markdown comparison per image list, and PNG plots, from results files; the same
report as one self-contained HTML page (evaluate/report_html.py).

Rows are grouped by (protocol, dataset): the MVTec hold-out comparison and the VisA transfer
results become two tables. Inside one table every row must have been scored on the same images
(same image-list hash); otherwise the report is refused — a comparison on different images is
exactly the mistake of the original release (its WinCLIP row).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from raml.cache.files import atomic_write_text, make_dirs
from raml.errors import UserError
from raml.evaluate.results import MAP_EXAMPLES, NOT_MEANINGFUL, PIXEL_METRICS, find_results, mean_std, read_scores_csv
from raml.evaluate.results_file import diverged_cell, read_results


class MixedImageListsError(UserError):
    """Rows scored on different images were about to share a table."""


@dataclass
class Row:
    """One configuration of one results file."""

    label: str  # the column name in the tables (the config, made unique)
    config: str
    entry: dict
    path: Path  # its results.json

    @property
    def protocol(self) -> dict:
        return self.entry.get("protocol") or {}

    @property
    def random_weights(self) -> bool:
        return bool(self.entry.get("random_weights"))


def load_rows(paths) -> list[Row]:
    """Every configuration of every results file."""
    return [
        Row(config, config, entry, path) for path in find_results(paths) for config, entry in read_results(path).items()
    ]


def _label_uniquely(rows: list[Row]) -> None:
    """Within one table, a configuration name used by two results files gets its directory added."""
    counts = defaultdict(int)
    for row in rows:
        counts[row.config] += 1
    for row in rows:
        row.label = f"{row.config} ({row.path.parent.name})" if counts[row.config] > 1 else row.config


def group_by_image_list(rows: list[Row]) -> dict[str, list[Row]]:
    """Rows grouped by protocol and dataset; refuses a group whose rows used different images."""
    groups = defaultdict(list)
    for row in rows:
        protocol = row.protocol
        title = (
            f"{protocol.get('name', 'unknown protocol')} · {protocol.get('dataset', {}).get('kind', 'unknown dataset')}"
            if protocol
            else "original-release results (protocol and image list not recorded)"
        )
        groups[title].append(row)
    for title, members in groups.items():
        hashes = {row.protocol.get("image_list_hash") for row in members}
        if len(hashes) > 1:
            listing = "\n".join(
                f"  {row.path}: {row.config}: {row.protocol.get('image_list_hash')} "
                f"({row.protocol.get('n_images')} images, from {row.protocol.get('source')})"
                for row in members
            )
            raise MixedImageListsError(
                f"refusing to put rows scored on different image lists in one table ({title}):\n{listing}\n"
                "Score every configuration on the same images (for a baseline: --split-from the training run) "
                "or report them separately."
            )
        _label_uniquely(members)
    return dict(groups)


def _spread(entry: dict, category: str | None) -> tuple[float | None, int]:
    """(sample std over seeds in %, n seeds) of a category's AUROC, or of the mean (``None``).

    Results written before ``auroc_over_seeds`` was recorded stored a population std (ddof = 0);
    their std is recomputed from the per-seed AUROCs with ``mean_std``, so that every table uses one
    rule.
    """
    stats = (
        entry.get("auroc_over_seeds")
        if category is None
        else entry.get("categories", {}).get(category, {}).get("auroc_over_seeds")
    )
    if stats is not None:
        return stats["std"], stats["n"]
    per_seed = {c: stats["auroc_per_seed"] for c, stats in entry.get("categories", {}).items()}
    if not per_seed:
        return None, len(entry.get("seeds", [])) or 1
    values = per_seed[category] if category is not None else [sum(v) / len(v) for v in zip(*per_seed.values())]
    stats = mean_std(values)
    return stats["std"], stats["n"]


def _cell(entry: dict, category: str | None) -> str:
    """``94.1 ± 1.2 [88.0, 99.0]`` (mean over seeds ± sample std, bootstrap 95 % CI) or ``n/a``."""
    if category is None:
        std, _ = _spread(entry, None)
        return (
            "n/a"
            if entry["mean_auroc"] is None
            else f"**{entry['mean_auroc']:.2f}**" + ("" if std is None else f" ± {std:.2f}")
        )
    stats = entry.get("categories", {}).get(category)
    if stats is None or stats.get("auroc") is None:
        value = entry.get("details", {}).get(category)
        return "n/a" if value is None else f"{value:.2f}"
    std, _ = _spread(entry, category)
    interval = "" if stats.get("auroc_ci95") is None else " [{:.1f}, {:.1f}]".format(*stats["auroc_ci95"])
    return f"{stats['auroc']:.2f}{'' if std is None else f' ± {std:.2f}'}{interval}"


def _n_seeds(entry: dict) -> str:
    return str(_spread(entry, None)[1]) if "mean_auroc" in entry else "?"


def image_score_rule(entry: dict) -> str:
    """How the entry's image score was computed: WinCLIP's rule, or RAML's s_final weights."""
    if entry.get("image_score"):
        return entry["image_score"]
    weights = entry.get("score_weights")
    if weights:
        return f"{weights['visual_weight']:g}·s_visual + {weights['text_weight']:g}·s_text"
    return "?"


def _inside_margin(entry: dict) -> str:
    """The fraction of anomalous training images inside the margin at the last epoch (mean ± std
    over seeds), or n/a for methods without a margin and for runs that did not record it."""
    if entry.get("anomalous_inside_margin") is None:
        return "n/a"
    std = (entry.get("anomalous_inside_margin_over_seeds") or {}).get("std")
    return f"{entry['anomalous_inside_margin']:.2f}" + ("" if std is None else f" ± {std:.2f}")


def comparison_markdown(title: str, rows: list[Row], plots: list[str]) -> str:
    """The Markdown of one table: per-category AUROC side by side, then the other metrics."""
    categories = sorted({c for row in rows for c in (*row.entry["details"], *row.entry.get("not_available", {}))})
    protocol = rows[0].protocol
    lines = [f"## {title}", ""]
    if protocol:
        lines += [
            f"Images: {protocol.get('n_images')} (hash `{protocol.get('image_list_hash')}`, from "
            f"`{protocol.get('source')}`).",
            "",
        ]
    lines += [
        "Image AUROC % per category: mean over n seeds ± sample std (ddof = 1), [bootstrap 95 % CI].",
        "",
        "| category | " + " | ".join(row.label + (" †" if row.random_weights else "") for row in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    lines += [f"| {c} | " + " | ".join(_cell(row.entry, c) for row in rows) + " |" for c in categories]
    lines += [
        "| **mean** | " + " | ".join(_cell(row.entry, None) for row in rows) + " |",
        "| n (seeds) | " + " | ".join(_n_seeds(row.entry) for row in rows) + " |",
        "",
    ]
    lines += [
        "| configuration | method | image score | n (seeds) | AP % | F1-max % | pixel AUROC % | AUPRO % | "
        "pixel F1-max % | anomalous inside margin | backbone | weights |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        entry = row.entry
        pixel = (entry.get("pixel") or {}).get("mean", {})
        lines.append(
            f"| {row.label} | {entry.get('method', '?')} | {image_score_rule(entry)} | {_n_seeds(entry)} | "
            f"{_fmt(entry.get('mean_average_precision'))} | {_fmt(entry.get('mean_f1_max'))} | "
            + " | ".join(_mean_std(pixel.get(name)) for name in PIXEL_METRICS)
            + " | "
            f"{_inside_margin(entry)} | {entry.get('backbone', '?')} | {entry.get('weights', '?')}"
            f"{' (random: not meaningful)' if row.random_weights else ''} |"
        )
    if any(row.entry.get("anomalous_inside_margin") for row in rows):
        lines += [
            "",
            "Anomalous inside margin: the fraction of the last training epoch's anomalous images whose "
            "distance to the center is below their margin (mean ± std over seeds). An image inside its "
            "margin gets a hinge gradient that does not depend on m, so two margin settings train alike "
            "while the same images are inside both (for instance all of them: 1.00).",
        ]
    notes = sorted(
        {f"{row.label}: {c}: {reason}" for row in rows for c, reason in row.entry.get("not_available", {}).items()}
    )
    if notes:
        lines += ["", "n/a — " + "; ".join(notes)]
    diverged = [f"{row.label}: {diverged_cell([record])}" for row in rows for record in row.entry.get("diverged", [])]
    if diverged:
        lines += [
            "",
            "Diverged (their loss or gradient stopped being finite; no checkpoint, not in the means) — "
            + "; ".join(diverged),
        ]
    lines += pixel_markdown(rows)
    if any(row.random_weights for row in rows):
        lines += ["", f"† {NOT_MEANINGFUL}."]
    lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _mean_std(stats: dict | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.2f}" + ("" if stats.get("std") is None else f" ± {stats['std']:.2f}")


def pixel_markdown(rows: list[Row]) -> list[str]:
    """Where each row's map comes from, and the AUPRO per category with its CI (the lines under a table)."""
    mapped = [(row.label, row.entry["pixel"]) for row in rows if row.entry.get("pixel")]
    if not mapped:
        return []
    lines = ["", f"Pixel metrics: {mapped[0][1]['resolution']}. Mean over categories ± sample std over seeds. Maps:"]
    by_map = defaultdict(list)
    for label, block in mapped:
        by_map[block["map"]].append(label)
    lines += [f"- {', '.join(labels)}: {source}" for source, labels in by_map.items()]
    missing = sorted(
        {f"{label}: {c}: {reason}" for label, block in mapped for c, reason in block["not_available"].items()}
    )
    if missing:
        lines.append("- n/a — " + "; ".join(missing))
    scored = [(label, block) for label, block in mapped if block["categories"]]
    categories = sorted({c for _, block in scored for c in block["categories"]})
    if scored:
        lines += [
            "",
            "AUPRO % (FPR ≤ 0.3) per category: mean over seeds ± sample std [bootstrap 95 % CI].",
            "",
            "| category | " + " | ".join(label for label, _ in scored) + " |",
            "|---|" + "---|" * len(scored),
        ]
        for category in categories:
            cells = []
            for _, block in scored:
                stats = block["categories"].get(category, {}).get("aupro")
                interval = "" if not (stats or {}).get("ci95") else f" [{stats['ci95'][0]:.1f}, {stats['ci95'][1]:.1f}]"
                cells.append(_mean_std(stats) + interval)
            lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def write_report(paths, out_dir) -> Path:
    """Write ``out_dir``/report.md, its PNG plots and report.html (the same, images embedded); returns
    the Markdown path."""
    from raml.evaluate import plots
    from raml.evaluate.report_html import report_html

    out_dir = Path(out_dir)
    make_dirs(out_dir)
    rows = load_rows(paths)
    groups = group_by_image_list(rows)
    sections = ["# RAML evaluation report", ""]
    if any(row.random_weights for row in rows):
        sections += [f"> **{NOT_MEANINGFUL}.** Rows marked † and every plot titled so.", ""]
    for title, members in groups.items():
        slug = _slug(title)
        scores = {row.label: _scores_of(row) for row in members}
        written = [plots.auroc_bars(members, out_dir / f"{slug}_auroc.png", title)]
        if any(scores.values()):
            written.append(plots.roc_curves(members, scores, out_dir / f"{slug}_roc.png", title))
            written.append(plots.score_histograms(members, scores, out_dir / f"{slug}_histograms.png", title))
        maps_png, maps_note = plots.anomaly_map_examples(
            members, scores, out_dir / f"{slug}_maps.png", title, MAP_EXAMPLES
        )
        written += [maps_png] if maps_png else []
        section = comparison_markdown(title, members, [p.name for p in written if p])
        if maps_note:
            section += f"\nAnomaly maps: {maps_note}\n"
        sections.append(section)
    path = out_dir / "report.md"
    markdown = "\n".join(sections)
    atomic_write_text(path, markdown)
    atomic_write_text(out_dir / "report.html", report_html(markdown, out_dir, banner_text=NOT_MEANINGFUL))
    return path


def _scores_of(row: Row) -> list[dict] | None:
    """The per-image scores of ``row`` (its first seed), or None when its CSV is not there."""
    name = row.entry.get("scores_csv")
    if not name or not (row.path.parent / name).is_file():
        return None
    records = [r for r in read_scores_csv(row.path.parent / name) if r["config"] == row.config]
    first_seed = records[0]["seed"] if records else None
    return [r for r in records if r["seed"] == first_seed]
