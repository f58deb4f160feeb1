"""The studies that train many runs and then evaluate them: ``sweep`` (every configuration × seed
on one cache), ``ablate`` (the method against its ablations and the baselines) and ``demo`` (the
whole pipeline end to end on the textile images)."""

from __future__ import annotations

from pathlib import Path

import click
from click.core import ParameterSource

from raml.cli.failures import fail_cleanly
from raml.cli.options import JOBS, echo_chosen, seed_list, text_list, with_options
from raml.cli.progress import Progress
from raml.cli.tracking import tracking_options
from raml.cli.workspace import SWEEP_PREFIX, dataset_of, results_dir
from raml.errors import OptionError, UserError
from raml.evaluate.cli import bootstrap_options
from raml.evaluate.workspace import sweep_dir
from raml.extract.cli import model_option, refusing_contradictory_weights
from raml.extract.model_config import DEFAULT_MODEL, DEFAULT_PRETRAINED, WINCLIP_MODEL, WINCLIP_PRETRAINED
from raml.train.cli import (
    read_training_cache,
    stage_two_device_option,
    threads_option,
    train_options,
    training_cache_options,
)
from raml.train.config import MARGIN_PRESETS


def margin_list(ctx, param, text):
    return text_list(
        choices=MARGIN_PRESETS, accepted=f"comma-separated margin presets among {', '.join(MARGIN_PRESETS)}"
    )(ctx, param, text)


def vary_axes(ctx, param, specs):
    """--vary FIELD=V1,V2 (repeated), checked before any work: the grid's axes (``train.grid.parse_vary``)."""
    from raml.train.config import TrainConfig
    from raml.train.grid import parse_vary

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
                f"raml.evaluate.{module}" if module != "baselines" else "raml.evaluate.baselines.features"
            ),
            table,
        )
    )
    if text is not None and text.strip() == "none" and module == "baselines":
        return []
    return text_list(choices=names, accepted=f"comma-separated names among {', '.join(names)}")(None, None, text)


@click.command()
@training_cache_options
@click.option(
    "--margins",
    default=",".join(MARGIN_PRESETS),
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
@tracking_options
@fail_cleanly
def sweep(cache_dir, margins, seeds, vary, out, jobs, threads, device, tracking, **options):
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
    with Progress() as steps:
        summary = run_sweep(
            table,
            configurations,
            seeds,
            out,
            jobs=jobs,
            threads=threads,
            device=device,
            progress=steps.echo,
            steps=steps,
        )
    click.echo((Path(out) / "summary.md").read_text().rstrip())
    click.echo(
        f"sweep: {len(configurations) * len(seeds)} runs → {out}/summary.json, {out}/summary.md"
        + (" (random-weights features: meaningless)" if summary["random_weights"] else "")
    )
    if in_workspace:
        from raml.cli.workspace import point_latest

        click.echo(f"run: {out}  ({point_latest(out)} → {Path(out).name})")
    if tracking:
        tracking.send([out])


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
@tracking_options
@fail_cleanly
def ablate(
    cache_dir, out, seeds, ablations, baselines, jobs, threads, device, n_resamples, bootstrap_seed, tracking, **options
):
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
    with Progress() as steps:
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
            progress=steps.echo,
            steps=steps,
            **options,
        )
    click.echo((Path(out) / "ablation.md").read_text().rstrip())
    click.echo(f"ablate: {len(ablation['rows'])} rows → {out}/ablation.md, ablation.json, ablation.png")
    if tracking:
        tracking.send([out])


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
