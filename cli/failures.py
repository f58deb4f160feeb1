"""How every command shows an error: ``fail_cleanly`` turns RAML's errors into one ``Error:`` line
(or click's usage error for an option) and a bug into a short message with a log file."""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import click

from raml.cache.files import atomic_write_text, make_dirs, user_cache_root, write_fault
from raml.errors import OptionError, UserError


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
    return (
        f"unexpected {type(err).__name__} in `{command}`{where}: {first}. This is a bug in RAML or a library, not "
        f"your input: {saved} (RAML_DEBUG=1 prints it here); please include it when you report the bug."
    )
