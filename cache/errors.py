"""The one error type a user is meant to read.

``UserError`` is what RAML raises for anything the user can fix: a missing or malformed file, a
wrong option, a cache of another backbone, an image that cannot be decoded. The command line shows
its message as one ``Error:`` line. Every other exception is a bug in RAML or a library: the
command line says so in a short message, naming what was being processed (``working_on``), and
writes its traceback to a log file, so that it can be reported rather than mistaken for bad input.

It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""
import contextlib
import json
from pathlib import Path


class UserError(ValueError):
    """An error the user can fix; the message says what is wrong and, where it helps, what to do."""


class OptionError(UserError):
    """A command-line option whose value is wrong in a way only the command can tell (a model name
    open_clip does not know, a category the dataset lacks): shown as click's usage error for
    ``option`` (exit status 2), like a value click itself refused."""

    def __init__(self, option: str, reason: str):
        super().__init__(f"{option}: {reason}")
        self.option, self.reason = option, reason


class CacheError(UserError):
    """A cache directory that cannot be read or written as asked."""


@contextlib.contextmanager
def working_on(what: str):
    """Say what the code inside is processing (an image, a shard, a checkpoint): an unexpected
    exception raised inside carries it (``err.raml_working_on``, the innermost wins), and the
    command line's error message names it (``cache.cli.fail_cleanly``)."""
    try:
        yield
    except Exception as err:
        if getattr(err, "raml_working_on", None) is None:
            err.raml_working_on = what
        raise


def read_json_checked(path, problem=None, *, error=UserError, advice: str = ""):
    """The JSON value in ``path``; ``error`` naming the file when it is not UTF-8 JSON or when
    ``problem(value)`` says why it is not what the caller reads (``advice``: appended to either)."""
    try:
        value = json.loads(Path(path).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise error(f"{path}: not valid JSON ({err}){advice}") from None
    reason = problem(value) if problem else None
    if reason:
        raise error(f"{path}: {reason}{advice}")
    return value
