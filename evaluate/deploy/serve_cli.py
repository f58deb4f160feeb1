"""The commands that put a deployment on the line: ``serve`` (HTTP), ``calibrate`` (thresholds from
the user's good images) and ``bench serve`` (a load test). None of them imports torch: they run
the deployment's own scorer (predict_onnx.py) on ONNX Runtime."""

from __future__ import annotations

import click

from raml.cli.failures import fail_cleanly
from raml.cli.options import CheckedText, FiniteFloat, non_empty, show_progress, text_list
from raml.errors import UserError
from raml.evaluate.deploy.serve_settings import MIN_TOKEN_LENGTH, ServeSettings, is_listen_address, is_loopback

DEPLOY_DIR = click.Path(exists=True, file_okay=False)
RATE = FiniteFloat(0, 1, min_open=True, max_open=True)

DEFAULTS = ServeSettings()
HOST = CheckedText(is_listen_address, "an IP address or a host name, e.g. 127.0.0.1 or 0.0.0.0")
TOKEN = CheckedText(lambda text: len(text) >= MIN_TOKEN_LENGTH, f"a secret of at least {MIN_TOKEN_LENGTH} characters")


def _need_web_stack() -> None:
    import importlib.util

    missing = [name for name in ("starlette", "uvicorn", "multipart") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"raml serve needs its web stack, which is not installed ({', '.join(missing)}): pip install 'raml[serve]'"
        )


@click.command()
@click.argument("deploy_dir", type=DEPLOY_DIR)
@click.option(
    "--host",
    type=HOST,
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (beyond the loopback: a token is required).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one, printed)."
)
@click.option(
    "--token",
    type=TOKEN,
    envvar="RAML_SERVE_TOKEN",
    show_envvar=True,
    default=None,
    help="Bearer token every /v1/ request must carry (16+ characters). Prefer the environment variable: "
    "an option shows in the process list.",
)
@click.option(
    "--max-upload-mb",
    type=FiniteFloat(0.01, 4096),
    default=DEFAULTS.max_upload_bytes / 2**20,
    show_default=True,
    help="Largest request body, MiB.",
)
@click.option(
    "--max-pixels",
    type=click.IntRange(1, 10**10),
    default=DEFAULTS.max_pixels,
    show_default=True,
    help="Largest image, pixels (refused from its header, before decoding).",
)
@click.option(
    "--max-images",
    type=click.IntRange(1, 256),
    default=DEFAULTS.max_images,
    show_default=True,
    help="Images per request at most.",
)
@click.option(
    "--max-batch",
    type=click.IntRange(1, 256),
    default=DEFAULTS.max_batch,
    show_default=True,
    help="Images per encoder call at most.",
)
@click.option(
    "--batch-wait-ms",
    type=FiniteFloat(0, 1000),
    default=DEFAULTS.batch_wait_ms,
    show_default=True,
    help="How long an image waits for others to share its encoder call.",
)
@click.option(
    "--decode-threads",
    type=click.IntRange(1, 64),
    default=DEFAULTS.decode_threads,
    show_default=True,
    help="Images decoded at once.",
)
@click.option(
    "--access-log/--no-access-log", default=True, show_default=True, help="Log each request (method, path, status)."
)
@fail_cleanly
def serve(
    deploy_dir,
    host,
    port,
    token,
    max_upload_mb,
    max_pixels,
    max_images,
    max_batch,
    batch_wait_ms,
    decode_threads,
    access_log,
):
    """Score images over HTTP with a deployment (raml export): POST /v1/score, GET /health, GET /v1/info,
    and a page at / to try it in a browser.

    Listens on 127.0.0.1 unless --host says otherwise; beyond the loopback a bearer token is required
    (RAML_SERVE_TOKEN). Concurrent requests share encoder calls (--max-batch, --batch-wait-ms). SIGTERM
    or Ctrl-C: the requests in flight finish, then it exits. docs/serving.md describes the API.
    """
    _need_web_stack()
    from raml.evaluate.deploy.serve_run import run_service

    settings = ServeSettings(
        token=token or None,
        max_upload_bytes=int(max_upload_mb * 2**20),
        max_pixels=max_pixels,
        max_images=max_images,
        max_batch=max_batch,
        batch_wait_ms=batch_wait_ms,
        decode_threads=decode_threads,
        loopback_only=is_loopback(host),
    )
    run_service(deploy_dir, host, port, settings, access_log=access_log, echo=lambda line: click.echo(line))


