"""RAML command line: ``python pipeline.py COMMAND --help`` for each command.

Stage one:  extract                       images → HDF5 feature shards (runs CLIP once per image)
Stage two:  train, sweep                  cached features → RAML head
            evaluate, report, baseline, predict, export, demo
Tools:      info, bench extract, bench train
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
    from extract.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED
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


def load_backbone_from(model, pretrained, weights, random_weights, device):
    from extract.encoder import load_backbone
    if random_weights:
        click.secho("warning: --random-weights: CLIP is randomly initialised; every number this produces "
                    "is meaningless.", fg="yellow", err=True)
    return load_backbone(model, pretrained, weights, random_weights, device)


engine_option = click.option(
    "--engine", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
    help="Runtime of the CLIP image encoder: torch (eager) or onnx (ONNX Runtime, faster on CPUs; "
         "exported once into $RAML_CACHE_DIR/onnx or ~/.cache/raml/onnx and checked against torch).")


def load_engine_backbone(model, pretrained, weights, random_weights, device, engine):
    """``load_backbone_from``, with the image encoder run by ``engine`` ("torch" or "onnx")."""
    backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    if engine == "torch":
        return backbone
    from extract.onnx_engine import onnx_backbone
    return onnx_backbone(backbone)


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
@engine_option
@_fail_cleanly
def extract(dataset, root, cache_dir, model, pretrained, weights, random_weights, device, categories,
            batch_size, workers, limit, skip_bad, retry_skipped, shard, shard_size, engine):
    """Stage one: encode each image's 21 crops with CLIP, once, into HDF5 shards.

    Re-running resumes: images already in the cache are skipped.
    """
    from extract.loader import usable_cores
    from extract.run import extract_features
    summary = extract_features(
        dataset, root, cache_dir,
        lambda: load_engine_backbone(model, pretrained, weights, random_weights, device, engine),
        categories=categories.split(",") if categories else None, batch_size=batch_size,
        workers=usable_cores() if workers is None else workers,
        limit=limit, skip_bad=skip_bad, shard=shard, shard_size=shard_size, retry_skipped=retry_skipped,
        progress=_show_progress())
    click.echo(summary.line())
    for path, reason in summary.skipped:
        click.echo(f"  skipped {path}: {reason}")


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@_fail_cleanly
def info(cache_dir):
    """Summarise a feature cache: backbone, images per category and label, skipped files."""
    from cache import read_cache
    table = read_cache(cache_dir, with_features=False)
    meta = table.meta
    click.echo(f"{cache_dir}: {len(table)} images, backbone {meta['backbone']} ({meta['weights']}), "
               f"input {meta['input_size']} px, D={meta['embed_dim']}, engines {', '.join(table.engines) or '-'}")
    if meta["random_weights"]:
        click.secho("  random weights: features are meaningless", fg="yellow")
    for category in table.categories:
        labels = table.label[table.category == category]
        click.echo(f"  {category:<14} {int((labels == 0).sum()):>6} normal {int((labels == 1).sum()):>6} anomalous")
    for path, reason in table.skipped:
        click.echo(f"  skipped {path}: {reason}")


@cli.group()
def bench():
    """Measure speed on this machine (not tests: figures go to notes and the README)."""


@bench.command("extract")
@backbone_options
@click.option("--images", default=8, show_default=True, help="Synthetic images of MVTec size to encode.")
@click.option("--size", default=900, show_default=True, help="Side of the synthetic images (px).")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass (x21 crops).")
@click.option("--workers", type=int, default=None, help="Image-decoding processes. Default: one per usable core.")
@click.option("--loader-only", is_flag=True,
              help="Only the loader and its ceiling (quick on a CPU, where ViT-B/16 takes ~2 s per image).")
@engine_option
@_fail_cleanly
def bench_extract(model, pretrained, weights, random_weights, device, images, size, batch_size, workers, loader_only,
                  engine):
    """Where stage one's time goes: images/s of the whole stage, of the loader alone and of the bare
    encoder, their ratios, and the loader against its ceiling."""
    from extract.bench import run_extract_bench
    from extract.loader import usable_cores
    backbone = load_engine_backbone(model, pretrained, weights, random_weights, device, engine)
    result = run_extract_bench(backbone, images=images, size=size, batch_size=batch_size,
                               workers=usable_cores() if workers is None else workers, loader_only=loader_only)
    for line in result.lines():
        click.echo(line)


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
@_train_options()
@_fail_cleanly
def train(cache_dir, out, force, threads, margin, **options):
    """Stage two: train the RAML head on cached features (holdout protocol; never loads CLIP).

    --margin picks the preset (adaptive: m = 0.5 + 0.3·σ + 0.3·(1 − r/r_max); fixed: 0.5;
    strong: 1.0); --margin-base/--lambda-sigma/--lambda-res override its values.
    """
    from pathlib import Path

    from train.checkpoint import CHECKPOINT_FILE
    from train.config import make_config
    from train.fit import fit, write_run
    config = make_config(margin, **options)
    if (Path(out) / CHECKPOINT_FILE).exists() and not force:
        raise UserError(f"{out} already holds a trained run; choose another --out or pass --force")
    table = _read_training_cache(cache_dir)
    click.echo(f"train: {len(table)} images in {len(table.categories)} categories from {cache_dir}; "
               f"margin {config.margin} (m_base {config.margin_base}, λσ {config.lambda_sigma}, "
               f"λres {config.lambda_res}, r_max {config.r_max}), seed {config.seed}")
    trained = fit(table, config, progress=click.echo, threads=threads)
    path = write_run(out, trained)
    click.echo(f"train: {len(trained.split.train)} training / {len(trained.split.heldout)} held-out images; "
               f"threshold {trained.threshold:.4f} (F1-max on training images) → {path}")


@cli.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option("--margins", default="adaptive,fixed,strong", show_default=True, help="Margin presets to compare.")
@click.option("--seeds", default="0,1,2,3,4", show_default=True, help="Training seeds (one run each).")
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Sweep directory: <margin>-seed<k>/ per run, summary.json, summary.md.")
@click.option("--jobs", default=1, show_default=True, help="Runs trained in parallel worker processes.")
@_threads_option
@_train_options(exclude=("seed", "margin", "margin_base", "lambda_sigma", "lambda_res"))
@_fail_cleanly
def sweep(cache_dir, margins, seeds, out, jobs, threads, **options):
    """Train every (margin × seed) on one cache and tabulate held-out image AUROC (mean ± std).

    Re-running resumes: finished runs are not retrained. All runs share --split-seed, so every
    number in the table is measured on the same held-out images.
    """
    from pathlib import Path

    from train.config import MARGIN_PRESETS
    from train.sweep import run_sweep
    margins, seeds = _comma_list(margins), _comma_list(seeds, int)
    unknown = [m for m in margins if m not in MARGIN_PRESETS]
    if unknown or not margins or not seeds:
        raise UserError(f"--margins takes some of {', '.join(MARGIN_PRESETS)} (got {', '.join(unknown) or 'none'}); "
                        "--seeds at least one integer")
    table = _read_training_cache(cache_dir)
    summary = run_sweep(table, margins, seeds, out, jobs=jobs, threads=threads, progress=click.echo, **options)
    click.echo((Path(out) / "summary.md").read_text().rstrip())
    click.echo(f"sweep: {len(margins) * len(seeds)} runs → {out}/summary.json, {out}/summary.md"
               + (" (random-weights features: meaningless)" if summary["random_weights"] else ""))


@bench.command("train")
@click.option("--epochs", default=25, show_default=True)
@click.option("--sweep", "with_sweep", is_flag=True, help="Also time the 3 margins × --seeds sweep.")
@click.option("--seeds", default=5, show_default=True)
@click.option("--jobs", default=2, show_default=True, help="Parallel sweep workers.")
@_threads_option
@_fail_cleanly
def bench_train(epochs, with_sweep, seeds, jobs, threads):
    """Time stage two on a synthetic cache of MVTec AD's shape (5,354 images × 21 × 512)."""
    from train.bench import run_train_bench
    for line in run_train_bench(epochs=epochs, sweep=with_sweep, seeds=seeds, jobs=jobs, threads=threads).lines():
        click.echo(line)


