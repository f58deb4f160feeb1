"""The evaluation commands: ``evaluate``, ``report``, the studies that train and then evaluate
(``sweep``, ``ablate``), ``demo``, and ``status`` (the workspace at a glance). Baselines are
evaluate/baselines/cli.py's, the commands that score new images evaluate/deploy/cli.py's.
"""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from raml.cli.failures import fail_cleanly
from raml.cli.options import (
    JOBS,
    SCORE_WEIGHT,
    SEED,
    FiniteFloat,
    echo_chosen,
    non_empty,
    seed_list,
    text_list,
    with_options,
)
from raml.cli.workspace import REPORT_DIR, RESULTS, SWEEP_PREFIX, dataset_of, results_dir
from raml.errors import OptionError, UserError
from raml.evaluate.workspace import newest_run_dir, run_label, scoring_cache, sweep_dir
from raml.extract.cli import dataset_option, model_option, refusing_contradictory_weights
from raml.extract.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED, WINCLIP_MODEL, WINCLIP_PRETRAINED
from raml.train.cli import (
    read_training_cache,
    stage_two_device_option,
    threads_option,
    train_options,
    training_cache_options,
)


def margin_list(ctx, param, text):
    from raml.train.config import MARGIN_PRESETS

    return text_list(
        choices=MARGIN_PRESETS, accepted=f"comma-separated margin presets among {', '.join(MARGIN_PRESETS)}"
    )(ctx, param, text)


def vary_axes(ctx, param, specs):
    """--vary FIELD=V1,V2 (repeated), checked before any work: the grid's axes (``train.config.parse_vary``)."""
    from raml.train.config import TrainConfig, parse_vary

    try:
        axes = parse_vary(specs)
        for field_name, values in axes.items():
            for value in values:
                TrainConfig(**{field_name: value})
    except UserError as err:
        raise click.BadParameter(str(err).removeprefix("invalid training configuration: ")) from None
    return axes


def _names(text, module: str, table: str):
    """A comma-separated subset of ``evaluate.<module>.<table>`` (``none``: the empty subset)."""
    import importlib

    names = tuple(
        getattr(
            importlib.import_module(
                f"evaluate.{module}" if module != "baselines" else "raml.evaluate.baselines.features"
            ),
            table,
        )
    )
    if text is not None and text.strip() == "none" and module == "baselines":
        return []
    return text_list(choices=names, accepted=f"comma-separated names among {', '.join(names)}")(None, None, text)


bootstrap_options = [
    click.option(
        "--bootstrap",
        "n_resamples",
        type=click.IntRange(1, 1_000_000),
        default=1000,
        show_default=True,
        help="Bootstrap resamples for the AUROC 95 % CI.",
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
        log=click.echo,
        device=device,
    )
    echo_entries(path, entries)


@click.command()
@click.argument("results", nargs=-1, type=click.Path(exists=True))
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for report.md and the plots. Default: ./results/report/.",
)
@fail_cleanly
def report(results, out):
    """Compare results files side by side: Markdown tables and PNG plots.

    RESULTS are results.json files or directories searched for them (default: ./results/). Rows are
    grouped by protocol and dataset; rows scored on different image lists are never put in one
    table (refused).
    """
    from raml.evaluate.report import write_report

    results = results or (echo_chosen("results", RESULTS),)
    out = out or echo_chosen("report", REPORT_DIR)
    path = write_report(results, out)
    click.echo(f"report → {path}")


