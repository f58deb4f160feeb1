"""Stage two's command ``train`` (and ``bench train``), the options of a training run
(``train_options``: one per ``TrainConfig`` field) that ``sweep`` and ``ablate`` share, and the
options that pick a stage-two command's cache in the workspace (``training_cache_options``).
"""

from __future__ import annotations

import functools

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import JOBS, THREADS, device_option, echo_chosen, given_on_command_line, text_list, with_options
from raml.cli.tracking import tracking_options
from raml.errors import OptionError, UserError
from raml.train.config import Bounds, TrainConfig, field_kind

stage_two_device_option = device_option(
    "Where stage two runs: auto (the GPU if there is one), cpu, cuda or cuda:N. The cached features go to the "
    "device once."
)

threads_option = click.option(
    "--threads",
    type=THREADS,
    default=1,
    show_default=True,
    help="Torch threads per training run. More pay only on an idle machine (on a busy one they stall "
    "each other); sweep --jobs fills the cores instead.",
)


def read_training_cache(cache_dir):
    from raml.cache import read_cache

    table = read_cache(cache_dir)
    if table.meta.get("random_weights"):
        click.secho(
            f"warning: {cache_dir} holds features from random weights: every score is meaningless.",
            fg="yellow",
            err=True,
        )
    return table


def training_cache_options(func):
    """--dataset, --cache-dir, and the backbone options that pick the dataset's cache in the workspace
    when --cache-dir is not given (``choose_training_cache``). The command receives ``cache_dir`` only."""
    from raml.extract.cli import dataset_option, model_option
    from raml.extract.engines import ENGINES

    @functools.wraps(func)
    def with_cache_dir(*, dataset, cache_dir, model, pretrained, weights, random_weights, engine, **options):
        if cache_dir is None:
            cache_dir = choose_training_cache(dataset, model, pretrained, weights, random_weights, engine)
        else:  # the backbone options pick a cache: with one named, they would be silently ignored
            given = [
                name
                for name in ("model", "pretrained", "weights", "random_weights", "engine")
                if given_on_command_line(name)
            ]
            if given:
                flag = "--" + given[0].replace("_", "-")
                raise OptionError(
                    flag,
                    "picks the dataset's cache when --cache-dir is not given; with --cache-dir "
                    f"{cache_dir} it would be ignored: leave one of them out",
                )
        return func(cache_dir=cache_dir, **options)

    which = "With --dataset: read the cache extracted with this"
    return with_options(
        [
            dataset_option("Dataset whose cache in ./features/<dataset>/ to read when --cache-dir is not given."),
            click.option(
                "--cache-dir",
                type=click.Path(file_okay=False, exists=True),
                default=None,
                help="Feature cache written by extract. Default: the dataset's cache under ./features/<dataset>/: "
                "its only one, or the one of the backbone that --model, --pretrained, --weights, "
                "--random-weights and --engine name (on the command line or in raml.toml).",
            ),
            model_option(default=None, help=f"{which} model (name or config JSON)."),
            click.option("--pretrained", default=None, help=f"{which} pretrained tag."),
            click.option("--weights", type=click.Path(dir_okay=False), default=None, help=f"{which} weights file."),
            click.option("--random-weights", is_flag=True, default=None, help=f"{which} backbone's random weights."),
            click.option(
                "--engine",
                type=click.Choice(ENGINES),
                default=None,
                help=f"{which} engine's precision (onnx-int8: int8 features; torch and onnx: fp32).",
            ),
        ]
    )(fail_cleanly(with_cache_dir))


