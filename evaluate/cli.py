"""The evaluation commands: ``evaluate``, ``report``, ``bench maps`` and ``status`` (the workspace
at a glance). The studies that train and then evaluate (``sweep``, ``ablate``, ``demo``) are
evaluate/sweep_cli.py's, the baselines evaluate/baselines/cli.py's, the commands that score new
images evaluate/deploy/cli.py's.
"""

from __future__ import annotations

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import (
    SCORE_WEIGHT,
    SEED,
    FiniteFloat,
    echo_chosen,
    non_empty,
    with_options,
)
from raml.cli.progress import Progress
from raml.cli.tracking import tracking_options
from raml.cli.workspace import REPORT_DIR, RESULTS, dataset_of, results_dir
from raml.evaluate.bootstrap_settings import CI_LEVEL, DEFAULT_BOOTSTRAP
from raml.evaluate.workspace import newest_run_dir, run_label, scoring_cache
from raml.extract.cli import dataset_option
from raml.train.cli import (
    stage_two_device_option,
)

bootstrap_options = [
    click.option(
        "--bootstrap",
        "n_resamples",
        type=click.IntRange(1, 1_000_000),
        default=DEFAULT_BOOTSTRAP,
        show_default=True,
        help=f"Bootstrap resamples for the AUROC {CI_LEVEL:.0%} CI.",
    ),
    click.option("--bootstrap-seed", type=SEED, default=0, show_default=True, help="Seed of the bootstrap resampling."),
]


def _with_std(stats: dict) -> str:
    return f"{stats['mean']:.2f}" + ("" if stats["std"] is None else f" ± {stats['std']:.2f}")


def echo_entries(path, entries) -> None:
    """A one-line summary per configuration, then where the files are."""
    for config, entry in entries.items():
        protocol = entry["protocol"]
        std = "" if entry["std_auroc"] is None else f" ± {entry['std_auroc']:.2f}"
        click.echo(
            f"  {config}: image AUROC {entry['mean_auroc']:.2f}{std} %, AP {entry['mean_average_precision']:.2f} %, "
            f"F1-max {entry['mean_f1_max']:.2f} % — n = {entry['auroc_over_seeds']['n']} seed(s), {protocol['name']} protocol, "
            f"{protocol['n_images']} images (hash {protocol['image_list_hash'][:12]}…)"
            + (f", image score: {entry['image_score']}" if entry.get("image_score") else "")
        )
        for category, reason in entry["not_available"].items():
            click.echo(f"    {category}: n/a ({reason})")
        pixel = entry.get("pixel")
        if pixel and pixel["mean"]["aupro"]["mean"] is not None:
            mean = pixel["mean"]
            click.echo(
                f"    pixel: AUROC {_with_std(mean['pixel_auroc'])} %, AUPRO {_with_std(mean['aupro'])} %, "
                f"F1-max {_with_std(mean['pixel_f1_max'])} % — {pixel['map']}"
            )
        elif pixel:
            click.echo(f"    pixel: n/a ({'; '.join(sorted(set(pixel['not_available'].values())))})")
    if any(entry.get("random_weights") for entry in entries.values()):
        click.secho(
            "  RANDOM WEIGHTS: these numbers are NOT MEANINGFUL (the pipeline ran; nothing was measured).", fg="yellow"
        )
    maps = ", anomaly_maps.npz" if any("anomaly_maps" in entry for entry in entries.values()) else ""
    click.echo(f"→ {path} (+ scores.csv{maps})")


