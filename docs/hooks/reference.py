"""MkDocs hook: the command reference and the table of ``raml.toml`` keys, generated from the
click commands themselves when the site is built, so that neither can drift from the code.

- ``docs/commands.md`` holds the marker ``<!-- raml commands -->``: replaced by one section per
  command (its anchor is ``raml-<command path>``, e.g. ``#raml-bench-extract``) holding exactly
  what ``raml COMMAND --help`` prints, as plain text. (Rendering the help as Markdown, as
  mkdocs-click does, lost every ``<dataset>`` of the help to the HTML parser.)
- ``docs/configuration.md`` holds the marker ``<!-- raml.toml keys -->``: replaced by one row per
  key: the long option it sets, what value it takes, and every command (a table of ``raml.toml``)
  that has it, linked to that command's section. The rows are read from the same click parameters
  that ``cli/config_file.py`` checks a file against.

It also shows mkdocstrings where the package is (``on_config``): the checkout's root *is* the
package ``raml`` (setup.cfg's ``package_dir``), whatever the checkout's folder is called, and
griffe finds packages by folder name. A temporary folder holds ``raml/`` with links to the
package's own folders and modules only (not .venv, site/ or tests/).
"""

from __future__ import annotations

import configparser
import re
import shutil
import tempfile
from pathlib import Path

import click
from mkdocs.plugins import event_priority

KEYS_MARKER = "<!-- raml.toml keys -->"
KEYS_PAGE = "configuration.md"
COMMANDS_MARKER = "<!-- raml commands -->"
# Whose help describes a key that several commands share: the first of these that has it.
HELP_FROM = (("extract",), ("train",), ("evaluate",), ("predict",), ("export",), ("sweep",), ("report",))
COMMANDS_PAGE = "commands.md"


def commands(group: click.Group, path: tuple = ()):
    """(command path, click command) of every command under ``group``, groups walked into."""
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            yield from commands(command, path + (name,))
        else:
            yield path + (name,), command


def long_options(command: click.Command):
    """(key with ``_``, click option) for each long option of ``command``."""
    for param in command.params:
        if isinstance(param, click.Option) and not param.hidden:
            for opt in param.opts:
                if opt.startswith("--"):
                    yield opt[2:].replace("-", "_"), param


def value_kind(param: click.Option) -> str:
    """What a TOML value for ``param`` must be, in words."""
    kind = param.type
    if param.is_flag:
        text = "true or false"
    elif isinstance(kind, click.Choice):
        text = "one of " + ", ".join(f"`{choice}`" for choice in kind.choices)
    elif isinstance(kind, (click.IntRange, click.FloatRange)):
        number = "an integer" if isinstance(kind, click.IntRange) else "a number"
        bounds = []
        if kind.min is not None:
            bounds.append(f"{'>' if kind.min_open else '≥'} {kind.min}")
        if kind.max is not None:
            bounds.append(f"{'<' if kind.max_open else '≤'} {kind.max}")
        text = f"{number} {', '.join(bounds)}".strip()
    elif isinstance(kind, click.Path):
        text = "a path (relative to the file's folder)"
    elif isinstance(kind, click.types.IntParamType):
        text = "an integer"
    elif isinstance(kind, click.types.FloatParamType):
        text = "a number"
    else:
        text = "a string"
    return f"a TOML array, each {text}" if param.multiple else text


def first_sentence(param: click.Option) -> str:
    """The option's help up to its first full stop (the command reference has the rest)."""
    text = re.split(r"(?<=[a-z0-9)'])\.\s+(?=[A-Z])", " ".join((param.help or "").split()), maxsplit=1)[0]
    return text.replace("|", "\\|").replace("<", "&lt;")


def command_link(path: tuple) -> str:
    anchor = "-".join(("raml",) + path)
    return f"[`{' '.join(path)}`]({COMMANDS_PAGE}#{anchor})"


