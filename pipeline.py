"""RAML command line: ``python pipeline.py COMMAND --help`` for each command.

Stage one:  extract                       images → HDF5 feature shards (runs CLIP once per image)
Stage two:  train, sweep                  cached features → RAML head
            evaluate, report, baseline, predict, export, demo
Tools:      info, bench extract, bench predict, bench train
"""
from __future__ import annotations

import os
import sys

import click

from cache.errors import UserError

# open_clip retries a failing download for ~45 s; RAML_OFFLINE=1 (or HF_HUB_OFFLINE=1) fails at once.
if os.environ.get("RAML_OFFLINE") == "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _show_progress() -> bool:
    """Progress bars on a terminal (or with RAML_PROGRESS=1), not in logs and pipes."""
    return sys.stderr.isatty() or os.environ.get("RAML_PROGRESS") == "1"


def _fail_cleanly(func):
    """Show the errors a user can fix (``UserError``: bad data, missing weights, wrong cache or
    option; and missing files) as one ``Error:`` line. Anything else is a bug: its traceback stays."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """RAML: industrial anomaly detection with a 21-crop CLIP pyramid and a small trained head."""


def _with(options):
    """Apply a list of click options to a command, in the order listed."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def backbone_options(func):
    """Options naming the CLIP backbone; shared by every command that runs the image encoder."""
    from extract.identity import DEFAULT_MODEL, DEFAULT_PRETRAINED  # not extract.encoder: no torch import here
    return _with([
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="open_clip model name, or path to an open_clip model-config JSON."),
        click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True,
                     help="open_clip pretrained tag (downloaded once into the user's cache)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local checkpoint file, for offline machines (overrides --pretrained)."),
        click.option("--random-weights", is_flag=True,
                     help="Seeded random weights: exercises the pipeline; results are meaningless."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto."),
    ])(func)


