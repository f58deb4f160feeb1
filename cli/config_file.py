"""``raml.toml``: defaults for the options of every command, given to click as its ``default_map``.

The file is ``$RAML_CONFIG`` when that is set (``RAML_CONFIG=/dev/null`` reads none), else
``raml.toml`` in the working directory, else there are no defaults beyond the commands' own::

    model = "extract/model_configs/raml-tiny-test.json"   # or ViT-B-16
    random_weights = true
    [train]
    epochs = 10
    [baseline.winclip]
    batch_size = 4

- A key at the top level applies to every command that has that option; a table per command
  (``[train]``; ``[baseline]`` for every baseline, ``[baseline.winclip]`` for one) overrides it.
- Keys are the long option names, with ``-`` or ``_`` (``batch-size`` or ``batch_size``); values
  are TOML values of the option's type. The command line wins over the file.
- Relative paths (the values of path options, and a ``model`` naming a ``.json`` config) are
  relative to the file's directory, so a file named by RAML_CONFIG works from anywhere.
- The whole file is checked against the commands' own click parameters before any command runs:
  an unknown key, a table that names no command or a bad value (type, choice, range) is an error
  naming the file, the key and what it accepts. A top-level key that only some commands have is
  fine.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path

import click

from raml.errors import UserError

CONFIG_ENV = "RAML_CONFIG"
CONFIG_FILE = "raml.toml"
_ACCEPTED = {click.INT: "an integer", click.FLOAT: "a number", click.BOOL: "true or false", click.STRING: "a string"}


def config_path() -> Path | None:
    """The file named by ``$RAML_CONFIG``, else ``./raml.toml`` if it exists, else None."""
    named = os.environ.get(CONFIG_ENV)
    if named:
        path = Path(named).expanduser()
        if not path.exists():
            raise UserError(f"{CONFIG_ENV}={named}: no such file (unset {CONFIG_ENV} to use ./{CONFIG_FILE})")
        return path
    return Path(CONFIG_FILE) if Path(CONFIG_FILE).is_file() else None


def read_toml(path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # Python 3.10: the same parser, as a package
        try:
            import tomli as tomllib
        except ImportError:
            raise UserError(
                f"{path}: reading a TOML file needs Python >= 3.11 or the package tomli "
                f"(pip install tomli); or remove the file (unset {CONFIG_ENV})"
            ) from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"{path}: not valid TOML ({err})") from None


def load_default_map(root: click.Group) -> dict | None:
    """The ``default_map`` for ``root``'s command line, from the config file; None without one."""
    path = config_path()
    if path is None:
        return None
    return default_map(root, read_toml(path), path)


def default_map(root: click.Group, settings: dict, path: Path) -> dict:
    """Check ``settings`` (a parsed config file) against ``root``'s commands and turn it into click's
    ``default_map``: ``{command: {param name: value}}``, nested for groups (``bench``, ``baseline``)."""
    return _group_defaults(root, settings, {}, [], path)


def _group_defaults(group: click.Group, table: dict, inherited: dict, where: list, path: Path) -> dict:
    scalars, tables = _split(table, where, path)
    for name in tables:
        if name not in group.commands:
            close = difflib.get_close_matches(name, group.commands, n=1)
            raise UserError(
                f"{path}: {_place(where + [name])} is not a command"
                + (f" (did you mean {_place(where + close)}?)" if close else "")
                + "; tables are named after commands: "
                + ", ".join(_place(where + [command]) for command in sorted(group.commands))
                + "."
            )
    known = _options_beneath(group)
    for key in scalars:
        if key not in known:
            if where:
                hint = f"{_place(where)} takes the long options of its commands: {', '.join(sorted(known))}"
            else:
                hint = (
                    "top-level keys are the long options of any command (raml COMMAND --help "
                    "lists them); tables are named after commands: "
                    + ", ".join(f"[{name}]" for name in sorted(group.commands))
                )
            _unknown_key(key, known, where, path, hint)
    here = {**inherited, **{key: (value, where) for key, value in scalars.items()}}
    result = {}
    for name, command in group.commands.items():
        sub = (_group_defaults if isinstance(command, click.Group) else _command_defaults)(
            command, tables.get(name, {}), here, where + [name], path
        )
        if sub:
            result[name] = sub
    return result