def choose_training_cache(dataset, model, pretrained, weights, random_weights, engine):
    """The workspace's cache of ``dataset``: the one of the backbone the options name when any is
    given, else the dataset's only cache. None, or several without a backbone named, is an error
    that lists what there is and how to choose."""
    from raml.cli.workspace import FEATURES, cache_dir_for, caches_of, describe_cache
    from raml.extract.engines import PRECISIONS
    from raml.extract.identity import backbone_identity
    from raml.extract.model_config import DEFAULT_MODEL, DEFAULT_PRETRAINED

    caches = caches_of(dataset)
    listed = "".join(f"\n  {path}   {describe_cache(path)}" for path in caches)
    if model is not None or pretrained is not None or weights is not None or random_weights or engine is not None:
        identity = backbone_identity(
            model or DEFAULT_MODEL,
            DEFAULT_PRETRAINED if pretrained is None else pretrained,
            weights,
            bool(random_weights),
            PRECISIONS[engine or "torch"],
        )
        path = cache_dir_for(dataset, identity.fingerprint_fields())
        if path in caches:
            return echo_chosen("cache", path)
        raise UserError(
            f"no {dataset} cache of the backbone named ({identity.name}, weights {identity.weights}, "
            f"{identity.precision}) at {path}; extract it with raml extract --dataset "
            f"{dataset} and the same backbone options, or pass --cache-dir."
            + (f" The caches of {dataset}:{listed}" if caches else "")
        )
    if len(caches) == 1:
        return echo_chosen("cache", caches[0])
    if not caches:
        raise UserError(
            f"no cache of {dataset} under {FEATURES / dataset}/: run raml extract "
            f"--dataset {dataset} first, or pass --cache-dir"
        )
    raise UserError(
        f"{len(caches)} caches of {dataset} fit:{listed}\nPick one with --cache-dir PATH, or name its "
        "backbone with --model, --pretrained, --weights, --random-weights or --engine (on the command "
        "line or in raml.toml)."
    )


def number_type(kind: str, bounds: Bounds | None, check=None, accepted: str = ""):
    """The click type of a field of kind ``kind`` within ``bounds`` (a text field: passing ``check``):
    click's ranges, finite numbers only, so that a bad value is a usage error naming the option,
    before any work."""
    from raml.cli.options import CheckedText, FiniteFloat

    if kind == "str":
        return CheckedText(check, accepted) if check else click.STRING
    bounds = bounds or Bounds()
    if kind == "int":
        return click.IntRange(bounds.low, bounds.high, min_open=bounds.low_open, max_open=bounds.high_open)
    return FiniteFloat(bounds.low, bounds.high, min_open=bounds.low_open, max_open=bounds.high_open)


def train_options(exclude=()):
    """A decorator adding ``--<field-name>`` for every ``TrainConfig`` field not in ``exclude``:
    train/config.py holds every default; the margin parameters default to None ("the preset's").
    """
    import dataclasses

    from raml.cli.options import ON_OFF

    def decorate(func):
        for spec in reversed(dataclasses.fields(TrainConfig)):
            if spec.name in exclude:
                continue
            flag = "--" + spec.name.replace("_", "-")
            meta = spec.metadata
            if "choices" in meta:
                option = click.option(
                    flag, type=click.Choice(meta["choices"]), default=spec.default, show_default=True, help=meta["help"]
                )
            elif field_kind(spec) == "bool":
                option = click.option(
                    flag,
                    type=ON_OFF,
                    metavar="on|off",
                    default=spec.default,
                    show_default="on" if spec.default else "off",
                    help=meta["help"],
                )
            else:
                option = click.option(
                    flag,
                    type=number_type(field_kind(spec), meta.get("bounds"), meta.get("check"), meta.get("accepted", "")),
                    default=spec.default,
                    show_default=spec.default is not None,
                    help=meta["help"],
                )
            func = option(func)
        return func

    return decorate


