"""Stage one's commands: ``extract`` and ``bench extract``, and the options that name a CLIP
backbone and its engine (shared with the commands that score new images, evaluate/deploy/cli.py).
"""

from __future__ import annotations

import functools
from pathlib import Path

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import device_option, echo_chosen, given_on_command_line, show_progress, text_list, with_options
from raml.extract.config import ExtractConfig
from raml.extract.engine_cli import (
    engine_options,
    gated_backbone,
)

BATCH_SIZE = click.IntRange(1, 4096)  # images per forward pass (× 21 crops)
WORKERS = click.IntRange(0, 1024)  # decoding processes; 0 decodes in the main process
IMAGE_SIDE = click.IntRange(64, 13_376)  # px: the pyramid's minimum, and Pillow's pixel limit's side


def model_option(flag: str = "--model", **kwargs):
    """--model (or ``flag``): an open_clip model name or model-config JSON, checked before any work
    (``extract.model_config.model_problem``: without importing open_clip)."""

    def check(ctx, param, value):
        from raml.extract.model_config import model_problem

        problem = None if value is None else model_problem(value)
        if problem:
            raise click.BadParameter(problem)
        return value

    return click.option(flag, callback=check, **kwargs)


def refusing_contradictory_weights(func):
    """Refuse, before any work, weights options given together on the command line that name
    different weights: --pretrained or --weights with --random-weights. Weights named on the
    command line outrank ``random_weights`` set in raml.toml, as every option given outranks the
    file."""

    @functools.wraps(func)
    def checked(*args, **kwargs):
        given = {
            name
            for name in ("pretrained", "winclip_pretrained", "weights", "random_weights")
            if given_on_command_line(name)
        }
        if "random_weights" in given and given - {"random_weights"}:
            flag = "--" + sorted(given - {"random_weights"})[0].replace("_", "-")
            raise click.BadParameter(
                "names weights to load, and --random-weights asks for random ones: give one", param_hint=f"'{flag}'"
            )
        if given - {"random_weights"} and kwargs.get("random_weights"):
            kwargs["random_weights"] = False
        return func(*args, **kwargs)

    return checked


def backbone_options(func):
    """Options naming the CLIP backbone; shared by every command that runs the image encoder."""
    from raml.extract.model_config import DEFAULT_MODEL, DEFAULT_PRETRAINED  # not extract.encoder: no torch import here

    func = refusing_contradictory_weights(func)
    return with_options(
        [
            model_option(
                default=DEFAULT_MODEL,
                show_default=True,
                help="open_clip model name, or path to an open_clip model-config JSON.",
            ),
            click.option(
                "--pretrained",
                default=DEFAULT_PRETRAINED,
                show_default=True,
                help="open_clip pretrained tag (downloaded once into the user's cache; '' for none).",
            ),
            click.option(
                "--weights",
                type=click.Path(dir_okay=False),
                default=None,
                help="Local checkpoint file, for offline machines (overrides --pretrained).",
            ),
            click.option(
                "--random-weights",
                is_flag=True,
                help="Seeded random weights: exercises the pipeline; results are meaningless.",
            ),
            device_option("cpu, cuda, cuda:1, ... or auto."),
        ]
    )(func)


def checkpoint_backbone_options(func):
    """The backbone options of commands that score with a checkpoint (predict, export): each
    defaults to the checkpoint's own backbone; one given explicitly must agree with it."""
    func = refusing_contradictory_weights(func)
    return with_options(
        [
            model_option(default=None, help="open_clip model name or model-config JSON (default: the checkpoint's)."),
            click.option("--pretrained", default=None, help="open_clip pretrained tag (default: the checkpoint's)."),
            click.option(
                "--weights",
                type=click.Path(dir_okay=False),
                default=None,
                help="Local weights file (default: the one the checkpoint's cache was extracted with, at its "
                "recorded path; its sha256 must be the checkpoint's).",
            ),
            # default None, not False: "not given" (take the checkpoint's) differs from "given"
            click.option(
                "--random-weights",
                is_flag=True,
                default=None,
                help="Seeded random weights (default: when the checkpoint was trained on them).",
            ),
            device_option("cpu, cuda, cuda:1, ... or auto."),
        ]
    )(func)