@click.command()
@training_cache_options
@click.option(
    "--margins",
    default="adaptive,fixed,strong",
    show_default=True,
    callback=margin_list,
    help="Margin presets to compare.",
)
@click.option(
    "--seeds", default="0,1,2,3,4", show_default=True, callback=seed_list, help="Training seeds (one run each)."
)
@click.option(
    "--vary",
    multiple=True,
    metavar="FIELD=V1,V2",
    callback=vary_axes,
    help="Another grid axis, e.g. --vary lr=1e-4,5e-5 or --vary loss_variant=raml,original; repeat for "
    "more. Configurations are every margin × every combination.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Sweep directory: <configuration>-seed<k>/ per run, results/, summary.json, summary.md. Default: "
    "a new ./runs/<dataset>/NNN-sweep-<margins>/, or the newest such sweep if it did not finish "
    "(it resumes).",
)
@click.option(
    "--jobs",
    type=JOBS,
    default=1,
    show_default=True,
    help="Passes trained in parallel worker processes (runs that share their shapes train as one pass).",
)
@threads_option
@stage_two_device_option
@train_options(exclude=("seed", "margin", "margin_base", "lambda_sigma", "lambda_res"))
@fail_cleanly
def sweep(cache_dir, margins, seeds, vary, out, jobs, threads, device, **options):
    """Train every (configuration × seed) on one cache and tabulate held-out image AUROC (mean ± std).

    Runs that differ only in per-run scalars (seed, margin, loss weights, temperature, lr, weight decay,
    ...) are trained together as one batched pass. Re-running resumes: finished runs are not retrained.
    All runs share --split-seed, so every number in the table is measured on the same held-out images.
    """
    from raml.evaluate.sweep import run_sweep
    from raml.train.sweep import grid_configurations

    configurations = grid_configurations(margins, axes := vary, **options)
    table = read_training_cache(cache_dir)
    in_workspace = out is None
    if in_workspace:
        out = sweep_dir(dataset_of(cache_dir), SWEEP_PREFIX + "-".join([*margins, *axes]))
    summary = run_sweep(
        table, configurations, seeds, out, jobs=jobs, threads=threads, device=device, progress=click.echo
    )
    click.echo((Path(out) / "summary.md").read_text().rstrip())
    click.echo(
        f"sweep: {len(configurations) * len(seeds)} runs → {out}/summary.json, {out}/summary.md"
        + (" (random-weights features: meaningless)" if summary["random_weights"] else "")
    )
    if in_workspace:
        from raml.cli.workspace import point_latest

        click.echo(f"run: {out}  ({point_latest(out)} → {Path(out).name})")