@click.command()
@training_cache_options
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Run directory: checkpoint.pt, config.json, split.json, history.json. Default: a new "
    "./runs/<dataset>/NNN-<margin>-seed<k>/ (never an earlier run's), linked as runs/<dataset>/latest.",
)
@click.option("--force", is_flag=True, help="Overwrite a run directory that already holds a checkpoint.")
@threads_option
@stage_two_device_option
@train_options()
@tracking_options
@fail_cleanly
def train(cache_dir, out, force, threads, device, margin, tracking, **options):
    """Stage two: train the RAML head on cached features (holdout protocol; never loads CLIP).

    --margin picks the preset (adaptive: m = 0.5 + 0.3·σ + 0.3·(1 − r/r_max); fixed: 0.5;
    strong: 1.0); --margin-base/--lambda-sigma/--lambda-res override its values.
    """
    import shutil
    from pathlib import Path

    from raml.cli.progress import Progress
    from raml.cli.workspace import claim_run_dir, dataset_of, point_latest
    from raml.train.checkpoint import CHECKPOINT_FILE
    from raml.train.config import make_config
    from raml.train.fit import fit, write_run
    from raml.train.thresholds import threshold_lines

    config = make_config(margin, **options)
    if out is not None and (Path(out) / CHECKPOINT_FILE).exists() and not force:
        raise UserError(f"{out} already holds a trained run; choose another --out or pass --force")
    table = read_training_cache(cache_dir)
    click.echo(
        f"train: {len(table)} images in {len(table.categories)} categories from {cache_dir}; "
        f"margin {config.margin} (m_base {config.margin_base}, λσ {config.lambda_sigma}, "
        f"λres {config.lambda_res}, r_max {config.r_max}), seed {config.seed}"
    )
    with Progress() as steps:
        steps.begin("train", config.epochs, "epochs")
        trained = fit(
            table, config, progress=steps.echo, threads=threads, device=device, on_epoch=lambda _: steps.advance()
        )
    click.echo(f"pixel head: {trained.pixel_head}")
    # The run's directory is claimed once training succeeded, and removed again if it cannot be
    # written in full (a full disk): a failed run leaves nothing behind.
    created = out is None or not Path(out).exists()
    run_dir = out or claim_run_dir(dataset_of(cache_dir), f"{config.margin}-seed{config.seed}")
    try:
        path = write_run(run_dir, trained)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    click.echo("\n".join(threshold_lines(trained.thresholds)))
    click.echo(f"train: {len(trained.split.train)} training / {len(trained.split.heldout)} held-out images → {path}")
    if out is None:
        click.echo(f"run: {run_dir}  ({point_latest(run_dir)} → {run_dir.name})")
    if tracking:
        tracking.send([run_dir], fingerprint=trained.fingerprint)


@click.command("train")
@click.option("--epochs", type=click.IntRange(1, 100_000), default=25, show_default=True)
@click.option(
    "--sweep",
    "with_sweep",
    is_flag=True,
    help="Also time the 3 margins × --seeds sweep as one batched pass and an ablation pass (original-loss × "
    "--seeds) against their floors, and the sweep one run at a time.",
)
@click.option("--seeds", type=click.IntRange(1, 1000), default=5, show_default=True, help="Seeds of each margin.")
@click.option(
    "--lrs",
    default=None,
    callback=text_list(float, check=lambda lr: 0 < lr < float("inf"), accepted="comma-separated learning rates > 0"),
    help="With --sweep: also vary the learning rate, e.g. 5e-5,1e-4,2e-4 (45 runs).",
)
@click.option(
    "--jobs",
    type=JOBS,
    default=2,
    show_default=True,
    help="Worker processes of the one-run-at-a-time sweep; the batched pass gets as many threads (× --threads).",
)
@click.option(
    "--separate/--no-separate",
    default=True,
    show_default=True,
    help="With --sweep: also time the old one-run-at-a-time path (slow).",
)
@click.option(
    "--compile/--no-compile",
    default=False,
    show_default=True,
    help="Compile the training step (torch.compile; CUDA graphs on a GPU); the first epoch pays for compiling.",
)
@threads_option
@stage_two_device_option
@fail_cleanly
def bench_train(epochs, with_sweep, seeds, lrs, jobs, separate, compile, threads, device):
    """Time stage two's training step against its arithmetic floor (its matrix products' FLOPs at the
    machine's fp32 GEMM rate) on a synthetic cache of MVTec AD's shape (5,354 images × 21 × 512)."""
    from raml.train.bench import run_train_bench

    result = run_train_bench(
        epochs=epochs,
        sweep=with_sweep,
        seeds=seeds,
        lrs=lrs,
        jobs=jobs,
        threads=threads,
        device=device,
        separate=separate,
        compile=compile,
    )
    for line in result.lines():
        click.echo(line)
