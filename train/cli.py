"""Stage two's command ``train`` (and ``bench train``), and the options of a training run
(``train_options``: one per ``TrainConfig`` field) that ``sweep`` and ``ablate`` share.
"""
from __future__ import annotations

import click

from cache import UserError
from cache.cli import comma_list, device_option, fail_cleanly

stage_two_device_option = device_option(
    "Where stage two runs: auto (the GPU if there is one), cpu, cuda or cuda:N. The cached features go to the "
    "device once.")

threads_option = click.option(
    "--threads", default=1, show_default=True,
    help="Torch threads per training run. More pay only on an idle machine (on a busy one they stall "
         "each other); sweep --jobs fills the cores instead.")


def read_training_cache(cache_dir):
    from cache import read_cache
    table = read_cache(cache_dir)
    if table.meta.get("random_weights"):
        click.secho(f"warning: {cache_dir} holds features from random weights: every score is meaningless.",
                    fg="yellow", err=True)
    return table


def train_options(exclude=()):
    """One option per ``TrainConfig`` field; train/config.py holds every default."""
    from train.config import click_options
    return click_options(exclude)


@click.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Feature cache written by extract.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoint.pt, config.json, split.json, history.json.")
@click.option("--force", is_flag=True, help="Overwrite a run directory that already holds a checkpoint.")
@threads_option
@stage_two_device_option
@train_options()
@fail_cleanly
def train(cache_dir, out, force, threads, device, margin, **options):
    """Stage two: train the RAML head on cached features (holdout protocol; never loads CLIP).

    --margin picks the preset (adaptive: m = 0.5 + 0.3·σ + 0.3·(1 − r/r_max); fixed: 0.5;
    strong: 1.0); --margin-base/--lambda-sigma/--lambda-res override its values.
    """
    from pathlib import Path

    from train.checkpoint import CHECKPOINT_FILE
    from train.config import make_config
    from train.fit import fit, write_run
    from train.thresholds import threshold_lines
    config = make_config(margin, **options)
    if (Path(out) / CHECKPOINT_FILE).exists() and not force:
        raise UserError(f"{out} already holds a trained run; choose another --out or pass --force")
    table = read_training_cache(cache_dir)
    click.echo(f"train: {len(table)} images in {len(table.categories)} categories from {cache_dir}; "
               f"margin {config.margin} (m_base {config.margin_base}, λσ {config.lambda_sigma}, "
               f"λres {config.lambda_res}, r_max {config.r_max}), seed {config.seed}")
    trained = fit(table, config, progress=click.echo, threads=threads, device=device)
    click.echo(f"pixel head: {trained.pixel_head}")
    path = write_run(out, trained)
    click.echo("\n".join(threshold_lines(trained.thresholds)))
    click.echo(f"train: {len(trained.split.train)} training / {len(trained.split.heldout)} held-out images → {path}")


@click.command("train")
@click.option("--epochs", default=25, show_default=True)
@click.option("--sweep", "with_sweep", is_flag=True,
              help="Also time the 3 margins × --seeds sweep: batched (one pass) against one run at a time.")
@click.option("--seeds", default=5, show_default=True)
@click.option("--lrs", default=None, help="With --sweep: also vary the learning rate, e.g. 5e-5,1e-4,2e-4 (45 runs).")
@click.option("--jobs", default=2, show_default=True, help="Worker processes of the one-run-at-a-time sweep; the batched pass gets as many "
              "threads (× --threads).")
@click.option("--separate/--no-separate", default=True, show_default=True,
              help="With --sweep: also time the old one-run-at-a-time path (slow).")
@threads_option
@stage_two_device_option
@fail_cleanly
def bench_train(epochs, with_sweep, seeds, lrs, jobs, separate, threads, device):
    """Time stage two on a synthetic cache of MVTec AD's shape (5,354 images × 21 × 512)."""
    from train.bench import run_train_bench
    result = run_train_bench(epochs=epochs, sweep=with_sweep, seeds=seeds, lrs=comma_list(lrs, float) if lrs else None,
                             jobs=jobs, threads=threads, device=device, separate=separate)
    for line in result.lines():
        click.echo(line)
