"""RAML command line: ``python pipeline.py COMMAND --help`` for each command.

Stage one:  extract                       images → HDF5 feature shards (runs CLIP once per image)
Stage two:  train, sweep                  cached features → RAML head
            evaluate, report, baseline, predict
Tools:      info, bench extract
"""
from __future__ import annotations

import os
import sys

import click

# open_clip retries a failing download for ~45 s; RAML_OFFLINE=1 (or HF_HUB_OFFLINE=1) fails at once.
if os.environ.get("RAML_OFFLINE") == "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


class UserError(click.ClickException):
    """Shown as ``Error: <message>`` without a traceback."""


def _fail_cleanly(func):
    """Turn the errors a user can fix (bad data, missing weights, wrong cache) into plain messages."""
    import functools

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        from cache import CacheError
        from extract.datasets import DatasetLayoutError
        from extract.encoder import WeightsUnavailableError
        from extract.pyramid import BadImageError
        try:
            return func(*args, **kwargs)
        except (CacheError, DatasetLayoutError, WeightsUnavailableError, BadImageError,
                FileNotFoundError, ValueError) as err:
            raise UserError(str(err)) from err
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
def cli():
    """RAML: industrial anomaly detection with a 21-crop CLIP pyramid and a small trained head."""


def backbone_options(func):
    """Options naming the CLIP backbone; shared by every command that runs the image encoder."""
    from extract.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED
    options = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="open_clip model name, or path to an open_clip model-config JSON."),
        click.option("--pretrained", default=DEFAULT_PRETRAINED, show_default=True,
                     help="open_clip pretrained tag (downloaded once into the user's cache)."),
        click.option("--weights", type=click.Path(dir_okay=False), default=None,
                     help="Local checkpoint file, for offline machines (overrides --pretrained)."),
        click.option("--random-weights", is_flag=True,
                     help="Seeded random weights: exercises the pipeline; results are meaningless."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ... or auto."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


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
    from extract.onnx_engine import OnnxEngineError, onnx_backbone
    try:
        return onnx_backbone(backbone)
    except OnnxEngineError as err:
        raise UserError(str(err)) from err


@cli.command()
@click.option("--dataset", type=click.Choice(["mvtec", "visa", "folder", "textile"]), required=True)
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Dataset root (not needed for textile, which ships with conformal-clip-data).")
@click.option("--cache-dir", type=click.Path(file_okay=False), required=True, help="Where the shards go.")
@backbone_options
@click.option("--categories", default=None, help="Comma-separated subset, e.g. bottle,screw.")
@click.option("--batch-size", default=8, show_default=True, help="Images per forward pass (×21 crops).")
@click.option("--workers", default=2, show_default=True, help="Parallel image-decoding processes.")
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
    from extract.run import extract_features
    summary = extract_features(
        dataset, root, cache_dir,
        lambda: load_engine_backbone(model, pretrained, weights, random_weights, device, engine),
        categories=categories.split(",") if categories else None, batch_size=batch_size, workers=workers,
        limit=limit, skip_bad=skip_bad, shard=shard, shard_size=shard_size, retry_skipped=retry_skipped,
        progress=sys.stderr.isatty() or os.environ.get("RAML_PROGRESS") == "1")
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
@click.option("--batch-size", default=8, show_default=True)
@click.option("--workers", default=2, show_default=True)
@engine_option
@_fail_cleanly
def bench_extract(model, pretrained, weights, random_weights, device, images, size, batch_size, workers, engine):
    """Images/s of the whole of stage one, and its overhead over the bare encoder forward."""
    from extract.bench import run_extract_bench
    backbone = load_engine_backbone(model, pretrained, weights, random_weights, device, engine)
    result = run_extract_bench(backbone, images=images, size=size, batch_size=batch_size, workers=workers)
    click.echo(f"[engine {engine}] {result.line()}")


# --- stage two: train, sweep, bench train (issue 3) ---


# --- evaluation: evaluate, report, baseline, predict (issue 4) ---


# --- deployment: export (issue 5) ---


if __name__ == "__main__":
    cli()
