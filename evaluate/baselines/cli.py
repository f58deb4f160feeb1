"""``baseline``: the baselines' commands, scored exactly like RAML (same images, same results files)."""

from __future__ import annotations

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import SEED, FiniteFloat, device_option, echo_chosen, show_progress, text_list, with_options
from raml.cli.tracking import tracking_options
from raml.cli.workspace import dataset_of, results_dir
from raml.evaluate.cli import bootstrap_options, echo_entries
from raml.extract.cli import (
    BATCH_SIZE,
    WORKERS,
    chosen_dataset_root,
    dataset_option,
    load_backbone_from,
    model_option,
    refusing_contradictory_weights,
    root_option,
)
from raml.extract.model_config import WINCLIP_MODEL, WINCLIP_PRETRAINED
from raml.train.cli import read_training_cache, training_cache_options


@click.group()
def baseline():
    """Baselines scored exactly like RAML (same images, same results format)."""


@baseline.command("winclip")
@dataset_option()
@root_option
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the results files. Default: ./results/<dataset>/winclip/.",
)
@click.option(
    "--split-from",
    type=click.Path(exists=True),
    default=None,
    help="A training run: score exactly its held-out images (the holdout protocol), so that the "
    "baseline and the model are compared on the same images.",
)
@click.option(
    "--protocol",
    type=click.Choice(["official"]),
    default="official",
    show_default=True,
    help="Without --split-from: the full official test split.",
)
@model_option(default=WINCLIP_MODEL, show_default=True, help="open_clip ViT (name or config JSON).")
@click.option("--pretrained", default=WINCLIP_PRETRAINED, show_default=True, help="open_clip pretrained tag.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local checkpoint file (offline).")
@click.option("--random-weights", is_flag=True, help="Seeded random weights: exercises the code; meaningless.")
@device_option("cpu, cuda, cuda:1, ... or auto.")
@click.option(
    "--categories",
    default=None,
    callback=text_list(accepted="comma-separated category names"),
    help="Comma-separated subset.",
)
@click.option("--batch-size", type=BATCH_SIZE, default=8, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=WORKERS, default=2, show_default=True, help="Parallel image-decoding processes.")
@click.option(
    "--image-score",
    type=click.Choice(["global", "global+map"]),
    default="global",
    show_default=True,
    help="global: the global CLIP score (the paper's zero-shot rule); global+map: its mean with the "
    "multi-scale map's maximum (WinCLIP+'s few-shot rule).",
)
@click.option(
    "--maps",
    type=click.Choice(["all", "examples", "none"]),
    default="all",
    show_default=True,
    help="Which images get the multi-scale map (its windows cost ~12 global passes): all (pixel metrics), "
    "examples (the few a report shows), none. The global image score does not use them.",
)
@with_options(bootstrap_options)
@refusing_contradictory_weights
@tracking_options
@fail_cleanly
def baseline_winclip(
    dataset,
    root,
    out,
    split_from,
    protocol,
    model,
    pretrained,
    weights,
    random_weights,
    device,
    categories,
    batch_size,
    workers,
    image_score,
    maps,
    n_resamples,
    bootstrap_seed,
    tracking,
):
    """Zero-shot WinCLIP (Jeong et al., CVPR 2023): prompt ensemble, 2x2/3x3 windows, harmonic aggregation."""
    from raml.evaluate.baselines.winclip_run import run_winclip

    root = chosen_dataset_root(dataset, root)
    out = out or echo_chosen(
        "results", results_dir(dataset, "winclip" if image_score == "global" else f"winclip-{image_score}")
    )
    path, entries = run_winclip(
        dataset,
        root,
        out,
        lambda: load_backbone_from(model, pretrained, weights, random_weights, device),
        protocol=protocol,
        split_from=split_from,
        categories=categories,
        batch_size=batch_size,
        workers=workers,
        n_resamples=n_resamples,
        bootstrap_seed=bootstrap_seed,
        progress=show_progress(),
        image_score=image_score,
        maps=maps,
    )
    echo_entries(path, entries)
    if tracking:
        tracking.send([out])