@click.command()
@training_cache_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory: runs/ (the sweep), baselines/, ablation.md, ablation.json, ablation.png. Default: "
    "./results/<dataset>/ablate/ (re-running resumes it).",
)
@click.option(
    "--seeds", default="0,1,2,3,4", show_default=True, callback=seed_list, help="Training seeds of every configuration."
)
@click.option(
    "--ablations",
    default=None,
    callback=lambda ctx, param, text: _names(text, "ablate", "ABLATIONS"),
    help="Comma-separated subset of the configurations (default: all; 'full' is always needed).",
)
@click.option(
    "--baselines",
    default=None,
    callback=lambda ctx, param, text: _names(text, "baselines", "BASELINES"),
    help="Comma-separated subset of linear,knn-tiles,knn-patches,zero-shot-text (default: all; 'none' for none).",
)
@click.option(
    "--jobs", type=JOBS, default=1, show_default=True, help="Training passes run in parallel worker processes."
)
@threads_option
@stage_two_device_option
@with_options(bootstrap_options)
@train_options(
    exclude=(
        "seed",
        "margin",
        "margin_base",
        "lambda_sigma",
        "lambda_res",
        "scales",
        "cross_attention",
        "text_fusion",
        "tile_pool",
        "loss",
        "loss_variant",
        "visual_weight",
        "text_weight",
    )
)
@fail_cleanly
def ablate(cache_dir, out, seeds, ablations, baselines, jobs, threads, device, n_resamples, bootstrap_seed, **options):
    """Train the method, each ablation of it and each baseline on one cache; one table.

    Configurations: full (the method), scales-1, scales-1,2, no-cross-attention, no-text-fusion,
    tile-pool-mean, visual-score-only (full's runs rescored with s_visual alone, not retrained),
    map-fused (full's runs rescored with their anomaly map's maximum in the image score), bce-only,
    original-loss; baselines: linear, knn-tiles, knn-patches, zero-shot-text, all scored on the same
    held-out images (map-fused and knn-patches need a cache with patch tokens). Rows sorted by
    held-out AUROC, each with its difference from full and a paired bootstrap CI. Re-running resumes
    finished runs.
    """
    from raml.evaluate.ablate import ABLATIONS, run_ablation
    from raml.evaluate.baselines.features import BASELINES

    chosen_baselines = tuple(BASELINES if baselines is None else baselines)
    table = read_training_cache(cache_dir)
    out = out or echo_chosen("results", results_dir(dataset_of(cache_dir), "ablate"))
    ablation = run_ablation(
        table,
        out,
        seeds,
        ablations=tuple(ablations or ABLATIONS),
        baselines=chosen_baselines,
        jobs=jobs,
        threads=threads,
        device=device,
        n_resamples=n_resamples,
        bootstrap_seed=bootstrap_seed,
        progress=click.echo,
        **options,
    )
    click.echo((Path(out) / "ablation.md").read_text().rstrip())
    click.echo(f"ablate: {len(ablation['rows'])} rows → {out}/ablation.md, ablation.json, ablation.png")


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
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True)
@click.option(
    "--limit",
    default=None,
    type=click.IntRange(10, 2000),
    help="Textile images to use (default 146: the fewest with 15 normal and 15 anomalous held out).",
)
@click.option(
    "--epochs",
    default=None,
    type=click.IntRange(1, 100_000),
    help="Training epochs per run (default 25, the original's).",
)
@click.option("--seeds", default="0,1,2", show_default=True, callback=seed_list, help="Training seeds of each margin.")
@model_option(default=DEFAULT_MODEL, show_default=True, help="RAML's CLIP.")
@click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True)
@model_option("--winclip-model", default=WINCLIP_MODEL, show_default=True, help="WinCLIP's CLIP (the paper's).")
@click.option("--winclip-pretrained", default=WINCLIP_PRETRAINED, show_default=True)
@click.option("--online", is_flag=True, help="Allow downloading the CLIP weights (default: local cache only).")
@click.option("--random-weights", is_flag=True, help="Skip looking for weights; run with random ones (not meaningful).")
@refusing_contradictory_weights
@fail_cleanly
def demo(out, limit, epochs, seeds, model, pretrained, winclip_model, winclip_pretrained, online, random_weights):
    """README command one: RAML (3 margins × 3 seeds, via sweep) against zero-shot WinCLIP on the same held-out
    textile images: extract → sweep → evaluate → baseline winclip → report."""
    from raml.evaluate.demo import DEFAULT_EPOCHS, DEFAULT_LIMIT, run_demo
    from raml.extract.identity import backbone_identity

    context = click.get_current_context()
    for flags, (name, tag) in (
        (("--model", "--pretrained"), (model, pretrained)),
        (("--winclip-model", "--winclip-pretrained"), (winclip_model, winclip_pretrained)),
    ):
        if context.get_parameter_source(flags[1].lstrip("-").replace("-", "_")) is ParameterSource.DEFAULT:
            continue  # the default tag is ViT-B/16's: another --model without it falls back openly
        try:  # a tag open_clip does not know is the user's mistake, not missing weights
            backbone_identity(name, tag, random_weights=random_weights)
        except OptionError as err:
            raise OptionError(
                dict(zip(("--model", "--pretrained"), flags)).get(err.option, err.option), err.reason
            ) from None
    root = context.find_root().command  # the whole command line: the demo runs its commands
    run_demo(
        lambda args: root.main(list(args), standalone_mode=False),
        out,
        model=model,
        pretrained=pretrained,
        winclip_model=winclip_model,
        winclip_pretrained=winclip_pretrained,
        limit=limit or DEFAULT_LIMIT,
        epochs=epochs or DEFAULT_EPOCHS,
        seeds=seeds,
        online=online,
        random_weights=random_weights,
        log=click.echo,
    )


@click.command()
@fail_cleanly
def status():
    """The workspace on one screen: datasets found, caches (images, backbone, size), runs
    (configuration, seed, when), results, and what to run next."""
    from raml.evaluate.workspace import status_lines

    click.echo("\n".join(status_lines()))
