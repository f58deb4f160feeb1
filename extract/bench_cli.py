"""``bench extract``: stage one's engines timed on this machine, against the floor of each precision."""

from __future__ import annotations

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import with_options
from raml.extract.cli import BATCH_SIZE, IMAGE_SIDE, WORKERS, backbone_options, load_backbone_from
from raml.extract.config import ExtractConfig
from raml.extract.engine_cli import compare_options, engine_backbone, engine_backbones, engine_option
from raml.extract.engines import ENGINES


@click.command("extract")
@backbone_options
@click.option(
    "--images",
    type=click.IntRange(1, 100_000),
    default=8,
    show_default=True,
    help="Synthetic images of MVTec size to encode.",
)
@click.option("--size", type=IMAGE_SIDE, default=900, show_default=True, help="Side of the synthetic images (px).")
@click.option(
    "--batch-size",
    type=BATCH_SIZE,
    default=ExtractConfig.default("batch_size"),
    show_default=True,
    help="Images per forward pass (x21 crops).",
)
@click.option(
    "--workers",
    type=WORKERS,
    default=ExtractConfig.default("workers"),
    help="Image-decoding processes. Default: one per usable core.",
)
@click.option(
    "--loader-only",
    is_flag=True,
    help="Only the loader and its ceiling (quick on a CPU, where ViT-B/16 takes ~2 s per image).",
)
@click.option(
    "--patch-tokens",
    is_flag=True,
    help="Also time the whole stage with patch tokens and mask targets against the stage without, --rounds "
    "times interleaved (half of the images then have masks), and the cache's bytes per image.",
)
@engine_option(choices=ENGINES)  # no auto: timing needs no fidelity gate
@with_options(compare_options)
@fail_cleanly
def bench_extract(
    model,
    pretrained,
    weights,
    random_weights,
    device,
    images,
    size,
    batch_size,
    workers,
    loader_only,
    patch_tokens,
    engine,
    engines,
    rounds,
):
    """Where stage one's time goes: images/s of the whole stage, of the loader alone and of the bare
    encoder, their ratios, and the loader against its ceiling; with --patch-tokens the tokens'
    overhead; then the encoder's seconds per image with each of --engines, against the floor of its
    own precision and the lowest floor of this CPU (fp32, bf16 and int8 products measured in the same run)."""
    from raml.extract.bench import run_extract_bench
    from raml.extract.engine_bench import compare_encoders
    from raml.extract.engines import usable_cores

    torch_backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    result = run_extract_bench(
        engine_backbone(torch_backbone, engine),
        images=images,
        size=size,
        batch_size=batch_size,
        workers=usable_cores() if workers is None else workers,
        loader_only=loader_only,
        patch_tokens=patch_tokens,
        rounds=rounds,
    )
    for line in result.lines():
        click.echo(line)
    if engines and not loader_only:
        for line in compare_encoders(engine_backbones(torch_backbone, engines), size=size, rounds=rounds).lines():
            click.echo(line)