def _command_defaults(command: click.Command, table: dict, inherited: dict, where: list, path: Path) -> dict:
    scalars, tables = _split(table, where, path)
    if tables:
        raise UserError(f"{path}: [{'.'.join(where + [next(iter(tables))])}]: {' '.join(where)} has no sub-commands")
    options = _long_options(command)
    for key in scalars:
        if key not in options:
            _unknown_key(
                key,
                options,
                where,
                path,
                f"{_place(where)} takes the long options of raml {' '.join(where)}: {', '.join(sorted(options))}",
            )
    chosen = {key: found for key, found in inherited.items() if key in options}
    chosen.update({key: (value, where) for key, value in scalars.items()})
    return {
        options[key].name: _checked(command, options[key], key, value, source, where, path)
        for key, (value, source) in chosen.items()
    }


def _split(table: dict, where: list, path: Path) -> tuple[dict, dict]:
    """A table's option values (keys normalised to ``_``) and its sub-tables."""
    scalars, tables = {}, {}
    for key, value in table.items():
        if isinstance(value, dict):
            tables[key] = value
            continue
        name = key.replace("-", "_")
        if name in scalars:
            raise UserError(f"{path}: {_place(where)} gives {name!r} twice (as - and _ spellings)")
        scalars[name] = value
    return scalars, tables


def _long_options(command: click.Command) -> dict:
    """{long option name with ``_``: its click parameter} of one command."""
    return {
        opt[2:].replace("-", "_"): param
        for param in command.params
        if isinstance(param, click.Option)
        for opt in param.opts
        if opt.startswith("--")
    }


def _options_beneath(group: click.Group) -> set:
    names = set()
    for command in group.commands.values():
        names |= _options_beneath(command) if isinstance(command, click.Group) else set(_long_options(command))
    return names


def _place(where: list) -> str:
    return f"[{'.'.join(where)}]" if where else "the top level"


def _unknown_key(key: str, known, where: list, path: Path, hint: str):
    close = difflib.get_close_matches(key, known, n=3)
    suggestion = f" Did you mean {' or '.join(repr(name) for name in close)}?" if close else ""
    raise UserError(f"{path}: unknown key {key!r} at {_place(where)}.{suggestion} {hint[0].upper()}{hint[1:]}.")


def _checked(command: click.Command, param: click.Option, key: str, value, source: list, where: list, path: Path):
    """``value`` for ``param`` of ``command``, with a relative path made relative to the file's
    directory; raises ``UserError`` naming the file and the key when click would refuse it."""
    given_at = _place(source) + ("" if source == where else f", for raml {' '.join(where)}")
    problem = _toml_type_problem(param, value)
    if problem is None:
        value = _relative_to(path.parent, param, value)
        try:
            # A path is checked when its command runs (click says if it must exist and does not):
            # a cache that extract has yet to write is no error in the file.
            if not isinstance(param.type, click.Path):
                param.process_value(click.Context(command, info_name=where[-1]), value)
        except click.BadParameter as err:
            problem = err.format_message()
    if problem:
        accepted = _accepted(param)
        raise UserError(
            f"{path}: {key} = {value!r} at {given_at}: {problem}" + (f" Accepted: {accepted}." if accepted else "")
        )
    return value


def _toml_type_problem(param: click.Option, value) -> str | None:
    """What the file should not say although click's conversion would let it through (it converts
    2.5 to the integer 2, true to 1, and a string to a list of its letters), or a path that is no string."""
    if param.multiple:
        return None if isinstance(value, list) else 'this option takes a list (a TOML array, e.g. ["a", "b"]).'
    if isinstance(value, list):
        return "this option takes one value, not a list."
    if isinstance(param.type, click.Path) and not isinstance(value, str):
        return f"{value!r} is not a path (a string)."
    if isinstance(param.type, click.types.IntParamType) and (isinstance(value, bool) or not isinstance(value, int)):
        return f"{value!r} is not an integer."
    if isinstance(param.type, click.types.FloatParamType) and (
        isinstance(value, bool) or not isinstance(value, (int, float))
    ):
        return f"{value!r} is not a number."
    return None


def _relative_to(base: Path, param: click.Option, value):
    is_path = isinstance(param.type, click.Path) or (param.name == "model" and str(value).endswith(".json"))
    if is_path and isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
        return str(base / value)
    return value


def _accepted(param: click.Option) -> str | None:
    kind = param.type
    if isinstance(kind, click.Choice):
        return None  # click's message lists the choices
    if isinstance(kind, (click.IntRange, click.FloatRange)):
        bounds = [
            f"{'>' if kind.min_open else '>='} {kind.min}" if kind.min is not None else "",
            f"{'<' if kind.max_open else '<='} {kind.max}" if kind.max is not None else "",
        ]
        number = "an integer" if isinstance(kind, click.IntRange) else "a number"
        return f"{number} {' and '.join(bound for bound in bounds if bound)}".strip()
    if isinstance(kind, click.Path):
        return "a path"
    return _ACCEPTED.get(kind)