# --- evaluation: evaluate, report, baseline, predict (issue 4) ---



def _echo_entries(path, entries) -> None:
    """A one-line summary per configuration, then where the files are."""
    for config, entry in entries.items():
        protocol = entry["protocol"]
        std = f" ± {entry['std_auroc']:.2f}" if len(entry["seeds"]) > 1 else ""
        click.echo(f"  {config}: image AUROC {entry['mean_auroc']:.2f}{std} %, AP {entry['mean_average_precision']:.2f} %, "
                   f"F1-max {entry['mean_f1_max']:.2f} % — {len(entry['seeds'])} run(s), {protocol['name']} protocol, "
                   f"{protocol['n_images']} images (hash {protocol['image_list_hash'][:12]}…)")
        for category, reason in entry["not_available"].items():
            click.echo(f"    {category}: n/a ({reason})")
    if any(entry.get("random_weights") for entry in entries.values()):
        click.secho("  RANDOM WEIGHTS: these numbers are NOT MEANINGFUL (the pipeline ran; nothing was measured).",
                    fg="yellow")
    click.echo(f"→ {path} (+ scores.csv, anomaly_maps.npz)")


bootstrap_options = [
    click.option("--bootstrap", "n_resamples", default=1000, show_default=True,
                 help="Bootstrap resamples for the AUROC 95 % CI."),
    click.option("--bootstrap-seed", default=0, show_default=True, help="Seed of the bootstrap resampling."),
]


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
@_fail_cleanly
def evaluate(checkpoints, cache_dir, out, protocol, visual_weight, text_weight, name, n_resamples, bootstrap_seed):
    """Score trained checkpoints on a cache: metrics per category, per-image scores, coarse maps.

    Writes OUT/results.json (the original release's schema plus AP, F1-max, CI, seeds, protocol and
    image-list hash), OUT/scores.csv (visual, text and final score of every image and run) and
    OUT/anomaly_maps.npz.
    """
    from evaluate.run import evaluate_checkpoints
    path, entries = evaluate_checkpoints(checkpoints, cache_dir, out, protocol=protocol, visual_weight=visual_weight,
                                         text_weight=text_weight, n_resamples=n_resamples,
                                         bootstrap_seed=bootstrap_seed, name=name, log=click.echo)
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
@_with(bootstrap_options)
@_fail_cleanly
def baseline_winclip(dataset, root, out, split_from, protocol, model, pretrained, weights, random_weights, device,
                     categories, batch_size, workers, n_resamples, bootstrap_seed):
    """Zero-shot WinCLIP (Jeong et al., CVPR 2023): prompt ensemble, 2x2/3x3 windows, harmonic aggregation."""
    from evaluate.baseline import run_winclip
    path, entries = run_winclip(
        dataset, root, out, lambda: load_backbone_from(model, pretrained, weights, random_weights, device),
        protocol=protocol, split_from=split_from, categories=categories.split(",") if categories else None,
        batch_size=batch_size, workers=workers, n_resamples=n_resamples, bootstrap_seed=bootstrap_seed,
        progress=_show_progress())
    _echo_entries(path, entries)