def checkpoint_backbone_options(func):
    """The backbone options of commands that score with a checkpoint (predict, export): each
    defaults to the checkpoint's own backbone; one given explicitly must agree with it."""
    return _with([
        click.option("--model", default=None, help="open_clip model name or model-config JSON (default: the "
                                                   "checkpoint's)."),
        click.option("--pretrained", default=None, help="open_clip pretrained tag (default: the checkpoint's)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local weights file (default: the one the checkpoint's cache was extracted with, at its "
                          "recorded path; its sha256 must be the checkpoint's)."),
        # default None, not False: "not given" (take the checkpoint's) differs from "given"
        click.option("--random-weights", is_flag=True, default=None,
                     help="Seeded random weights (default: when the checkpoint was trained on them)."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto."),
    ])(func)


def backbone_source(model, weights, random_weights) -> dict:
    """What ``extract`` records about where its backbone came from, so that ``predict`` and
    ``export`` can load it again from a checkpoint (``evaluate.predict.backbone_options_for``)."""
    from pathlib import Path
    model_path = Path(model)
    return {"model": str(model_path.resolve()) if model_path.suffix == ".json" else model,
            "weights_file": str(Path(weights).resolve()) if weights and not random_weights else None}


def load_backbone_from(model, pretrained, weights, random_weights, device):
    from extract.encoder import load_backbone
    if random_weights:
        click.secho("warning: --random-weights: CLIP is randomly initialised; every number this produces "
                    "is meaningless.", fg="yellow", err=True)
    return load_backbone(model, pretrained, weights, random_weights, device)


def fidelity_sample_option(when):
    """--fidelity-sample: how many of the user's images the int8 fidelity check encodes both ways."""
    from extract.engines import FIDELITY_SAMPLE
    return click.option("--fidelity-sample", default=FIDELITY_SAMPLE, show_default=True, type=click.IntRange(1),
                        help=f"With {when}: images of your own that the check encodes with fp32 and int8.")


def engine_option(func):
    """--engine: which runtime encodes the crops."""
    from extract.engines import ENGINES
    return click.option(
        "--engine", type=click.Choice(ENGINES), default="torch", show_default=True,
        help="Runtime of the CLIP image encoder: torch (eager); onnx (ONNX Runtime fp32, faster on CPUs; exported "
             "once into $RAML_CACHE_DIR/onnx or ~/.cache/raml/onnx and checked against torch); onnx-int8 (that "
             "export quantised to int8, CPU only, fastest there; checked against fp32 on your own images on first "
             "use, and refused below its limits).")(func)


def engine_options(func):
    """--engine, and the size of the int8 engine's fidelity check."""
    return _with([engine_option, fidelity_sample_option("--engine onnx-int8")])(func)


def load_engine_backbone(model, pretrained, weights, random_weights, device, engine):
    """``load_backbone_from``, with the image encoder run by ``engine`` (``extract.engines.ENGINES``)."""
    from extract.onnx_engine import engine_backbone
    return engine_backbone(load_backbone_from(model, pretrained, weights, random_weights, device), engine)


@cli.command()
@click.option("--dataset", type=click.Choice(["mvtec", "visa", "folder", "textile"]), required=True)
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Dataset root (not needed for textile, which ships with conformal-clip-data).")
@click.option("--cache-dir", type=click.Path(file_okay=False), required=True, help="Where the shards go.")
@backbone_options
@click.option("--categories", default=None, help="Comma-separated subset, e.g. bottle,screw.")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass (×21 crops).")
@click.option("--workers", type=int, default=None,
              help="Image-decoding processes (0: decode in the main process). Default: one per usable core.")
@click.option("--limit", type=int, default=None, help="At most N images per category (a quick look).")
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images and list them, instead of stopping.")
@click.option("--retry-skipped", is_flag=True, help="Try again the images an earlier --skip-bad run skipped.")
@click.option("--shard", default=None, help="i/n: this process takes every n-th image from i (default: "
                                            "torchrun's RANK/WORLD_SIZE, else 0/1).")
@click.option("--shard-size", default=256, show_default=True, help="Images per HDF5 shard.")
@engine_options
@_fail_cleanly
def extract(dataset, root, cache_dir, model, pretrained, weights, random_weights, device, categories,
            batch_size, workers, limit, skip_bad, retry_skipped, shard, shard_size, engine, fidelity_sample):
    """Stage one: encode each image's 21 crops with CLIP, once, into HDF5 shards.

    Re-running resumes: images already in the cache are skipped. A cache holds features of one
    precision: fp32 (--engine torch or onnx) or int8 (--engine onnx-int8).
    """
    from extract.engines import PRECISIONS, check_cache_precision, usable_cores
    from extract.identity import backbone_identity
    from extract.run import extract_features
    categories = categories.split(",") if categories else None
    check_cache_precision(cache_dir, PRECISIONS[engine])  # before any model is loaded

    def load_checked_backbone():
        backbone = load_engine_backbone(model, pretrained, weights, random_weights, device, engine)
        if backbone.engine == "onnx-int8":
            from extract.int8_engine import check_on_dataset
            check_on_dataset(backbone, cache_dir, dataset, root, categories, sample=fidelity_sample)
        return backbone

    summary = extract_features(
        dataset, root, cache_dir, load_checked_backbone,
        identity=backbone_identity(model, pretrained, weights, random_weights, PRECISIONS[engine]),
        categories=categories, batch_size=batch_size, workers=usable_cores() if workers is None else workers,
        limit=limit, skip_bad=skip_bad, shard=shard, shard_size=shard_size, retry_skipped=retry_skipped,
        progress=_show_progress(), backbone_source=backbone_source(model, weights, random_weights))
    click.echo(summary.line())
    for path in summary.stale_partials:
        click.echo(f"  removed {path.name}: a partial shard left by a killed run")
    for path, reason in summary.skipped:
        click.echo(f"  skipped {path}: {reason}")


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@_fail_cleanly
def info(cache_dir):
    """Summarise a feature cache: backbone, images per category and label, skipped files, partial
    shards (being written, or left by a killed run)."""
    from cache import read_cache
    from cache.lock import partial_shard_status
    table = read_cache(cache_dir, with_features=False)
    meta = table.meta
    config = (meta.get("model_config") or "config not recorded")[:19]   # "sha256:" and 12 hex digits
    click.echo(f"{cache_dir}: {len(table)} images, backbone {meta['backbone']} ({config}; {meta['weights']}), "
               f"input {meta['input_size']} px, D={meta['embed_dim']}, engines {', '.join(table.engines) or '-'}")
    if meta["random_weights"]:
        click.secho("  random weights: features are meaningless", fg="yellow")
    for category in table.categories:
        labels = table.label[table.category == category]
        click.echo(f"  {category:<14} {int((labels == 0).sum()):>6} normal {int((labels == 1).sum()):>6} anomalous")
    for path, reason in table.skipped:
        click.echo(f"  skipped {path}: {reason}")
    for path, holder in partial_shard_status(cache_dir):
        click.echo(f"  partial {path.name}: " + (f"being written by {holder}" if holder else
                                                 "stale, left by a killed run; the next extract removes it"))


@cli.group()
def bench():
    """Measure speed on this machine (not tests: figures go to notes and the README)."""


def _engine_list(ctx, param, text):
    from extract.onnx_engine import ENGINES
    engines = _comma_list(text)
    unknown = [engine for engine in engines if engine not in ENGINES]
    if unknown:
        raise click.BadParameter(f"{', '.join(unknown)}: not an engine (choose among {', '.join(ENGINES)})")
    return engines


compare_options = [
    click.option("--engines", default="torch,onnx,onnx-int8", show_default=True, callback=_engine_list,
                 help="Engines compared side by side, comma-separated (\"\" for none)."),
    click.option("--rounds", default=3, show_default=True, type=click.IntRange(1),
                 help="Rounds of the comparison; each times every engine once (interleaved); medians are shown."),
]


def _engine_backbones(backbone, engines):
    """One backbone per engine, sharing ``backbone``'s torch model, all on torch's thread count (the
    GEMM floor's), so that the engines are compared on the same cores."""
    import torch

    from extract.onnx_engine import engine_backbone
    return {engine: engine_backbone(backbone, engine, threads=torch.get_num_threads()) for engine in engines}


@bench.command("extract")
@backbone_options
@click.option("--images", default=8, show_default=True, help="Synthetic images of MVTec size to encode.")
@click.option("--size", default=900, show_default=True, help="Side of the synthetic images (px).")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass (x21 crops).")
@click.option("--workers", type=int, default=None, help="Image-decoding processes. Default: one per usable core.")
@click.option("--loader-only", is_flag=True,
              help="Only the loader and its ceiling (quick on a CPU, where ViT-B/16 takes ~2 s per image).")
@engine_option
@_with(compare_options)
@_fail_cleanly
def bench_extract(model, pretrained, weights, random_weights, device, images, size, batch_size, workers, loader_only,
                  engine, engines, rounds):
    """Where stage one's time goes: images/s of the whole stage, of the loader alone and of the bare
    encoder, their ratios, and the loader against its ceiling; then the encoder's seconds per image
    with each of --engines, against the machine's fp32 GEMM floor."""
    from extract.bench import run_extract_bench
    from extract.engine_bench import compare_encoders
    from extract.engines import usable_cores
    from extract.onnx_engine import engine_backbone
    torch_backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    result = run_extract_bench(engine_backbone(torch_backbone, engine), images=images, size=size, batch_size=batch_size,
                               workers=usable_cores() if workers is None else workers, loader_only=loader_only)
    for line in result.lines():
        click.echo(line)
    if engines and not loader_only:
        for line in compare_encoders(_engine_backbones(torch_backbone, engines), size=size, rounds=rounds).lines():
            click.echo(line)


@bench.command("predict")
@backbone_options
@click.option("--images", default=3, show_default=True,
              help="Per round: predict on 1 and on 1 + IMAGES synthetic images; per image = the difference / IMAGES.")
@click.option("--size", default=900, show_default=True, help="Side of the synthetic images (px).")
@click.option("--winclip/--no-winclip", default=True, show_default=True,
              help="Also time zero-shot WinCLIP (our baseline winclip, torch) per image on the same images.")
@_with(compare_options)
@_fail_cleanly
def bench_predict(model, pretrained, weights, random_weights, device, images, size, winclip, engines, rounds):
    """Seconds per image of a whole predict with each of --engines, against the machine's fp32 GEMM
    floor and against WinCLIP zero-shot. The head is untrained: speed only."""
    from evaluate.bench import compare_predict
    from evaluate.winclip import WINCLIP_MODEL, WINCLIP_PRETRAINED
    if not engines:
        raise UserError("--engines: name at least one engine to time")
    backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    winclip_backbone = (load_backbone_from(WINCLIP_MODEL, WINCLIP_PRETRAINED, None, random_weights, device)
                        if winclip else None)
    result = compare_predict(_engine_backbones(backbone, engines), images=images, size=size, rounds=rounds,
                             winclip_backbone=winclip_backbone)
    for line in result.lines():
        click.echo(line)


@bench.command("cache")
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Cache to read (default: a synthetic one of MVTec AD's shape, ViT-B/16-sized features).")
@_fail_cleanly
def bench_cache(cache_dir):
    """What verifying checksums and validating rows adds to reading a cache."""
    import tempfile
    from pathlib import Path

    from cache.bench import run_cache_read_bench
    from train.synthetic import write_synthetic_cache
    with tempfile.TemporaryDirectory(prefix="raml-bench-cache-") as work:
        source = Path(cache_dir) if cache_dir else write_synthetic_cache(Path(work) / "mvtec-shape")
        click.echo(run_cache_read_bench(source, Path(work)).line())


# --- stage two: train, sweep, bench train (issue 3) ---

def _read_training_cache(cache_dir):
    from cache import read_cache
    table = read_cache(cache_dir)
    if table.meta.get("random_weights"):
        click.secho(f"warning: {cache_dir} holds features from random weights: every score is meaningless.",
                    fg="yellow", err=True)
    return table


def _comma_list(text, kind=str):
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a comma-separated list") from None


bootstrap_options = [
    click.option("--bootstrap", "n_resamples", default=1000, show_default=True,
                 help="Bootstrap resamples for the AUROC 95 % CI."),
    click.option("--bootstrap-seed", default=0, show_default=True, help="Seed of the bootstrap resampling."),
]


_device_option = click.option(
    "--device", default="auto", show_default=True,
    help="Where stage two runs: auto (the GPU if there is one), cpu, cuda or cuda:N. The cached features go "
         "to the device once.")

_threads_option = click.option(
    "--threads", default=1, show_default=True,
    help="Torch threads per training run. More pay only on an idle machine (on a busy one they stall "
         "each other); sweep --jobs fills the cores instead.")


def _train_options(exclude=()):
    """One option per ``TrainConfig`` field; train/config.py holds every default."""
    from train.config import click_options
    return click_options(exclude)


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Feature cache written by extract.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Run directory: checkpoint.pt, config.json, split.json, history.json.")
@click.option("--force", is_flag=True, help="Overwrite a run directory that already holds a checkpoint.")
@_threads_option
@_device_option
@_train_options()
@_fail_cleanly
def train(cache_dir, out, force, threads, device, margin, **options):
    """Stage two: train the RAML head on cached features (holdout protocol; never loads CLIP).

    --margin picks the preset (adaptive: m = 0.5 + 0.3·σ + 0.3·(1 − r/r_max); fixed: 0.5;
    strong: 1.0); --margin-base/--lambda-sigma/--lambda-res override its values.
    """
    from pathlib import Path

    from train.checkpoint import CHECKPOINT_FILE
    from train.config import make_config
    from train.fit import fit, write_run
    from train.infer import threshold_lines
    config = make_config(margin, **options)
    if (Path(out) / CHECKPOINT_FILE).exists() and not force:
        raise UserError(f"{out} already holds a trained run; choose another --out or pass --force")
    table = _read_training_cache(cache_dir)
    click.echo(f"train: {len(table)} images in {len(table.categories)} categories from {cache_dir}; "
               f"margin {config.margin} (m_base {config.margin_base}, λσ {config.lambda_sigma}, "
               f"λres {config.lambda_res}, r_max {config.r_max}), seed {config.seed}")
    trained = fit(table, config, progress=click.echo, threads=threads, device=device)
    path = write_run(out, trained)
    click.echo("\n".join(threshold_lines(trained.thresholds)))
    click.echo(f"train: {len(trained.split.train)} training / {len(trained.split.heldout)} held-out images → {path}")


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--margins", default="adaptive,fixed,strong", show_default=True, help="Margin presets to compare.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Training seeds (one run each).")
@click.option("--vary", multiple=True, metavar="FIELD=V1,V2",
              help="Another grid axis, e.g. --vary lr=1e-4,5e-5 or --vary loss_variant=raml,original; repeat for "
                   "more. Configurations are every margin × every combination.")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Sweep directory: <configuration>-seed<k>/ per run, results/, summary.json, summary.md.")
@click.option("--jobs", default=1, show_default=True,
              help="Passes trained in parallel worker processes (runs that share their shapes train as one pass).")
@_threads_option
@_device_option
@_train_options(exclude=("seed", "margin", "margin_base", "lambda_sigma", "lambda_res"))
@_fail_cleanly
def sweep(cache_dir, margins, seeds, vary, out, jobs, threads, device, **options):
    """Train every (configuration × seed) on one cache and tabulate held-out image AUROC (mean ± std).

    Runs that differ only in per-run scalars (seed, margin, loss weights, temperature, lr, weight decay,
    ...) are trained together as one batched pass. Re-running resumes: finished runs are not retrained.
    All runs share --split-seed, so every number in the table is measured on the same held-out images.
    """
    from pathlib import Path

    from train.config import MARGIN_PRESETS, parse_vary
    from train.sweep import grid_configurations, run_sweep
    margins, seeds = _comma_list(margins), _comma_list(seeds, int)
    unknown = [m for m in margins if m not in MARGIN_PRESETS]
    if unknown or not margins or not seeds:
        raise UserError(f"--margins takes some of {', '.join(MARGIN_PRESETS)} (got {', '.join(unknown) or 'none'}); "
                        "--seeds at least one integer")
    configurations = grid_configurations(margins, parse_vary(vary), **options)
    table = _read_training_cache(cache_dir)
    summary = run_sweep(table, configurations, seeds, out, jobs=jobs, threads=threads, device=device,
                        progress=click.echo)
    click.echo((Path(out) / "summary.md").read_text().rstrip())
    click.echo(f"sweep: {len(configurations) * len(seeds)} runs → {out}/summary.json, {out}/summary.md"
               + (" (random-weights features: meaningless)" if summary["random_weights"] else ""))


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Directory: runs/ (the sweep), baselines/, ablation.md, ablation.json, ablation.png.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Training seeds of every configuration.")
@click.option("--ablations", default=None,
              help="Comma-separated subset of the configurations (default: all; 'full' is always needed).")
@click.option("--baselines", default=None, help="Comma-separated subset of linear,knn-tiles,zero-shot-text "
                                                "(default: all; 'none' for none).")
@click.option("--jobs", default=1, show_default=True, help="Training passes run in parallel worker processes.")
@_threads_option
@_device_option
@_with(bootstrap_options)
@_train_options(exclude=("seed", "margin", "margin_base", "lambda_sigma", "lambda_res", "scales", "cross_attention",
                         "text_fusion", "tile_pool", "loss", "loss_variant", "visual_weight", "text_weight"))
@_fail_cleanly
def ablate(cache_dir, out, seeds, ablations, baselines, jobs, threads, device, n_resamples, bootstrap_seed, **options):
    """Train the method, each ablation of it and each baseline on one cache; one table.

    Configurations: full (the method), scales-1, scales-1,2, no-cross-attention, no-text-fusion,
    tile-pool-mean, visual-score-only (full's runs rescored with s_visual alone, not retrained),
    bce-only, original-loss; baselines: linear, knn-tiles, zero-shot-text, all scored on the same
    held-out images. Rows sorted by held-out AUROC, each with its
    difference from full and a paired bootstrap CI. Re-running resumes finished runs.
    """
    from pathlib import Path

    from evaluate.ablate import ABLATIONS, run_ablation
    from evaluate.feature_baselines import BASELINES
    chosen_baselines = () if baselines == "none" else tuple(_comma_list(baselines) if baselines else BASELINES)
    unknown = [name for name in chosen_baselines if name not in BASELINES]
    if unknown:
        raise UserError(f"--baselines: unknown {', '.join(unknown)}; choose from {', '.join(BASELINES)} or none")
    table = _read_training_cache(cache_dir)
    ablation = run_ablation(table, out, _comma_list(seeds, int),
                            ablations=tuple(_comma_list(ablations)) if ablations else tuple(ABLATIONS),
                            baselines=chosen_baselines, jobs=jobs, threads=threads, device=device,
                            n_resamples=n_resamples, bootstrap_seed=bootstrap_seed, progress=click.echo, **options)
    click.echo((Path(out) / "ablation.md").read_text().rstrip())
    click.echo(f"ablate: {len(ablation['rows'])} rows → {out}/ablation.md, ablation.json, ablation.png")


@bench.command("train")
@click.option("--epochs", default=25, show_default=True)
@click.option("--sweep", "with_sweep", is_flag=True,
              help="Also time the 3 margins × --seeds sweep: batched (one pass) against one run at a time.")
@click.option("--seeds", default=5, show_default=True)
@click.option("--lrs", default=None, help="With --sweep: also vary the learning rate, e.g. 5e-5,1e-4,2e-4 (45 runs).")
@click.option("--jobs", default=2, show_default=True, help="Worker processes of the one-run-at-a-time sweep; the batched pass gets as many "
              "threads (× --threads).")
@click.option("--separate/--no-separate", default=True, show_default=True,
              help="With --sweep: also time the old one-run-at-a-time path (slow).")
@_threads_option
@_device_option
@_fail_cleanly
def bench_train(epochs, with_sweep, seeds, lrs, jobs, separate, threads, device):
    """Time stage two on a synthetic cache of MVTec AD's shape (5,354 images × 21 × 512)."""
    from train.bench import run_train_bench
    result = run_train_bench(epochs=epochs, sweep=with_sweep, seeds=seeds, lrs=_comma_list(lrs, float) if lrs else None,
                             jobs=jobs, threads=threads, device=device, separate=separate)
    for line in result.lines():
        click.echo(line)


# --- evaluation: evaluate, report, baseline, predict (issue 4) ---



def _echo_entries(path, entries) -> None:
    """A one-line summary per configuration, then where the files are."""
    for config, entry in entries.items():
        protocol = entry["protocol"]
        std = "" if entry["std_auroc"] is None else f" ± {entry['std_auroc']:.2f}"
        click.echo(f"  {config}: image AUROC {entry['mean_auroc']:.2f}{std} %, AP {entry['mean_average_precision']:.2f} %, "
                   f"F1-max {entry['mean_f1_max']:.2f} % — n = {entry['auroc_over_seeds']['n']} seed(s), {protocol['name']} protocol, "
                   f"{protocol['n_images']} images (hash {protocol['image_list_hash'][:12]}…)"
                   + (f", image score: {entry['image_score']}" if entry.get("image_score") else ""))
        for category, reason in entry["not_available"].items():
            click.echo(f"    {category}: n/a ({reason})")
    if any(entry.get("random_weights") for entry in entries.values()):
        click.secho("  RANDOM WEIGHTS: these numbers are NOT MEANINGFUL (the pipeline ran; nothing was measured).",
                    fg="yellow")
    maps = ", anomaly_maps.npz" if any("anomaly_maps" in entry for entry in entries.values()) else ""
    click.echo(f"→ {path} (+ scores.csv{maps})")


@cli.command()
@click.option("--checkpoint", "checkpoints", multiple=True, required=True,
              help="A run directory (or its checkpoint.pt), or a sweep directory of runs; repeat for several. "
                   "Runs named <config>-seed<k> are seeds of one configuration (mean ± std).")
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="Feature cache to score: the training cache (holdout) or another dataset's (transfer).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for the results files.")
@click.option("--protocol", type=click.Choice(["holdout", "transfer", "official"]), default=None,
              help="Default: holdout on the cache the model was trained on, transfer on any other.")
@click.option("--visual-weight", type=float, default=None, help="Weight of s_visual (default: the checkpoint's).")
@click.option("--text-weight", type=float, default=None, help="Weight of s_text (default: the checkpoint's).")
@click.option("--name", default=None, help="Name of the configuration in the results (default: the run directory's).")
@_with(bootstrap_options)
@_device_option
@_fail_cleanly
def evaluate(checkpoints, cache_dir, out, protocol, visual_weight, text_weight, name, n_resamples, bootstrap_seed,
             device):
    """Score trained checkpoints on a cache: metrics per category, per-image scores, coarse maps.

    Writes OUT/results.json (the original release's schema plus AP, F1-max, CI, seeds, protocol and
    image-list hash), OUT/scores.csv (visual, text and final score of every image and run) and
    OUT/anomaly_maps.npz.
    """
    from evaluate.run import evaluate_checkpoints
    path, entries = evaluate_checkpoints(checkpoints, cache_dir, out, protocol=protocol, visual_weight=visual_weight,
                                         text_weight=text_weight, n_resamples=n_resamples,
                                         bootstrap_seed=bootstrap_seed, name=name, log=click.echo, device=device)
    _echo_entries(path, entries)


@cli.command()
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for report.md and the plots.")
@_fail_cleanly
def report(results, out):
    """Compare results files side by side: Markdown tables and PNG plots.

    RESULTS are results.json files or directories searched for them. Rows are grouped by protocol
    and dataset; rows scored on different image lists are never put in one table (refused).
    """
    from evaluate.report import write_report
    path = write_report(results, out)
    click.echo(f"report → {path}")


@cli.group()
def baseline():
    """Baselines scored exactly like RAML (same images, same results format)."""


@baseline.command("winclip")
@click.option("--dataset", type=click.Choice(["mvtec", "visa", "folder", "textile"]), required=True)
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Dataset root (not for textile).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for the results files.")
@click.option("--split-from", type=click.Path(exists=True), default=None,
              help="A training run: score exactly its held-out images (the holdout protocol), so that the "
                   "baseline and the model are compared on the same images.")
@click.option("--protocol", type=click.Choice(["official"]), default="official", show_default=True,
              help="Without --split-from: the full official test split.")
@click.option("--model", default="ViT-B-16-plus-240", show_default=True, help="open_clip ViT (name or config JSON).")
@click.option("--pretrained", default="laion400m_e31", show_default=True, help="open_clip pretrained tag.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None, help="Local checkpoint file (offline).")
@click.option("--random-weights", is_flag=True, help="Seeded random weights: exercises the code; meaningless.")
@click.option("--device", default="auto", show_default=True)
@click.option("--categories", default=None, help="Comma-separated subset.")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass.")
@click.option("--workers", default=2, show_default=True, help="Parallel image-decoding processes.")
@click.option("--image-score", type=click.Choice(["global", "global+map"]), default="global", show_default=True,
              help="global: the global CLIP score (the paper's zero-shot rule); global+map: its mean with the "
                   "multi-scale map's maximum (WinCLIP+'s few-shot rule).")
@click.option("--maps", type=click.Choice(["all", "examples", "none"]), default="all", show_default=True,
              help="Which images get the multi-scale map (its windows cost ~12 global passes): all (pixel metrics), "
                   "examples (the few a report shows), none. The global image score does not use them.")
@_with(bootstrap_options)
@_fail_cleanly
def baseline_winclip(dataset, root, out, split_from, protocol, model, pretrained, weights, random_weights, device,
                     categories, batch_size, workers, image_score, maps, n_resamples, bootstrap_seed):
    """Zero-shot WinCLIP (Jeong et al., CVPR 2023): prompt ensemble, 2x2/3x3 windows, harmonic aggregation."""
    from evaluate.baseline import run_winclip
    path, entries = run_winclip(
        dataset, root, out, lambda: load_backbone_from(model, pretrained, weights, random_weights, device),
        protocol=protocol, split_from=split_from, categories=categories.split(",") if categories else None,
        batch_size=batch_size, workers=workers, n_resamples=n_resamples, bootstrap_seed=bootstrap_seed,
        progress=_show_progress(), image_score=image_score, maps=maps)
    _echo_entries(path, entries)


feature_baseline_options = [
    click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True,
                 help="Feature cache written by extract: the baseline reads only it (no CLIP)."),
    click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for the results files."),
    click.option("--split-from", type=click.Path(exists=True), default=None,
                 help="A training run: fit on its training images and score its held-out ones, so that the "
                      "baseline shares a table with it."),
    click.option("--split-seed", type=int, default=None,
                 help="Without --split-from: seed of the holdout split (default: train's)."),
    click.option("--holdout-fraction", type=float, default=None,
                 help="Without --split-from: fraction of each category's test set held out (default: train's)."),
    *bootstrap_options,
]


def _feature_baseline(name, cache_dir, out, **options) -> dict:
    """Run ``evaluate.feature_baselines.run_feature_baseline`` and print its summary."""
    from evaluate.feature_baselines import run_feature_baseline
    path, entries, result = run_feature_baseline(name, _read_training_cache(cache_dir), out, **options)
    _echo_entries(path, entries)
    return result


@baseline.command("linear")
@_with(feature_baseline_options)
@click.option("--per-category", is_flag=True, help="One logistic regression per category (default: one for all).")
@_fail_cleanly
def baseline_linear(cache_dir, out, **options):
    """Logistic regression (scikit-learn) on the global crop's cached embedding."""
    _feature_baseline("linear", cache_dir, out, **options)


@baseline.command("knn-tiles")
@_with(feature_baseline_options)
@_fail_cleanly
def baseline_knn_tiles(cache_dir, out, **options):
    """Nearest normal crop per category and scale (PatchCore at crop level): trains on normal images only."""
    result = _feature_baseline("knn-tiles", cache_dir, out, **options)
    bank, n = result["extra"]["memory_bank"], len(result["scores"]["final"])
    click.echo(f"  memory bank: {bank['crops']} crops of {bank['normal_images']} normal images "
               f"(largest category: {max(bank['crops_per_category'].values())} crops); scored {n} images in "
               f"{result['seconds']:.2f} s ({1000 * result['seconds'] / n:.2f} s per 1,000 images)")


@baseline.command("zero-shot-text")
@_with(feature_baseline_options)
@_fail_cleanly
def baseline_zero_shot_text(cache_dir, out, **options):
    """RAML's cached text score s_text alone: the zero-shot floor."""
    _feature_baseline("zero-shot-text", cache_dir, out, **options)

@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--checkpoint", required=True, type=click.Path(exists=True), help="Training run directory or checkpoint.pt.")
@click.option("--category", required=True, help="What the images show, e.g. bottle (used in the text prompts).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for predictions.csv and heatmaps.")
@checkpoint_backbone_options
@click.option("--visual-weight", type=float, default=None, help="Weight of s_visual (default: the checkpoint's).")
@click.option("--text-weight", type=float, default=None, help="Weight of s_text (default: the checkpoint's).")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write a heatmap PNG per image (~0.2 s each on a CPU).")
@engine_options
@_fail_cleanly
def predict(files, checkpoint, category, out, model, pretrained, weights, random_weights, device, visual_weight,
            text_weight, heatmaps, engine, fidelity_sample):
    """Score new images (files or folders) with a trained checkpoint.

    Prints file, score and decision at the category's threshold; writes OUT/predictions.csv and a
    heatmap overlay per image. The backbone is the checkpoint's unless options say otherwise (they
    must agree with it). Unreadable files get an error line; the exit status is then 1.
    """
    from evaluate.predict import (backbone_options_for, predict_files, prediction_table, threshold_for,
                                  threshold_note)
    from train.checkpoint import load_checkpoint
    trained = load_checkpoint(checkpoint)
    options = backbone_options_for(trained.fingerprint, model, pretrained, weights, random_weights)
    if category not in trained.categories:
        click.secho(f"note: the checkpoint was trained on {', '.join(trained.categories)}, not {category!r}: "
                    "scoring it is a transfer.", fg="yellow", err=True)
    note = threshold_note(trained, category)
    if note:
        click.secho(f"note: {note}", fg="yellow", err=True)
    backbone = load_engine_backbone(**options, device=device, engine=engine)
    if backbone.engine == "onnx-int8":
        from evaluate.int8_check import check_for_predict
        from evaluate.predict import collect_files
        check_for_predict(backbone, collect_files(files), trained, category, sample=fidelity_sample)
    predictions = predict_files(files, trained, category, out, backbone, visual_weight=visual_weight,
                                text_weight=text_weight, heatmaps=heatmaps, progress=_show_progress())
    click.echo(prediction_table(predictions, threshold_for(trained, category)))
    if backbone.random_weights:
        click.secho("RANDOM WEIGHTS: these scores are NOT MEANINGFUL.", fg="yellow")
    click.echo(f"→ {out}/predictions.csv" + (f" and {out}/*_heatmap.png" if heatmaps else ""))
    failed = [p for p in predictions if p.error]
    if failed:
        raise UserError(f"{len(failed)} of {len(predictions)} files could not be scored (see ERROR lines above)")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False), default="demo_out", show_default=True)
