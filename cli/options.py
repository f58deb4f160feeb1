"""The command-line pieces every command shares: click types for numbers, lists, devices and
switches, option helpers, and how a command reports what it chose and its progress."""

from __future__ import annotations

import math
import os
import re
import sys

import click

from raml.train.config import SCORE_WEIGHT as TRAIN_SCORE_WEIGHT


def show_progress() -> bool:
    """Progress bars on a terminal (or with RAML_PROGRESS=1), not in logs and pipes."""
    return sys.stderr.isatty() or os.environ.get("RAML_PROGRESS") == "1"


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


SEED = click.IntRange(0, 2**32 - 1)  # what numpy's and torch's generators take
JOBS = click.IntRange(1, 256)  # worker processes
THREADS = click.IntRange(1, 1024)
# a weight of s_visual or s_text in s_final: train/config.py's bounds, [0, 1]
SCORE_WEIGHT = FiniteFloat(TRAIN_SCORE_WEIGHT.low, TRAIN_SCORE_WEIGHT.high)
seed_list = text_list(
    int, check=lambda seed: 0 <= seed < 2**32, accepted="comma-separated seeds (whole numbers from 0 to 4294967295)"
)


def non_empty(ctx, param, text):
    """A click callback refusing empty text."""
    if text is not None and not str(text).strip():
        raise click.BadParameter("must not be empty")
    return text
