"""RAML command line: ``python pipeline.py COMMAND --help`` for each command.

Stage one:  extract                       images → HDF5 feature shards (runs CLIP once per image)
Stage two:  train                         cached features → RAML head
Evaluate:   evaluate, report, sweep, ablate, baseline, demo
Deploy:     predict, export
Tools:      status, info, bench extract, bench train, bench predict, bench cache, bench maps

This file only assembles the command line: each command is defined beside the code it runs
(extract/cli.py, train/cli.py, evaluate/cli.py, evaluate/baselines/cli.py, evaluate/deploy/cli.py,
cache/cli.py), and the root group reads raml.toml into click's default_map (cache/config_file.py).
Without paths, commands use the workspace under the working directory (cache/workspace.py).
"""
from __future__ import annotations

import os

import click

from cache.cli import bench_cache, fail_cleanly, info
from cache.config_file import load_default_map
from evaluate.baselines.cli import baseline
from evaluate.cli import ablate, bench_maps, demo, evaluate, report, status, sweep
from evaluate.deploy.cli import bench_predict, export, predict
from extract.cli import bench_extract, extract
from train.cli import bench_train, train

# open_clip retries a failing download for ~45 s; RAML_OFFLINE=1 (or HF_HUB_OFFLINE=1) fails at once.
if os.environ.get("RAML_OFFLINE") == "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.pass_context
@fail_cleanly
def cli(ctx):
    """RAML: industrial anomaly detection with a 21-crop CLIP pyramid and a small trained head.

    Defaults for any option come from raml.toml in the working directory (or the file named by
    RAML_CONFIG); the command line wins. Without paths, commands use the workspace: datasets/,
    features/, runs/, results/ (python pipeline.py status shows it).
    """
    # Read at each invocation, not at import: the file is the working directory's (tests and the
    # demo run several command lines in one process). Sub-command contexts take their table from it.
    ctx.default_map = load_default_map(ctx.command)


@cli.group()
def bench():
    """Measure speed on this machine (not tests: figures go to notes and the README)."""


for command in (extract, info, train, sweep, ablate, evaluate, report, baseline, predict, export, demo, status):
    cli.add_command(command)
for command in (bench_extract, bench_train, bench_predict, bench_cache, bench_maps):
    bench.add_command(command)


if __name__ == "__main__":
    cli()