@cli.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--checkpoint", required=True, type=click.Path(exists=True), help="Training run directory or checkpoint.pt.")
@click.option("--category", required=True, help="What the images show, e.g. bottle (used in the text prompts).")
@click.option("--out", type=click.Path(file_okay=False), required=True, help="Directory for predictions.csv and heatmaps.")
@backbone_options
@click.option("--visual-weight", type=float, default=None, help="Weight of s_visual (default: the checkpoint's).")
@click.option("--text-weight", type=float, default=None, help="Weight of s_text (default: the checkpoint's).")
@click.option("--heatmaps/--no-heatmaps", default=True, show_default=True,
              help="Write a heatmap PNG per image (~0.2 s each on a CPU).")
@engine_option
@_fail_cleanly
def predict(files, checkpoint, category, out, model, pretrained, weights, random_weights, device, visual_weight,
            text_weight, heatmaps, engine):
    """Score new images (files or folders) with a trained checkpoint.

    Prints file, score and decision at the checkpoint's threshold; writes OUT/predictions.csv and a
    heatmap overlay per image. Unreadable files get an error line; the exit status is then 1.
    """
    from evaluate.predict import check_backbone_options, predict_files, prediction_table, threshold_for
    from train.checkpoint import load_checkpoint
    trained = load_checkpoint(checkpoint)
    check_backbone_options(trained.fingerprint, model, random_weights)
    if category not in trained.categories:
        click.secho(f"note: the checkpoint was trained on {', '.join(trained.categories)}, not {category!r}: "
                    "scoring it is a transfer, and the threshold was fitted on other categories.", fg="yellow", err=True)
    backbone = load_engine_backbone(model, pretrained, weights, random_weights, device, engine)
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
@click.option("--limit", default=None, type=int, help="Textile images to use (default 32: fits 10 min on 2 CPU cores).")
@click.option("--epochs", default=None, type=int, help="Training epochs per margin (default 25, the original's).")
@click.option("--model", default="ViT-B-16", show_default=True)
@click.option("--pretrained", default="openai", show_default=True)
@click.option("--online", is_flag=True, help="Allow downloading the CLIP weights (default: local cache only).")
@click.option("--random-weights", is_flag=True, help="Skip looking for weights; run with random ones (not meaningful).")
@_fail_cleanly
def demo(out, limit, epochs, model, pretrained, online, random_weights):
    """README command one: extract → train (adaptive, fixed, strong) → evaluate → report on textile images."""
    from evaluate.demo import DEFAULT_EPOCHS, DEFAULT_LIMIT, run_demo
    run_demo(lambda args: cli.main(list(args), standalone_mode=False), out, model=model, pretrained=pretrained,
             limit=limit or DEFAULT_LIMIT, epochs=epochs or DEFAULT_EPOCHS, online=online,
             random_weights=random_weights, log=click.echo)


