"""The commands that put a trained model to work on new images: ``predict``, ``export`` (a
deployment that needs no torch) and ``bench predict``."""

from __future__ import annotations

import os

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import (
    SCORE_WEIGHT,
    echo_chosen,
    given_on_command_line,
    non_empty,
    show_progress,
    text_list,
    with_options,
)
from raml.cli.workspace import results_dir
from raml.errors import UserError
from raml.evaluate.workspace import newest_run_dir, run_label
from raml.extract.cli import (
    IMAGE_SIDE,
    backbone_options,
    checkpoint_backbone_options,
    chosen_dataset_root,
    load_backbone_from,
)
from raml.extract.engine_cli import (
    compare_options,
    engine_backbones,
    engine_options,
    fidelity_sample_option,
    gated_backbone,
)


@click.command()
@click.argument("files", nargs=-1, required=True)
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    help="Training run directory or checkpoint.pt. Default: the newest finished training run under ./runs/.",
)
@click.option(
    "--category",
    required=True,
    callback=non_empty,
    help="What the images show, e.g. bottle (used in the text prompts).",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Directory for predictions.csv and the anomaly maps. Default: ./results/predictions/<run>/.",
)
@checkpoint_backbone_options
@click.option(
    "--visual-weight", type=SCORE_WEIGHT, default=None, help="Weight of s_visual (default: the checkpoint's)."
)
@click.option("--text-weight", type=SCORE_WEIGHT, default=None, help="Weight of s_text (default: the checkpoint's).")
@click.option(
    "--heatmaps/--no-heatmaps",
    default=True,
    show_default=True,
    help="Write each image's anomaly map at its resolution (NAME_map.npy, float32) and its overlay (NAME_overlay.png).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Refuse a category that has no decision threshold of its own in the checkpoint (instead of "
    "deciding at the pooled threshold, as said in the output).",
)
@click.option(
    "--deployment",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="Decide at the category's threshold in this deployment's deploy.json (exported from this "
    "checkpoint, e.g. set by raml calibrate from your good images) instead of the checkpoint's.",
)
@engine_options(default="auto")
@fail_cleanly
def predict(
    files,
    checkpoint,
    category,
    out,
    model,
    pretrained,
    weights,
    random_weights,
    device,
    visual_weight,
    text_weight,
    heatmaps,
    strict,
    deployment,
    engine,
    fidelity_sample,
):
    """Score new images (files or folders) with a trained checkpoint.

    Prints file, score and decision at the category's threshold; writes OUT/predictions.csv and each
    image's anomaly map (the run's pixel head, or zero-shot text without one) with its overlay. The
    backbone is the checkpoint's unless options say otherwise (they must agree with it). Unreadable
    files get an error line; the exit status is then 1.
    """
    from raml.evaluate.deploy.predict import backbone_options_for, map_kind, predict_files, prediction_table
    from raml.train.checkpoint import load_checkpoint
    from raml.train.thresholds import pooled_reason, threshold_for, threshold_note, threshold_source

    checkpoint = checkpoint or newest_run_dir(sweeps=False)
    out = out or echo_chosen("results", results_dir("predictions", run_label([checkpoint])))
    trained = load_checkpoint(checkpoint)
    options = backbone_options_for(trained.fingerprint, model, pretrained, weights, random_weights)
    if category not in trained.categories:
        click.secho(
            f"note: the checkpoint was trained on {', '.join(trained.categories)}, not {category!r}: "
            "scoring it is a transfer.",
            fg="yellow",
            err=True,
        )
    if deployment:
        from raml.evaluate.deploy.calibrate import deployment_threshold

        threshold, source = deployment_threshold(deployment, trained, category)
    else:
        threshold, source = threshold_for(trained, category), threshold_source(trained, category)
    note = None if deployment else threshold_note(trained, category)
    if note and strict:
        raise UserError(
            f"--strict: {checkpoint} has no decision threshold of its own for {category!r} "
            f"({pooled_reason(trained, category)}); without --strict the pooled threshold "
            f"{threshold_for(trained, category):.4f} applies, and the output says so"
        )
    if note:
        click.secho(f"note: {note}", fg="yellow", err=True)
    from raml.evaluate.deploy.int8_check import check_for_predict
    from raml.evaluate.deploy.predict import collect_files

    backbone = gated_backbone(
        load_backbone_from(**options, device=device),
        engine,
        lambda reduced: check_for_predict(reduced, collect_files(files), trained, category, sample=fidelity_sample),
    )
    predictions = predict_files(
        files,
        trained,
        category,
        out,
        backbone,
        visual_weight=visual_weight,
        text_weight=text_weight,
        heatmaps=heatmaps,
        progress=show_progress(),
        threshold=threshold,
    )
    click.echo(prediction_table(predictions, threshold, source))
    if backbone.random_weights:
        click.secho("RANDOM WEIGHTS: these scores are NOT MEANINGFUL.", fg="yellow")
    click.echo(
        f"→ {out}/predictions.csv" + (f", {out}/*_map.npy and *_overlay.png ({map_kind(trained)})" if heatmaps else "")
    )
    failed = [p for p in predictions if p.error]
    if failed:
        raise UserError(f"{len(failed)} of {len(predictions)} files could not be scored (see ERROR lines above)")