def backbone_source(model, weights, random_weights) -> dict:
    """What ``extract`` records about where its backbone came from, so that ``predict`` and
    ``export`` can load it again from a checkpoint (``evaluate.deploy.predict.backbone_options_for``)."""
    model_path = Path(model)
    return {
        "model": str(model_path.resolve()) if model_path.suffix == ".json" else model,
        "weights_file": str(Path(weights).resolve()) if weights and not random_weights else None,
    }


def load_backbone_from(model, pretrained, weights, random_weights, device):
    from raml.extract.encoder import load_backbone

    if random_weights:
        click.secho(
            "warning: --random-weights: CLIP is randomly initialised; every number this produces is meaningless.",
            fg="yellow",
            err=True,
        )
    return load_backbone(model, pretrained, weights, random_weights, device)


def dataset_option(help_text: str = "Which dataset (its reader, and its place in the workspace).", default="mvtec"):
    """--dataset: names the reader and the dataset's directories in the workspace."""
    from raml.extract.datasets import READERS

    return click.option(
        "--dataset", type=click.Choice(list(READERS)), default=default, show_default=default is not None, help=help_text
    )


def root_option(func):
    """--root: the dataset's directory; default the workspace's (extract.datasets.dataset_root)."""
    return click.option(
        "--root",
        type=click.Path(file_okay=False),
        default=None,
        help="Dataset root. Default: ./datasets/<dataset>, or $RAML_DATA/<dataset> (textile ships "
        "with conformal-clip-data and needs none).",
    )(func)


def dataset_root(kind: str, root=None) -> Path | None:
    """``root`` when given; for ``textile`` None (the package finds its images); else the workspace's
    place for ``kind`` (``cli.workspace.default_dataset_root``), which must exist: if it does not,
    the error says where it looked, the layout expected and where the dataset is published."""
    from raml.cli.workspace import default_dataset_root, where_datasets_are_looked_for
    from raml.extract.datasets import DATASET_SOURCES, LAYOUTS, DatasetLayoutError

    if root is not None or kind == "textile":
        return root
    path = default_dataset_root(kind)
    if not path.is_dir():
        raise DatasetLayoutError(
            f"no {kind} dataset at {path}: without --root, datasets are looked for at "
            f"{where_datasets_are_looked_for()}. Put it there, or pass --root. Expected layout:\n"
            f"{LAYOUTS[kind].replace('<root>', str(path))}\n{DATASET_SOURCES[kind]}."
        )
    return path


def chosen_dataset_root(dataset, root):
    """``root``, or the workspace's place for ``dataset``, printed when it was chosen here."""
    chosen = dataset_root(dataset, root)
    if root is None and chosen is not None:
        echo_chosen("dataset", chosen)
    return chosen