# --- deployment: export (issue 5) ---


@cli.command()
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="Training run directory or checkpoint.pt.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Deployment directory (created; an earlier export in it is replaced).")
@click.option("--categories", default=None,
              help="Comma-separated categories to bake in (default: the checkpoint's).")
@backbone_options
@_fail_cleanly
def export(checkpoint, out, categories, model, pretrained, weights, random_weights, device):
    """Write a deployment that needs no torch: encoder.onnx, head.onnx, deploy.json, predict_onnx.py.

    The backbone options must be those the checkpoint was trained with. Then, with only
    onnxruntime, numpy and pillow: python OUT/predict_onnx.py part.png [--category bottle].
    """
    from evaluate.export import export_deployment
    from evaluate.predict import check_backbone_options
    from train.checkpoint import load_checkpoint
    trained = load_checkpoint(checkpoint)
    check_backbone_options(trained.fingerprint, model, random_weights)  # before loading CLIP
    backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    deploy = export_deployment(trained, out, backbone, categories=_comma_list(categories) if categories else None,
                               log=lambda line: click.secho(line, fg="yellow", err=True))
    thresholds = ", ".join(f"{c} {t:.4f}" for c, t in deploy["thresholds"].items())
    encoder_diff, head_diff = (deploy[part]["max_abs_diff_vs_torch"] for part in ("encoder", "head"))
    click.echo(f"export: {deploy['backbone']} ({deploy['weights']}), categories {', '.join(deploy['categories'])}; "
               f"thresholds {thresholds}; max |onnx - torch|: encoder {encoder_diff:.1e}, head {head_diff:.1e}; "
               f"{deploy['export_seconds']} s → {out}")
    click.echo(f"  run it with: python {os.path.join(out, 'predict_onnx.py')} IMAGE... "
               "(needs only onnxruntime, numpy, pillow)")
    if deploy["random_weights"]:
        click.secho(deploy["warning"], fg="yellow")


if __name__ == "__main__":
    cli()