def keys_table(root: click.Group) -> str:
    """The Markdown table: key, what it sets, its value, the commands that take it."""
    rows: dict[str, dict] = {}  # key → {value kind → [command paths]}
    helps: dict[str, tuple] = {}  # key → (rank of the command in HELP_FROM, its path, its help)
    for path, command in commands(root):
        rank = HELP_FROM.index(path) if path in HELP_FROM else len(HELP_FROM)
        for key, param in long_options(command):
            rows.setdefault(key, {}).setdefault(value_kind(param), []).append(path)
            if key not in helps or rank < helps[key][0]:
                helps[key] = (rank, path, first_sentence(param))
    lines = [
        "| key | what it sets (the help of the command in bold) | value | commands that have it |",
        "|---|---|---|---|",
    ]
    for key in sorted(rows):
        kinds = rows[key]
        if len(kinds) == 1:
            value = next(iter(kinds))
        else:  # the same key takes different values in different commands: say which where
            value = "<br>".join(
                f"{kind} ({', '.join(' '.join(path) for path in paths)})" for kind, paths in kinds.items()
            )
        every = sorted(path for paths in kinds.values() for path in paths)
        _, described, help_text = helps[key]
        links = ", ".join(f"**{command_link(path)}**" if path == described else command_link(path) for path in every)
        lines.append(f"| `{key}` | {help_text} | {value} | {links} |")
    return "\n".join(lines)


HELP_WIDTH = 100  # the root group's max_content_width: what a wide terminal shows


def help_text(path: tuple, root: click.Group) -> str:
    """What ``raml <path> --help`` prints (the commands' own defaults: no raml.toml is read)."""
    context = click.Context(root, info_name="raml", terminal_width=HELP_WIDTH, **root.context_settings)
    command = root
    for name in path:
        command = command.commands[name]
        context = click.Context(command, info_name=name, parent=context)
    return command.get_help(context)


def command_sections(root: click.Group) -> str:
    """A table of every command with its first help line, then a section per group and command."""
    entries = []

    def walk(group: click.Group, path: tuple):
        for name in sorted(group.commands):
            command = group.commands[name]
            entries.append((path + (name,), command))
            if isinstance(command, click.Group):
                walk(command, path + (name,))

    walk(root, ())
    lines = ["| command | what it does |", "|---|---|"]
    for path, command in entries:
        summary = command.get_short_help_str(limit=200).replace("|", "\\|").replace("<", "&lt;")
        lines.append(f"| {command_link(path)} | {summary} |")
    lines.append("")
    for path, _command in entries:
        level = "#" * (len(path) + 1)
        lines += [f"{level} raml {' '.join(path)}", "", "```text", help_text(path, root), "```", ""]
    return "\n".join(lines)


def _replace(markdown: str, page: str, marker: str, text) -> str:
    if marker not in markdown:
        raise ValueError(f"{page}: the marker {marker!r} is missing")
    return markdown.replace(marker, text())


_api_roots: list[Path] = []


def package_entries(root: Path) -> list[Path]:
    """The checkout's top-level folders that setup.cfg packages as ``raml.X``, and its modules."""
    setup = configparser.ConfigParser()
    setup.read(root / "setup.cfg")
    packages = setup.get("options", "packages").split()
    folders = {name.split(".")[1] for name in packages if name.count(".") >= 1}
    return sorted([root / folder for folder in folders] + list(root.glob("*.py")))


@event_priority(100)  # before mkdocstrings' own on_config, which builds the handler with its paths
def on_config(config):
    root = Path(config.config_file_path).resolve().parent
    api_root = Path(tempfile.mkdtemp(prefix="raml-docs-"))
    _api_roots.append(api_root)
    (api_root / "raml").mkdir()
    for entry in package_entries(root):
        (api_root / "raml" / entry.name).symlink_to(entry)
    config.plugins["mkdocstrings"].config.handlers.setdefault("python", {})["paths"] = [str(api_root)]
    return config


def on_shutdown():
    for api_root in _api_roots:
        shutil.rmtree(api_root, ignore_errors=True)


def on_page_markdown(markdown: str, page, config, files) -> str:
    from raml.pipeline import cli

    if page.file.src_uri == KEYS_PAGE:
        return _replace(markdown, KEYS_PAGE, KEYS_MARKER, lambda: keys_table(cli))
    if page.file.src_uri == COMMANDS_PAGE:
        return _replace(markdown, COMMANDS_PAGE, COMMANDS_MARKER, lambda: command_sections(cli))
    return markdown
