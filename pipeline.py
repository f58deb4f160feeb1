"""RAML command line: ``raml COMMAND --help`` (or ``python pipeline.py COMMAND --help`` in a
checkout) for each command.

Stage one:  extract                       images → HDF5 feature shards (runs CLIP once per image)
Stage two:  train                         cached features → RAML head
Evaluate:   evaluate, report, sweep, ablate, baseline, demo
Deploy:     predict, export, calibrate, serve
Tracking:   track                         send run, sweep, ablation and results directories to MLflow
Tools:      status, info, bench extract, bench train, bench predict, bench serve, bench cache, bench maps

This file only assembles the command line: each command is defined beside the code it runs
(extract/cli.py, train/cli.py, evaluate/cli.py and sweep_cli.py, evaluate/baselines/cli.py, evaluate/deploy/cli.py and
serve_cli.py, cache/cli.py), and the root group reads raml.toml into click's default_map (cli/config_file.py).
Without paths, commands use the workspace under the working directory (cli/workspace.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def _checkout_as_package() -> None:
    """Run as ``python pipeline.py``: import this checkout as the package ``raml`` (installed or
    not, so that a checkout never runs another copy's code), and take the checkout's root off
    ``sys.path`` so that its folders do not shadow other packages (``evaluate`` is also Hugging
    Face's)."""
    import importlib.machinery
    import importlib.util

    root = Path(__file__).resolve().parent
    spec = importlib.machinery.ModuleSpec("raml", None, is_package=True)
    spec.submodule_search_locations = [str(root)]
    sys.modules["raml"] = importlib.util.module_from_spec(spec)
    sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != root]


# "__mp_main__": the same script imported again in a worker process started fresh (forkserver,
# spawn), which must find the package as its parent did.
if __name__ in ("__main__", "__mp_main__"):
    _checkout_as_package()

import click  # noqa: E402  (after the checkout is the package raml)

from raml.cache.cli import bench_cache, info
from raml.cli.config_file import load_default_map
from raml.cli.failures import fail_cleanly
from raml.cli.tracked_runs import track
from raml.cli.version import version
from raml.evaluate.baselines.cli import baseline
from raml.evaluate.cli import bench_maps, evaluate, report, status
from raml.evaluate.deploy.cli import bench_predict, export, predict
from raml.evaluate.deploy.serve_cli import bench_serve, calibrate, serve
from raml.evaluate.sweep_cli import ablate, demo, sweep
from raml.extract.bench_cli import bench_extract
from raml.extract.cli import extract
from raml.train.cli import bench_train, train

# open_clip retries a failing download for ~45 s; RAML_OFFLINE=1 (or HF_HUB_OFFLINE=1) fails at once.
if os.environ.get("RAML_OFFLINE") == "1":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(version(), "--version", "-V", prog_name="raml", message="%(prog)s %(version)s")
@click.pass_context
@fail_cleanly
def cli(ctx):
    """RAML: industrial anomaly detection with a 21-crop CLIP pyramid and a small trained head.

    Defaults for any option come from raml.toml in the working directory (or the file named by
    RAML_CONFIG); the command line wins. Without paths, commands use the workspace: datasets/,
    features/, runs/, results/ (raml status shows it).
    """
    # Read at each invocation, not at import: the file is the working directory's (tests and the
    # demo run several command lines in one process). Sub-command contexts take their table from it.
    ctx.default_map = load_default_map(ctx.command)


@cli.group()
def bench():
    """Measure speed on this machine (not tests: figures go to docs/benchmarks.md)."""


for command in (
    extract,
    info,
    train,
    sweep,
    ablate,
    evaluate,
    report,
    baseline,
    predict,
    export,
    calibrate,
    serve,
    demo,
    status,
    track,
):
    cli.add_command(command)
for command in (bench_extract, bench_train, bench_predict, bench_serve, bench_cache, bench_maps):
    bench.add_command(command)


def main():
    """The ``raml`` console command."""
    cli()


if __name__ == "__main__":
    main()