@click.command()
@dataset_option()
@root_option
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Where the shards go. Default: ./features/<dataset>/<backbone tag>, one cache per backbone.",
)
@backbone_options
@click.option(
    "--categories",
    default=None,
    callback=text_list(accepted="comma-separated category names"),
    help="Comma-separated subset, e.g. bottle,screw.",
)
@click.option(
    "--batch-size",
    type=BATCH_SIZE,
    default=ExtractConfig.default("batch_size"),
    show_default=True,
    help="Images per forward pass (×21 crops).",
)
@click.option(
    "--workers",
    type=WORKERS,
    default=ExtractConfig.default("workers"),
    help="Image-decoding processes (0: decode in the main process). Default: one per usable core.",
)
@click.option(
    "--limit",
    type=click.IntRange(1, 10_000_000),
    default=None,
    help="At most N images per category (a quick look), spread over every split and defect type.",
)
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images and list them, instead of stopping.")
@click.option("--retry-skipped", is_flag=True, help="Try again the images an earlier --skip-bad run skipped.")
@click.option(
    "--shard",
    default=None,
    callback=lambda ctx, param, value: check_shard(value),
    help="i/n: this process takes every n-th image from i (default: torchrun's RANK/WORLD_SIZE, else 0/1).",
)
@click.option(
    "--shard-size",
    type=click.IntRange(1, 1_000_000),
    default=ExtractConfig.default("shard_size"),
    show_default=True,
    help="Images per HDF5 shard.",
)
@click.option(
    "--patch-tokens",
    is_flag=True,
    help="Also store each image's patch tokens (the 4x4 tiles' 14x14 patches pooled to 7x7, ViT-B/16: 0.8 MB "
    "per image) and its mask targets, for anomaly maps; added to cached images that lack them (only "
    "those are encoded again). A cache that has them keeps getting them.",
)
@engine_options()
@fail_cleanly
def extract(
    dataset,
    root,
    cache_dir,
    model,
    pretrained,
    weights,
    random_weights,
    device,
    categories,
    batch_size,
    workers,
    limit,
    skip_bad,
    retry_skipped,
    shard,
    shard_size,
    patch_tokens,
    engine,
    fidelity_sample,
):
    """Stage one: encode each image's 21 crops with CLIP, once, into HDF5 shards.

    Re-running resumes: images already in the cache are skipped. A cache holds features of one
    precision: fp32 (--engine torch, onnx or openvino), int8 (onnx-int8; openvino-int8 is another
    int8) or bf16 (torch-bf16, openvino-bf16); --engine auto keeps to an existing cache's. Without
    --root and --cache-dir: ./datasets/<dataset> into ./features/<dataset>/<backbone tag>.
    """
    from raml.cli.workspace import cache_dir_for
    from raml.extract.engines import AUTO, PRECISIONS, cache_precision, check_cache_precision
    from raml.extract.fidelity import check_on_dataset
    from raml.extract.identity import backbone_identity, identity_of
    from raml.extract.run import extract_features

    config = ExtractConfig(
        categories=categories,
        batch_size=batch_size,
        workers=workers,
        limit=limit,
        skip_bad=skip_bad,
        retry_skipped=retry_skipped,
        shard=shard,
        shard_size=shard_size,
        patch_tokens=patch_tokens,
        engine=engine,
        fidelity_sample=fidelity_sample,
    )
    root = chosen_dataset_root(dataset, root)

    def gate(backbone):  # the fidelity gate of an engine below fp32, on this dataset's images
        target = cache_dir or cache_dir_for(dataset, identity_of(backbone).fingerprint_fields())
        check_on_dataset(backbone, target, dataset, root, config.categories, sample=config.fidelity_sample)

    if config.engine == AUTO:  # the engine is known once timed and gated; of the cache's precision if it has one
        precision = cache_precision(cache_dir) if cache_dir else None
        chosen = gated_backbone(
            load_backbone_from(model, pretrained, weights, random_weights, device), AUTO, gate, precision=precision
        )
        identity, load_checked_backbone = identity_of(chosen), lambda: chosen
    else:
        identity = backbone_identity(model, pretrained, weights, random_weights, PRECISIONS[config.engine])

        def load_checked_backbone():
            torch_backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
            return gated_backbone(torch_backbone, config.engine, gate)

    if cache_dir is None:
        cache_dir = echo_chosen("cache", cache_dir_for(dataset, identity.fingerprint_fields()))
    check_cache_precision(cache_dir, identity.precision)  # before any model is loaded (but auto's)

    summary = extract_features(
        dataset,
        root,
        cache_dir,
        load_checked_backbone,
        config,
        identity=identity,
        backbone_source=backbone_source(model, weights, random_weights),
        progress=show_progress(),
    )
    click.echo(summary.line())
    if summary.untokened_elsewhere:
        click.echo(
            f"  {len(summary.untokened_elsewhere)} shards of other --shard slots still have no patch tokens "
            f"({', '.join(summary.untokened_elsewhere[:3])}{', ...' if len(summary.untokened_elsewhere) > 3 else ''}"
            "): run this command with the --shard i/n in their names (features-<i>of<n>-...) to add them"
        )
    for path in summary.stale_partials:
        click.echo(f"  removed {path.name}: a partial shard left by a killed run")
    for path, reason in summary.skipped:
        click.echo(f"  skipped {path}: {reason}")


def check_shard(value):
    """--shard i/n, checked before any work (``extract.plan.parse_shard``)."""
    from raml.extract.plan import parse_shard

    if value is not None:
        try:
            parse_shard(value)
        except ValueError as err:
            raise click.BadParameter(str(err).split(": ", 1)[-1]) from None
    return value
