"""The numbers of a results entry (``results.json``) as MLflow metrics, unchanged: what tracking logs
for a configuration (``results_metrics``), for one seed of it (``seed_metrics``), and the prefix that
keeps results on another protocol apart (``protocol_prefix``). Names: ``<metric>`` for the mean over
categories, ``<metric>/<category>`` per category, ``_std``, ``_ci95_low`` and ``_ci95_high`` beside them.
"""

from __future__ import annotations


def results_metrics(entry: dict, prefix: str = "") -> dict:
    """Every number of a results entry, as MLflow metrics named ``<prefix><metric>[/<category>]``."""
    metrics = {}

    def put(key, value, category=None):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[prefix + key + ("" if category is None else f"/{category}")] = value

    def put_ci(key, interval, category=None):
        if interval:
            put(f"{key}_ci95_low", interval[0], category)
            put(f"{key}_ci95_high", interval[1], category)

    put("image_auroc", entry.get("mean_auroc"))
    put("image_auroc_std", entry.get("std_auroc"))
    put_ci("image_auroc", entry.get("mean_auroc_ci95"))
    put("image_ap", entry.get("mean_average_precision"))
    put("image_f1_max", entry.get("mean_f1_max"))
    put("n_seeds", (entry.get("auroc_over_seeds") or {}).get("n"))
    put("anomalous_inside_margin", entry.get("anomalous_inside_margin"))
    for category, stats in (entry.get("categories") or {}).items():
        put("image_auroc", stats.get("auroc"), category)
        put("image_auroc_std", stats.get("auroc_std"), category)
        put_ci("image_auroc", stats.get("auroc_ci95"), category)
        put("image_ap", stats.get("average_precision"), category)
        put("image_f1_max", stats.get("f1_max"), category)
    from raml.evaluate.results import PIXEL_METRICS

    pixel = entry.get("pixel") or {}
    for name in PIXEL_METRICS:
        put(name, (pixel.get("mean") or {}).get(name, {}).get("mean"))
        put(f"{name}_std", (pixel.get("mean") or {}).get(name, {}).get("std"))
        for category, stats in (pixel.get("categories") or {}).items():
            put(name, stats[name].get("mean"), category)
            put(f"{name}_std", stats[name].get("std"), category)
            put_ci(name, stats[name].get("ci95"), category)
    return metrics


def seed_metrics(entry: dict, seed: int, prefix: str = "") -> dict:
    """The numbers of one seed of a results entry: its own AUROC, AP and F1-max (mean over
    categories), per category AUROC and pixel metrics (results written before ``per_seed`` existed
    give the per-category ones only)."""
    if seed not in entry.get("seeds", []):
        return {}
    index = entry["seeds"].index(seed)
    metrics = {}
    per_seed = entry.get("per_seed") or {}
    for key, name in (("image_auroc", "auroc"), ("image_ap", "average_precision"), ("image_f1_max", "f1_max")):
        if name in per_seed:
            metrics[prefix + key] = per_seed[name][index]
    for category, stats in (entry.get("categories") or {}).items():
        metrics[f"{prefix}image_auroc/{category}"] = stats["auroc_per_seed"][index]
    from raml.evaluate.results import PIXEL_METRICS

    pixel = entry.get("pixel") or {}
    for name in PIXEL_METRICS:
        values = (pixel.get("mean") or {}).get(name, {}).get("per_seed")
        if values:
            metrics[prefix + name] = values[index]
        for category, stats in (pixel.get("categories") or {}).items():
            metrics[f"{prefix}{name}/{category}"] = stats[name]["per_seed"][index]
    return {key: value for key, value in metrics.items() if value is not None}


def protocol_prefix(entry: dict) -> str:
    """``""`` for the run's own held-out images, else ``<protocol>-<dataset>.`` (kept apart)."""
    protocol = entry.get("protocol") or {}
    if protocol.get("name", "holdout") == "holdout":
        return ""
    return f"{protocol.get('name')}-{(protocol.get('dataset') or {}).get('kind', 'other')}."
