"""The errors a user is meant to read, and how their messages name files and sizes.

``UserError`` is what RAML raises for anything the user can fix: a missing or malformed file, a
wrong option, a cache of another backbone, an image that cannot be decoded. The command line shows
its message as one ``Error:`` line. Every other exception is a bug in RAML or a library: the
command line says so in a short message, naming what was being processed (``working_on``), and
writes its traceback to a log file, so that it can be reported rather than mistaken for bad input.

It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""

import contextlib


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


def human_bytes(nbytes: float) -> str:
    """``1234567`` → ``"1.2 MB"`` (decimal units, as file systems and ``df -H`` count)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(nbytes) < 1000:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} TB"


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (Python's surrogate escapes) written as
    ``\\xNN``: what RAML shows and stores for a name that is not valid UTF-8."""
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name decodes to: show it as \\udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
