"""The command-line pieces every stage shares, and the cache's own commands (``info``,
``bench cache``). Each stage defines its commands beside its code (extract/cli.py, train/cli.py,
evaluate/cli.py, ...); pipeline.py assembles them into one command line.
"""
from __future__ import annotations

import functools
import math
import os
import re
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from cache.errors import OptionError, UserError
from cache.files import atomic_write_text, make_dirs, user_cache_root, write_fault


def show_progress() -> bool:
    """Progress bars on a terminal (or with RAML_PROGRESS=1), not in logs and pipes."""
    return sys.stderr.isatty() or os.environ.get("RAML_PROGRESS") == "1"


def fail_cleanly(func):
    """Every command's errors, as a user should see them: one ``Error:`` line, exit status 1.

    - ``OptionError``: click's usage error for that option (exit status 2), as for a value click refused.
    - ``UserError`` (bad data, missing weights, wrong cache or option) and missing files: the message.
    - A file that cannot be written (a full or read-only disk, no permission:
      ``cache.files.WRITE_FAULTS``), wherever it happens: the path and the cause in words.
    - Anything else is a bug in RAML or a library: a short message with the command, the exception,
      what was being processed (``cache.errors.working_on``) and the log file its traceback was written
      to; ``RAML_DEBUG=1`` lets the traceback through instead. click's own exceptions pass unchanged.
    """
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except OptionError as err:
            raise click.BadParameter(err.reason, param_hint=f"'{err.option}'") from err
        except (UserError, FileNotFoundError) as err:
            raise click.ClickException(str(err)) from err
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except Exception as err:
            fault = write_fault(err)
            if fault is not None:
                raise click.ClickException(str(fault)) from err
            if os.environ.get("RAML_DEBUG") == "1":
                raise
            raise click.ClickException(unexpected_error_message(err)) from err
    return wrapper


def unexpected_error_message(err: Exception) -> str:
    """The one line for a bug: the command, what it was processing, the exception, and the log file
    holding the traceback (``user_cache_root()/logs``, else the temporary directory)."""
    context = click.get_current_context(silent=True)
    command = context.command_path if context is not None else "raml"
    text = "".join(traceback.format_exception(err))
    name = f"error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log = None
    for directory in (user_cache_root() / "logs", Path(tempfile.gettempdir())):
        try:
            make_dirs(directory)
            atomic_write_text(directory / name, f"{command}\n{' '.join(sys.argv)}\n\n{text}")
            log = directory / name
            break
        except (OSError, UserError):
            continue
    where = f" while processing {err.raml_working_on}" if getattr(err, "raml_working_on", None) else ""
    first = (str(err).strip().splitlines() or [""])[0][:300]
    saved = f"its traceback is in {log}" if log else "no log file could be written"
    return (f"unexpected {type(err).__name__} in `{command}`{where}: {first}. This is a bug in RAML or a library, not "
            f"your input: {saved} (RAML_DEBUG=1 prints it here); please include it when you report the bug.")


def with_options(options):
    """Apply a list of click options to a command, in the order listed."""
    def decorate(func):
        for option in reversed(options):
            func = option(func)
        return func
    return decorate


class FiniteFloat(click.FloatRange):
    """click's ``FloatRange`` that also refuses NaN and ±inf: a number option takes finite numbers."""

    name = "float"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


def given_on_command_line(name: str) -> bool:
    """Whether the current command's parameter ``name`` was typed on the command line (not a default,
    nor raml.toml's)."""
    return click.get_current_context().get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE


def echo_chosen(what: str, path, why: str = ""):
    """Say which path a command chose where none was given (one line: ``cache: features/mvtec/...``);
    returns ``path``."""
    click.echo(f"{what}: {path}" + (f"  ({why})" if why else ""))
    return path


class OnOff(click.types.BoolParamType):
    """click's boolean (on/off, true/false, yes/no, 1/0) without its empty string for False."""

    def convert(self, value, param, ctx):
        if isinstance(value, str) and not value.strip():
            self.fail("'' is not a switch: on or off.", param, ctx)
        return super().convert(value, param, ctx)


ON_OFF = OnOff()


class CheckedText(click.ParamType):
    """Text that ``check`` accepts; ``accepted`` says what that is (the error message shows it)."""

    name = "text"

    def __init__(self, check, accepted: str):
        self.check, self.accepted = check, accepted

    def convert(self, value, param, ctx):
        if self.check(value):
            return value
        self.fail(f"{value!r}: expected {self.accepted}.", param, ctx)