@click.option("--limit", default=None, type=int,
              help="Textile images to use (default 146: the fewest with 15 normal and 15 anomalous held out).")
@click.option("--epochs", default=None, type=int, help="Training epochs per run (default 25, the original's).")
@click.option("--seeds", default="0,1,2", show_default=True, help="Training seeds of each margin.")
@click.option("--model", default="ViT-B-16", show_default=True, help="RAML's CLIP.")
@click.option("--pretrained", default="openai", show_default=True)
@click.option("--winclip-model", default="ViT-B-16-plus-240", show_default=True, help="WinCLIP's CLIP (the paper's).")
@click.option("--winclip-pretrained", default="laion400m_e31", show_default=True)
@click.option("--online", is_flag=True, help="Allow downloading the CLIP weights (default: local cache only).")
@click.option("--random-weights", is_flag=True, help="Skip looking for weights; run with random ones (not meaningful).")
@_fail_cleanly
def demo(out, limit, epochs, seeds, model, pretrained, winclip_model, winclip_pretrained, online, random_weights):
    """README command one: RAML (3 margins × 3 seeds, via sweep) against zero-shot WinCLIP on the same held-out
    textile images: extract → sweep → evaluate → baseline winclip → report."""
    from evaluate.demo import DEFAULT_EPOCHS, DEFAULT_LIMIT, run_demo
    run_demo(lambda args: cli.main(list(args), standalone_mode=False), out, model=model, pretrained=pretrained,
             winclip_model=winclip_model, winclip_pretrained=winclip_pretrained, limit=limit or DEFAULT_LIMIT,
             epochs=epochs or DEFAULT_EPOCHS, seeds=_comma_list(seeds, int), online=online,
             random_weights=random_weights, log=click.echo)