@click.command()
@click.option(
    "--checkpoint",
    "checkpoints",
    multiple=True,
    type=click.Path(exists=True),
    help="A run directory (or its checkpoint.pt), or a sweep directory of runs; repeat for several. "
    "Runs named <config>-seed<k> are seeds of one configuration (mean ± std). Default: the newest "
    "finished run or sweep under ./runs/.",
)
@dataset_option(
    "Dataset to score, through its cache under ./features/<dataset>/ of the runs' backbone. Default: the "
    "dataset the runs were trained on (holdout); another is scored under the transfer protocol.",
    default=None,
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Feature cache to score: the training cache (holdout) or another dataset's (transfer). "
    "Default: see --dataset.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for the results files. Default: ./results/<dataset>/<run>/.",
)
@click.option(
    "--protocol",
    type=click.Choice(["holdout", "transfer", "official"]),
    default=None,
    help="Default: holdout on the cache the model was trained on, transfer on any other.",
)
@click.option(
    "--visual-weight", type=SCORE_WEIGHT, default=None, help="Weight of s_visual (default: the checkpoint's)."
)
@click.option("--text-weight", type=SCORE_WEIGHT, default=None, help="Weight of s_text (default: the checkpoint's).")
@click.option(
    "--map-weight",
    type=FiniteFloat(0, 1),
    default=0.0,
    show_default=True,
    help="Image score = (1 - w)·s_final + w·(the anomaly map's maximum); needs runs with a pixel head.",
)
@click.option(
    "--name",
    default=None,
    callback=non_empty,
    help="Name of the configuration in the results (default: the run directory's).",
)
@with_options(bootstrap_options)
@stage_two_device_option
@tracking_options
@fail_cleanly
def evaluate(
    checkpoints,
    dataset,
    cache_dir,
    out,
    protocol,
    visual_weight,
    text_weight,
    map_weight,
    name,
    n_resamples,
    bootstrap_seed,
    device,
    tracking,
):
    """Score trained checkpoints on a cache: image metrics per category, per-image scores, and for runs with a
    pixel head their anomaly maps' pixel metrics (pixel AUROC, AUPRO, pixel F1-max).

    Writes OUT/results.json (the original release's schema plus AP, F1-max, CI, seeds, protocol and
    image-list hash, pixel metrics), OUT/scores.csv (visual, text and final score of every image and
    run) and OUT/anomaly_maps.npz. Without options: the newest run, on the cache it was trained on
    (holdout); --dataset visa scores it on VisA's cache (transfer).
    """
    from raml.evaluate.run import evaluate_checkpoints

    checkpoints = checkpoints or (newest_run_dir(sweeps=True),)
    cache_dir = cache_dir or scoring_cache(checkpoints, dataset)
    out = out or echo_chosen("results", results_dir(dataset_of(cache_dir), run_label(checkpoints)))
    with Progress() as steps:
        path, entries = evaluate_checkpoints(
            checkpoints,
            cache_dir,
            out,
            protocol=protocol,
            visual_weight=visual_weight,
            text_weight=text_weight,
            map_weight=map_weight,
            n_resamples=n_resamples,
            bootstrap_seed=bootstrap_seed,
            name=name,
            log=steps.echo,
            device=device,
            steps=steps,
        )
    echo_entries(path, entries)
    if tracking:
        tracking.send([out])


@click.command()
@click.argument("results", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for report.md, report.html and the plots. Default: ./results/report/.",
)
@fail_cleanly
def report(results, out):
    """Compare results files side by side: Markdown tables and PNG plots (report.md), and the same in one
    self-contained page for a browser (report.html: images embedded, tables sortable by column).

    RESULTS are results.json files or directories searched for them (default: ./results/). Rows are
    grouped by protocol and dataset; rows scored on different image lists are never put in one
    table (refused).
    """
    from raml.evaluate.report import write_report

    results = results or (echo_chosen("results", RESULTS),)
    out = out or echo_chosen("report", REPORT_DIR)
    path = write_report(results, out)
    click.echo(f"report → {path} and {path.with_suffix('.html')}")


@click.command("maps")
@click.option(
    "--images", default=20, type=click.IntRange(1, 10_000), show_default=True, help="Test images whose maps are timed."
)
@click.option(
    "--normals",
    default=200,
    type=click.IntRange(1, 100_000),
    show_default=True,
    help="Training normals of the category's kNN memory bank.",
)
@click.option(
    "--size",
    default=900,
    type=click.IntRange(32, 8192),
    show_default=True,
    help="Side of the images (px): the maps are drawn at it.",
)
@fail_cleanly
def bench_maps(images, normals, size):
    """What an anomaly map costs per image (reading the tokens, each map kind, drawing the map) and what patch
    tokens add to the cache, on a synthetic cache of ViT-B/16's shape."""
    from raml.evaluate.bench import run_maps_bench

    for line in run_maps_bench(images=images, normals=normals, size=size).lines():
        click.echo(line)


@click.command()
@fail_cleanly
def status():
    """The workspace on one screen: datasets found, caches (images, backbone, size), runs
    (configuration, seed, when), results, and what to run next."""
    from raml.evaluate.workspace import status_lines

    click.echo("\n".join(status_lines()))