@click.command()
@click.option(
    "--checkpoint",
    type=click.Path(exists=True),
    help="Training run directory or checkpoint.pt. Default: the newest finished training run under ./runs/.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    default=None,
    help="Deployment directory (created; an earlier export in it is replaced). Default: ./results/export/<run>/.",
)
@click.option(
    "--categories",
    default=None,
    callback=text_list(accepted="comma-separated category names"),
    help="Comma-separated categories to bake in (default: the checkpoint's).",
)
@checkpoint_backbone_options
@click.option(
    "--format",
    "runtime",
    type=click.Choice(["onnx", "openvino"]),
    default="onnx",
    show_default=True,
    help="The encoder's file: ONNX (run by onnxruntime), or OpenVINO IR (encoder.xml/.bin, run by OpenVINO; "
    "pip install 'raml[openvino]' here and openvino where it runs).",
)
@click.option(
    "--precision",
    type=click.Choice(["fp32", "int8", "bf16"]),
    default="fp32",
    show_default=True,
    help="Encoder to deploy: fp32, int8 (faster on CPUs) or bf16 (--format openvino, CPUs with bf16 arithmetic); "
    "below fp32 it is checked against fp32 on your own images from --dataset/--root first, and refused below "
    "its limits.",
)
@click.option(
    "--dataset",
    type=click.Choice(["mvtec", "visa", "folder", "textile"]),
    default=None,
    help="With --precision int8: the dataset whose images (of the exported categories) the check uses.",
)
@click.option(
    "--root",
    type=click.Path(file_okay=False),
    default=None,
    help="Its root. Default: ./datasets/<dataset> or $RAML_DATA/<dataset> (textile needs none).",
)
@fidelity_sample_option("--precision int8 or bf16")
@fail_cleanly
def export(
    checkpoint,
    out,
    categories,
    model,
    pretrained,
    weights,
    random_weights,
    device,
    runtime,
    precision,
    dataset,
    root,
    fidelity_sample,
):
    """Write a deployment that needs no torch: encoder.onnx (or encoder.xml/.bin with --format
    openvino), head.onnx, deploy.json, predict_onnx.py.

    The backbone is the checkpoint's unless options say otherwise (they must agree with it). Then,
    with only onnxruntime, numpy and pillow: python OUT/predict_onnx.py part.png [--category bottle].
    """
    from raml.evaluate.deploy.export import export_deployment
    from raml.evaluate.deploy.predict import backbone_options_for
    from raml.train.checkpoint import load_checkpoint

    if precision == "fp32" and (dataset or root):
        if given_on_command_line("dataset") or given_on_command_line("root"):
            raise UserError(
                "--dataset/--root give the images of the fidelity check: pass --precision int8 or bf16 with them"
            )
        dataset = root = None  # raml.toml's, meant for the other commands
    checkpoint = checkpoint or newest_run_dir(sweeps=False)
    out = out or echo_chosen("deployment", results_dir("export", run_label([checkpoint])))
    root = chosen_dataset_root(dataset, root) if dataset else root
    trained = load_checkpoint(checkpoint)
    options = backbone_options_for(trained.fingerprint, model, pretrained, weights, random_weights)  # before CLIP
    backbone = load_backbone_from(**options, device=device)
    deploy = export_deployment(
        trained,
        out,
        backbone,
        categories=categories,
        log=lambda line: click.secho(line, fg="yellow", err=True),
        precision=precision,
        sample_dataset=(dataset, root) if dataset else None,
        fidelity_sample=fidelity_sample,
        runtime=runtime,
    )
    thresholds = ", ".join(f"{c} {t:.4f}" for c, t in deploy["thresholds"].items())
    encoder = deploy["encoder"]
    encoder_check = (
        f"max |onnx - torch| {encoder['max_abs_diff_vs_torch']:.1e}"
        if precision == "fp32"
        else encoder["fidelity"]["summary"]
    )
    click.echo(
        f"export: {deploy['backbone']} ({deploy['weights']}), categories {', '.join(deploy['categories'])}; "
        f"thresholds {thresholds}; {precision} encoder: {encoder_check}; head: max |onnx - torch| "
        f"{deploy['head']['max_abs_diff_vs_torch']:.1e}; {deploy['export_seconds']} s → {out}"
    )
    click.echo(
        f"  run it with: python {os.path.join(out, 'predict_onnx.py')} IMAGE... (needs only onnxruntime, "
        f"{'openvino, ' if runtime == 'openvino' else ''}numpy, pillow)"
    )
    if deploy["random_weights"]:
        click.secho(deploy["warning"], fg="yellow")


@click.command("predict")
@backbone_options
@click.option(
    "--images",
    type=click.IntRange(1, 1000),
    default=3,
    show_default=True,
    help="Per round: predict on 1 and on 1 + IMAGES synthetic images; per image = the difference / IMAGES.",
)
@click.option("--size", type=IMAGE_SIDE, default=900, show_default=True, help="Side of the synthetic images (px).")
@click.option(
    "--winclip/--no-winclip",
    default=True,
    show_default=True,
    help="Also time zero-shot WinCLIP (our baseline winclip, torch) per image on the same images.",
)
@with_options(compare_options)
@fail_cleanly
def bench_predict(model, pretrained, weights, random_weights, device, images, size, winclip, engines, rounds):
    """Seconds per image of a whole predict with each of --engines, against the floors of this CPU's
    precisions and against WinCLIP zero-shot. The head is untrained: speed only."""
    from raml.evaluate.deploy.bench import compare_predict
    from raml.extract.model_config import WINCLIP_MODEL, WINCLIP_PRETRAINED

    if not engines:
        raise UserError("--engines: name at least one engine to time")
    backbone = load_backbone_from(model, pretrained, weights, random_weights, device)
    winclip_backbone = (
        load_backbone_from(WINCLIP_MODEL, WINCLIP_PRETRAINED, None, random_weights, device) if winclip else None
    )
    result = compare_predict(
        engine_backbones(backbone, engines), images=images, size=size, rounds=rounds, winclip_backbone=winclip_backbone
    )
    for line in result.lines():
        click.echo(line)