feature_baseline_options = [
    training_cache_options,
    click.option(
        "--out",
        type=click.Path(file_okay=False),
        default=None,
        help="Directory for the results files. Default: ./results/<dataset>/<baseline>/.",
    ),
    click.option(
        "--split-from",
        type=click.Path(exists=True),
        default=None,
        help="A training run: fit on its training images and score its held-out ones, so that the "
        "baseline shares a table with it.",
    ),
    click.option(
        "--split-seed",
        type=SEED,
        default=None,
        help="Without --split-from: seed of the holdout split (default: train's).",
    ),
    click.option(
        "--holdout-fraction",
        type=FiniteFloat(0, 1, min_open=True, max_open=True),
        default=None,
        help="Without --split-from: fraction of each category's test set held out (default: train's).",
    ),
    *bootstrap_options,
    tracking_options,
]


def feature_baseline(name, cache_dir, out, tracking=None, **options) -> dict:
    """Run ``evaluate.baselines.features.run_feature_baseline``, print its summary and track it (``tracking``:
    a ``cli.tracking.Tracking``, or None)."""
    from raml.evaluate.baselines.features import run_feature_baseline

    table = read_training_cache(cache_dir)
    out = out or echo_chosen(
        "results", results_dir(dataset_of(cache_dir), name + ("-per-category" if options.get("per_category") else ""))
    )
    path, entries, result = run_feature_baseline(name, table, out, **options)
    echo_entries(path, entries)
    if tracking:
        tracking.send([out])
    return result


@baseline.command("linear")
@with_options(feature_baseline_options)
@click.option("--per-category", is_flag=True, help="One logistic regression per category (default: one for all).")
@fail_cleanly
def baseline_linear(cache_dir, out, **options):
    """Logistic regression (scikit-learn) on the global crop's cached embedding."""
    feature_baseline("linear", cache_dir, out, **options)


@baseline.command("knn-tiles")
@with_options(feature_baseline_options)
@fail_cleanly
def baseline_knn_tiles(cache_dir, out, **options):
    """Nearest normal crop per category and scale (PatchCore at crop level): trains on normal images only."""
    result = feature_baseline("knn-tiles", cache_dir, out, **options)
    bank, n = result["extra"]["memory_bank"], len(result["scores"]["final"])
    click.echo(
        f"  memory bank: {bank['crops']} crops of {bank['normal_images']} normal images "
        f"(largest category: {max(bank['crops_per_category'].values())} crops); scored {n} images in "
        f"{result['seconds']:.2f} s ({1000 * result['seconds'] / n:.2f} s per 1,000 images)"
    )


@baseline.command("knn-patches")
@with_options(feature_baseline_options)
@fail_cleanly
def baseline_knn_patches(cache_dir, out, **options):
    """PatchCore over the cached patch tokens: nearest training-normal token per category (a coreset when the bank
    is large); anomaly maps and pixel metrics. Needs a cache extracted with --patch-tokens."""
    result = feature_baseline("knn-patches", cache_dir, out, **options)
    banks, n = result["extra"]["memory_bank"], len(result["scores"]["final"])
    click.echo(
        f"  memory banks: {sum(b['bank'] for b in banks.values())} tokens kept of "
        f"{sum(b['tokens'] for b in banks.values())} ({result['extra']['coreset']}); scored {n} images in "
        f"{result['seconds']:.2f} s ({1000 * result['seconds'] / n:.1f} ms per image, bank building included)"
    )


@baseline.command("zero-shot-text")
@with_options(feature_baseline_options)
@fail_cleanly
def baseline_zero_shot_text(cache_dir, out, **options):
    """RAML's cached text score s_text alone: the zero-shot floor; with patch tokens, each token's text score is its
    anomaly map."""
    feature_baseline("zero-shot-text", cache_dir, out, **options)