@click.command()
@click.argument("deploy_dir", type=DEPLOY_DIR)
@click.option(
    "--good",
    "good_dir",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    help="Good images: a folder per category (named as the deployment's), or one folder with --category.",
)
@click.option(
    "--false-alarms",
    type=RATE,
    default=0.01,
    show_default=True,
    help="False-alarm rate to allow on good parts (0.01 = 1 %); needs ceil((1-rate)/rate) good images: 99 for 0.01.",
)
@click.option("--category", default=None, callback=non_empty, help="The category of the images in --good (one folder).")
@fail_cleanly
def calibrate(deploy_dir, good_dir, false_alarms, category):
    """Set each category's decision threshold from your own good images, at a false-alarm rate you choose.

    The threshold is put just above the k-th smallest good score, k = ceil((n+1)(1-rate)): a new good
    part like these is flagged with probability at most RATE. Written into DEPLOY_DIR/deploy.json (with
    the number of images, the rate reached on them and the previous threshold); serve, predict_onnx.py
    and predict --deployment use it.
    """
    from raml.evaluate.deploy.calibrate import calibrate_deployment

    records = calibrate_deployment(deploy_dir, good_dir, false_alarms, category, progress=show_progress())
    for name, record in records.items():
        click.echo(
            f"{name}: threshold {record['threshold']:.6f} (was {record['previous_threshold']:.6f}: "
            f"{record['previous_source']}); the {record['rank']}th of {record['images']} good scores: "
            f"P(false alarm) <= {record['false_alarm_bound']:.4g} for new good parts, "
            f"{record['false_alarms_on_them']:.2%} on these images"
        )
    click.echo(f"→ {deploy_dir}/deploy.json (restart raml serve to use it)")


@click.command("serve")
@click.argument("deploy_dir", type=DEPLOY_DIR)
@click.option(
    "--clients",
    default="1,4,16",
    show_default=True,
    callback=text_list(int, check=lambda n: 1 <= n <= 256, accepted="comma-separated client counts (1 to 256)"),
    help="Concurrent clients, one level each.",
)
@click.option("--requests", type=click.IntRange(1, 10**6), default=300, show_default=True, help="Requests per level.")
@click.option(
    "--memory-requests",
    type=click.IntRange(101, 10**7),
    default=1000,
    show_default=True,
    help="Requests after which the service's memory is compared with that after the first 100.",
)
@click.option(
    "--time-limit", type=FiniteFloat(1, 3600), default=120, show_default=True, help="Seconds per level at most."
)
@click.option(
    "--size", type=click.IntRange(64, 8000), default=900, show_default=True, help="Side of the synthetic images (px)."
)
@click.option(
    "--category",
    default=None,
    callback=non_empty,
    help="Category the images are sent as (default: the deployment's first).",
)
@fail_cleanly
def bench_serve(deploy_dir, clients, requests, memory_requests, time_limit, size, category):
    """Load-test raml serve on 127.0.0.1 against the in-process scorer on the same images: images/s,
    latency p50/p95/p99, errors, and the service's memory growth. Stops by itself."""
    _need_web_stack()
    from raml.evaluate.deploy.bench_serve import bench_serve as run_bench
    from raml.evaluate.deploy.bench_serve import machine_line

    click.echo(machine_line())
    result = run_bench(
        deploy_dir,
        clients=clients,
        requests=requests,
        memory_requests=memory_requests,
        time_limit=time_limit,
        size=size,
        category=category,
        echo=click.echo,
    )
    for line in result.lines():
        click.echo(line)
    click.echo(machine_line())