class Device(click.ParamType):
    """A torch device: auto, cpu, cuda, cuda:N or mps (whether this machine has it is checked where
    it is used: ``extract.encoder.resolve_device``)."""

    name = "device"

    def convert(self, value, param, ctx):
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", str(value)):
            return value
        self.fail(f"{value!r} is not a device: auto, cpu, cuda, cuda:N or mps.", param, ctx)


def device_option(help_text: str):
    """--device, on every command that runs torch: ``help_text`` says what runs there."""
    return click.option("--device", type=Device(), default="auto", show_default=True, help=help_text)


def text_list(kind=str, *, choices=None, check=None, accepted: str = "", allow_empty: bool = False):
    """A click callback parsing a comma-separated list: each item converted by ``kind``, one of
    ``choices`` (when given) and passing ``check`` (when given); ``accepted`` says what is accepted.
    An empty list is refused unless ``allow_empty`` (None, the option left out, passes)."""
    def callback(ctx, param, text):
        if text is None:
            return None
        items = [item.strip() for item in str(text).split(",")]
        if not any(items):
            if allow_empty and not str(text).strip():
                return []
            raise click.BadParameter(f"{text!r}: expected {accepted or 'a comma-separated list'}")
        values = []
        for item in items:
            try:
                value = kind(item)
            except ValueError:
                value = None
            if not item or value is None or (choices and value not in choices) or (check and not check(value)):
                raise click.BadParameter(f"{item!r} in {text!r}: expected {accepted or 'a comma-separated list'}")
            values.append(value)
        return values
    return callback


SEED = click.IntRange(0, 2**32 - 1)     # what numpy's and torch's generators take
JOBS = click.IntRange(1, 256)           # worker processes
THREADS = click.IntRange(1, 1024)
SCORE_WEIGHT = FiniteFloat(0)           # a weight of s_visual or s_text in s_final
seed_list = text_list(int, check=lambda seed: 0 <= seed < 2**32,
                      accepted="comma-separated seeds (whole numbers from 0 to 4294967295)")


def non_empty(ctx, param, text):
    """A click callback refusing empty text."""
    if text is not None and not str(text).strip():
        raise click.BadParameter("must not be empty")
    return text


@click.command()
@click.option("--cache-dir", type=click.Path(file_okay=False, exists=True), required=True)
@fail_cleanly
def info(cache_dir):
    """Summarise a feature cache: backbone, images per category and label, skipped files, partial
    shards (being written, or left by a killed run)."""
    from cache import read_cache
    from cache.format import human_bytes, shards_bytes
    from cache.lock import partial_shard_status
    from cache.tokens import token_bytes_per_image
    table = read_cache(cache_dir, with_features=False)
    meta = table.meta
    config = (meta.get("model_config") or "config not recorded")[:19]   # "sha256:" and 12 hex digits
    click.echo(f"{cache_dir}: {len(table)} images, backbone {meta['backbone']} ({config}; {meta['weights']}), "
               f"input {meta['input_size']} px, D={meta['embed_dim']}, engines {', '.join(table.engines) or '-'}")
    if meta["random_weights"]:
        click.secho("  random weights: features are meaningless", fg="yellow")
    on_disk = shards_bytes(cache_dir)
    click.echo(f"  size on disk: {human_bytes(on_disk)} in shards"
               + (f", {human_bytes(on_disk / len(table))} per image" if len(table) else ""))
    setting = table.token_setting
    if setting:
        per_image = token_bytes_per_image(setting)
        click.echo(f"  patch tokens: {int(table.has_tokens.sum())} of {len(table)} images ({setting['tokens']} tokens of "
                   f"{setting['embed_dim']} values, {setting['per_tile']}x{setting['per_tile']} per 4x4 tile, float16: "
                   f"{human_bytes(per_image)} per image with the mask targets)")
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
    from cache.bench import run_cache_read_bench
    from cache.synthetic import write_synthetic_cache
    with tempfile.TemporaryDirectory(prefix="raml-bench-cache-") as work:
        source = Path(cache_dir) if cache_dir else write_synthetic_cache(Path(work) / "mvtec-shape")
        click.echo(run_cache_read_bench(source, Path(work)).line())
