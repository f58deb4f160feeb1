"""The cache's own commands: ``info`` (what a cache holds; ``--repair``: ``cache.repair``) and ``bench cache``
(what checking costs).
Each stage defines its commands beside its code; pipeline.py assembles them into one command line."""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from raml.cli.failures import fail_cleanly


@click.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@click.option(
    "--repair",
    is_flag=True,
    help="First repair what the shards alone can repair: rebuild a lost cache.json from the backbone identity "
    "every shard records (when they all agree), and remove the extra copies of images stored more than once "
    "(the first copy of each is kept; each shard is rewritten atomically). Nothing is encoded.",
)
@fail_cleanly
def info(cache_dir, repair):
    """Summarise a feature cache: backbone, images per category and label, skipped files, partial
    shards (being written, or left by a killed run). With --repair, repair it first."""
    from raml.cache import read_cache
    from raml.cache.format import shards_bytes
    from raml.cache.lock import partial_shard_status
    from raml.cache.tokens import token_bytes_per_image
    from raml.errors import human_bytes

    if repair:
        from raml.cache.repair import repair_cache

        for line in repair_cache(cache_dir).lines():
            click.echo(line)
    table = read_cache(cache_dir, with_features=False)
    meta = table.meta
    config = (meta.get("model_config") or "config not recorded")[:19]  # "sha256:" and 12 hex digits
    click.echo(
        f"{cache_dir}: {len(table)} images, backbone {meta['backbone']} ({config}; {meta['weights']}), "
        f"input {meta['input_size']} px, D={meta['embed_dim']}, engines {', '.join(table.engines) or '-'}"
    )
    if meta["random_weights"]:
        click.secho("  random weights: features are meaningless", fg="yellow")
    on_disk = shards_bytes(cache_dir)
    click.echo(
        f"  size on disk: {human_bytes(on_disk)} in shards"
        + (f", {human_bytes(on_disk / len(table))} per image" if len(table) else "")
    )
    setting = table.token_setting
    if setting:
        per_image = token_bytes_per_image(setting)
        click.echo(
            f"  patch tokens: {int(table.has_tokens.sum())} of {len(table)} images ({setting['tokens']} tokens of "
            f"{setting['embed_dim']} values, {setting['per_tile']}x{setting['per_tile']} per 4x4 tile, float16: "
            f"{human_bytes(per_image)} per image with the mask targets)"
        )
    for category in table.categories:
        labels = table.label[table.category == category]
        click.echo(f"  {category:<14} {int((labels == 0).sum()):>6} normal {int((labels == 1).sum()):>6} anomalous")
    for path, reason in table.skipped:
        click.echo(f"  skipped {path}: {reason}")
    for path, holder in partial_shard_status(cache_dir):
        click.echo(
            f"  partial {path.name}: "
            + (f"being written by {holder}" if holder else "stale, left by a killed run; the next extract removes it")
        )


@click.command("cache")
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, exists=True),
    default=None,
    help="Cache to read (default: a synthetic one of MVTec AD's shape, ViT-B/16-sized features).",
)
@fail_cleanly
def bench_cache(cache_dir):
    """What verifying checksums and validating rows adds to reading a cache."""
    from raml.cache.bench import run_cache_read_bench
    from raml.cache.synthetic import write_synthetic_cache

    with tempfile.TemporaryDirectory(prefix="raml-bench-cache-") as work:
        source = Path(cache_dir) if cache_dir else write_synthetic_cache(Path(work) / "mvtec-shape")
        click.echo(run_cache_read_bench(source, Path(work)).line())