# --- deployment: export (issue 5) ---


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="Training run directory or checkpoint.pt.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Deployment directory (created; an earlier export in it is replaced).")
@click.option("--categories", default=None,
              help="Comma-separated categories to bake in (default: the checkpoint's).")
@checkpoint_backbone_options
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True,
              help="Encoder to deploy: fp32, or int8 (faster on CPUs; checked against fp32 on your own images "
                   "from --dataset/--root first, and refused below its limits).")
@click.option("--dataset", type=click.Choice(["mvtec", "visa", "folder", "textile"]), default=None,
              help="With --precision int8: the dataset whose images (of the exported categories) the check uses.")
@click.option("--root", type=click.Path(file_okay=False), default=None, help="Its root (not needed for textile).")
@fidelity_sample_option("--precision int8")
@_fail_cleanly
def export(checkpoint, out, categories, model, pretrained, weights, random_weights, device, precision, dataset, root,
           fidelity_sample):
    """Write a deployment that needs no torch: encoder.onnx, head.onnx, deploy.json, predict_onnx.py.

    The backbone is the checkpoint's unless options say otherwise (they must agree with it). Then,
    with only onnxruntime, numpy and pillow: python OUT/predict_onnx.py part.png [--category bottle].
    """
    from evaluate.export import export_deployment
    from evaluate.predict import backbone_options_for
    from train.checkpoint import load_checkpoint
    trained = load_checkpoint(checkpoint)
    if precision == "fp32" and (dataset or root):
        raise UserError("--dataset/--root give the images of the int8 check: pass --precision int8 with them")
    options = backbone_options_for(trained.fingerprint, model, pretrained, weights, random_weights)  # before CLIP
    backbone = load_backbone_from(**options, device=device)
    deploy = export_deployment(trained, out, backbone, categories=_comma_list(categories) if categories else None,
                               log=lambda line: click.secho(line, fg="yellow", err=True), precision=precision,
                               sample_dataset=(dataset, root) if dataset else None, fidelity_sample=fidelity_sample)
    thresholds = ", ".join(f"{c} {t:.4f}" for c, t in deploy["thresholds"].items())
    encoder = deploy["encoder"]
    encoder_check = (f"max |onnx - torch| {encoder['max_abs_diff_vs_torch']:.1e}" if precision == "fp32"
                     else encoder["fidelity"]["summary"])
    click.echo(f"export: {deploy['backbone']} ({deploy['weights']}), categories {', '.join(deploy['categories'])}; "
               f"thresholds {thresholds}; {precision} encoder: {encoder_check}; head: max |onnx - torch| "
               f"{deploy['head']['max_abs_diff_vs_torch']:.1e}; {deploy['export_seconds']} s → {out}")
    click.echo(f"  run it with: python {os.path.join(out, 'predict_onnx.py')} IMAGE... "
               "(needs only onnxruntime, numpy, pillow)")
    if deploy["random_weights"]:
        click.secho(deploy["warning"], fg="yellow")


if __name__ == "__main__":
    cli()
