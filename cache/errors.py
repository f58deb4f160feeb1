"""The one error type a user is meant to read.

``UserError`` is what RAML raises for anything the user can fix: a missing or malformed file, a
wrong option, a cache of another backbone, an image that cannot be decoded. The command line shows
its message as one ``Error:`` line. Every other exception is a bug in RAML or a library and keeps
its traceback, so that it can be reported rather than mistaken for bad input.

It subclasses ``ValueError`` so that library callers catching ``ValueError`` keep working.
"""


class UserError(ValueError):
    """An error the user can fix; the message says what is wrong and, where it helps, what to do."""


class CacheError(UserError):
    """A cache directory that cannot be read or written as asked."""
