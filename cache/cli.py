"""The command-line pieces every stage shares, and the cache's own commands (``info``,
``bench cache``). Each stage defines its commands beside its code (extract/cli.py, train/cli.py,
evaluate/cli.py, ...); pipeline.py assembles them into one command line.
"""
from __future__ import annotations

import functools
import os
import sys

import click

from cache.errors import UserError


def show_progress() -> bool:
    """Progress bars on a terminal (or with RAML_PROGRESS=1), not in logs and pipes."""
    return sys.stderr.isatty() or os.environ.get("RAML_PROGRESS") == "1"


def fail_cleanly(func):
    """Show the errors a user can fix (``UserError``: bad data, missing weights, wrong cache or
    option; and missing files) as one ``Error:`` line. Anything else is a bug: its traceback stays."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (UserError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err
    return wrapper


def with_options(options):
    """Apply a list of click options to a command, in the order listed."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


def comma_list(text, kind=str):
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: expected a comma-separated list") from None


def device_option(help_text: str):
    """--device, on every command that runs torch: ``help_text`` says what runs there."""
    return click.option("--device", default="auto", show_default=True, help=help_text)


@click.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@fail_cleanly
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
    setting = table.token_setting
    if setting:
        per_image = setting["tokens"] * setting["embed_dim"] * 2
        click.echo(f"  patch tokens: {int(table.has_tokens.sum())} of {len(table)} images ({setting['tokens']} tokens of "
                   f"{setting['embed_dim']} values, {setting['per_tile']}x{setting['per_tile']} per 4x4 tile, float16: "
                   f"{per_image / 1e6:.2f} MB per image)")
    for category in table.categories:
        labels = table.label[table.category == category]
        click.echo(f"  {category:<14} {int((labels == 0).sum()):>6} normal {int((labels == 1).sum()):>6} anomalous")
    for path, reason in table.skipped:
        click.echo(f"  skipped {path}: {reason}")
    for path, holder in partial_shard_status(cache_dir):
        click.echo(f"  partial {path.name}: " + (f"being written by {holder}" if holder else
                                                 "stale, left by a killed run; the next extract removes it"))


@click.command("cache")
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), default=None,
              help="Cache to read (default: a synthetic one of MVTec AD's shape, ViT-B/16-sized features).")
@fail_cleanly
def bench_cache(cache_dir):
    """What verifying checksums and validating rows adds to reading a cache."""
    import tempfile
    from pathlib import Path

    from cache.bench import run_cache_read_bench
    from cache.synthetic import write_synthetic_cache
    with tempfile.TemporaryDirectory(prefix="raml-bench-cache-") as work:
        source = Path(cache_dir) if cache_dir else write_synthetic_cache(Path(work) / "mvtec-shape")
        click.echo(run_cache_read_bench(source, Path(work)).line())
