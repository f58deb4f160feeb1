"""The report's PNG plots (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from raml.cache.files import atomic_write_bytes  # noqa: E402
from raml.evaluate.overlay import MAP_CMAP  # noqa: E402

RANDOM_TITLE = "RANDOM WEIGHTS — NOT MEANINGFUL"


def _title(fig, title: str, rows) -> None:
    warning = f"\n{RANDOM_TITLE}" if any(row.random_weights for row in rows) else ""
    fig.suptitle(title + warning, color="firebrick" if warning else "black", fontsize=11)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG atomically (rendered in memory, then ``cache.files.atomic_write_bytes``),
    and close it."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def auroc_bars(rows, path: Path, title: str) -> Path:
    """Per-category image AUROC, one bar per configuration, whiskers = bootstrap 95 % CI."""
    categories = sorted({c for row in rows for c in row.entry["details"]})
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(categories) * max(1, len(rows)) + 2), 4))
    x = np.arange(len(categories) + 1)
    for i, row in enumerate(rows):
        values = [row.entry["details"].get(c, np.nan) for c in categories] + [row.entry["mean_auroc"]]
        ci = [row.entry.get("categories", {}).get(c, {}).get("auroc_ci95") for c in categories] + [None]
        # nan: no whisker (no CI known); 0 where a hand-edited file's CI leaves out its own value
        low = [max(v - c[0], 0) if c else np.nan for v, c in zip(values, ci)]
        high = [max(c[1] - v, 0) if c else np.nan for v, c in zip(values, ci)]
        ax.bar(
            x + (i - (len(rows) - 1) / 2) * width,
            values,
            width,
            yerr=[low, high],
            capsize=2,
            label=row.label,
            error_kw={"elinewidth": 0.8},
        )
    ax.set_xticks(x, categories + ["mean"], rotation=45, ha="right")
    ax.set_ylabel("image AUROC (%)")
    ax.set_ylim(0, 105)
    ax.axhline(50, color="grey", lw=0.6, ls=":")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    _title(fig, f"{title}: image AUROC per category (whiskers: bootstrap 95 % CI)", rows)
    return save_figure(fig, path)


def _by_category(records: list[dict]) -> dict:
    out = {}
    for record in records:
        out.setdefault(record["category"], []).append((int(record["label"]), float(record["final"])))
    return {c: (np.array([label for label, _ in v]), np.array([s for _, s in v])) for c, v in sorted(out.items())}


def roc_curves(rows, scores: dict, path: Path, title: str) -> Path:
    """ROC curve per category (one panel each), one line per configuration (its first seed)."""
    per_row = {row.label: _by_category(scores[row.label]) for row in rows if scores.get(row.label)}
    categories = sorted({c for data in per_row.values() for c in data})
    cols = min(4, len(categories))
    rows_n = -(-len(categories) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(max(4.5, 3.2 * cols), max(3.6, 3.0 * rows_n)), squeeze=False)
    for ax, category in zip(axes.flat, categories):
        for label, data in per_row.items():
            if category in data and len(set(data[category][0])) == 2:
                fpr, tpr, _ = roc_curve(*data[category])
                ax.plot(fpr, tpr, lw=1.2, label=label)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.6, ls=":")
        ax.set_title(category, fontsize=9)
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
    for ax in list(axes.flat)[len(categories) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    _title(fig, f"{title}: ROC curves (first seed)", rows)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # leave room for the two-line title
    return save_figure(fig, path)


def score_histograms(rows, scores: dict, path: Path, title: str) -> Path:
    """Final-score histograms of normal vs anomalous images, one panel per configuration."""
    shown = [row for row in rows if scores.get(row.label)]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.6 * len(shown), 3.0), squeeze=False)
    for ax, row in zip(axes.flat, shown):
        labels = np.array([int(r["label"]) for r in scores[row.label]])
        values = np.array([float(r["final"]) for r in scores[row.label]])
        bins = np.linspace(values.min(), values.max() + 1e-9, 21)
        ax.hist(values[labels == 0], bins=bins, alpha=0.6, label=f"normal ({(labels == 0).sum()})", color="tab:blue")
        ax.hist(values[labels == 1], bins=bins, alpha=0.6, label=f"anomalous ({(labels == 1).sum()})", color="tab:red")
        ax.set_title(row.label, fontsize=9)
        ax.set_xlabel("final score (all categories pooled)", fontsize=8)
        ax.legend(fontsize=7)
    axes.flat[0].set_ylabel("images")
    _title(fig, f"{title}: score distributions (first seed)", rows)
    fig.tight_layout(rect=(0, 0, 1, 0.9))  # leave room for the two-line title
    return save_figure(fig, path)


def overlay(ax, image, anomaly_map: np.ndarray, vmin: float, vmax: float, mask=None) -> None:
    """Draw ``image`` with ``anomaly_map`` (at the image's resolution) over it; ``mask`` (bool array)
    is outlined."""
    ax.imshow(image)
    ax.imshow(anomaly_map, cmap=MAP_CMAP, alpha=0.45, vmin=vmin, vmax=vmax, interpolation="nearest")
    if mask is not None and mask.any():
        ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    ax.set_xticks([])
    ax.set_yticks([])


def anomaly_map_examples(rows, scores: dict, path: Path, title: str, count: int) -> tuple[Path | None, str | None]:
    """A few test images with each configuration's anomaly map over them (one figure row per
    configuration with maps, at the image's resolution); (png, note)."""
    from raml.cache.tokens import map_at
    from raml.evaluate.results import pick_examples, read_maps
    from raml.extract.pyramid import BadImageError, load_mask, load_rgb

    mapped = [(row, maps) for row in rows if (maps := read_maps(row.path, row.entry))]
    if not mapped:
        return None, "no results file of this table saved anomaly maps."
    root = rows[0].protocol.get("dataset", {}).get("root")
    first_row, first_maps = mapped[0]
    examples = pick_examples(
        [r for r in scores.get(first_row.label) or [] if r["relpath"] in first_maps["grids"]], count
    )
    if not examples:
        return None, "no scored image has an anomaly map."
    if not root or not (Path(root) / examples[0]["relpath"]).is_file():
        return None, f"skipped: the test images are not reachable under the dataset root {root!r} on this machine."
    # one colour range per row (configuration): its maps over every scored image
    row_ranges = [
        (float(values.min()), float(values.max()))
        for values in (np.stack(list(maps["grids"].values())) for _, maps in mapped)
    ]
    # one row per configuration, one column per image: a short, wide figure that reads like a table
    fig, axes = plt.subplots(
        len(mapped), len(examples), figsize=(3.0 * len(examples), 3.1 * len(mapped) + 0.6), squeeze=False
    )
    for c, record in enumerate(examples):
        try:
            image = load_rgb(Path(root) / record["relpath"])
        except BadImageError as err:
            plt.close(fig)
            return None, f"skipped: {err}"
        for r, (row, maps) in enumerate(mapped):
            ax = axes[r, c]
            mask_relpath = maps["masks"].get(record["relpath"]) or ""
            try:
                mask = (
                    load_mask(
                        Path(root) / mask_relpath, image.width, image.height, image=Path(root) / record["relpath"]
                    )
                    if mask_relpath and (Path(root) / mask_relpath).is_file()
                    else None
                )
            except BadImageError as err:  # a mask replaced since it was scored: no figure rather than a wrong one
                plt.close(fig)
                return None, f"skipped: {err}"
            if record["relpath"] in maps["grids"]:
                full = map_at(maps["grids"][record["relpath"]], image.height, image.width, tiles=maps["tiles"])
                overlay(ax, image, full, *row_ranges[r], mask)
            else:
                ax.imshow(image)
                ax.set_xlabel("(no map)", fontsize=7)
            if r == 0:
                ax.set_title(
                    f"{record['category']} · {record['defect_type']}\n{Path(record['relpath']).name}", fontsize=8
                )
            if c == 0:
                ax.set_ylabel(f"{row.label}\n{_short(maps['description'])}", fontsize=8)
    _title(fig, f"{title}: anomaly maps (brighter = more anomalous; colour range per row; cyan: defect mask)", rows)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.7 / fig.get_figheight()))  # 0.7 in for the two-line title
    return save_figure(fig, path), None


def _short(description: str) -> str:
    """A map's description cut to the figure's row label: what comes before its colon."""
    return description.split(":")[0]


def difference_forest(ablation: dict, path: Path) -> Path:
    """``ablate``'s rows: each one's AUROC difference from the reference configuration, with its
    paired bootstrap 95 % CI (a forest plot: the rows whose interval excludes 0 differ)."""
    rows = [row for row in ablation["rows"] if row["configuration"] != ablation["reference"]]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 2.0))
    y = np.arange(len(rows))[::-1]
    values = np.array([row["difference"]["value"] for row in rows])
    intervals = np.array([row["difference"]["ci95"] for row in rows]).reshape(-1, 2)
    ax.errorbar(values, y, xerr=[values - intervals[:, 0], intervals[:, 1] - values], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=0.8, ls=":")
    ax.set_yticks(y, [row["configuration"] for row in rows])
    ax.set_xlabel(f"held-out image AUROC − {ablation['reference']} (percentage points; paired bootstrap 95 % CI)")
    warning = f"\n{RANDOM_TITLE}" if ablation["random_weights"] else ""
    ax.set_title(
        "What each part adds, and the baselines" + warning, color="firebrick" if warning else "black", fontsize=11
    )
    return save_figure(fig, path)
