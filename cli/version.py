"""RAML's version, read from one place: setup.cfg's ``[metadata] version``."""

from __future__ import annotations

from pathlib import Path


def version() -> str:
    """The installed package's version, or, in a checkout that was never installed, the version in
    its setup.cfg."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        return installed_version("raml")
    except PackageNotFoundError:
        import configparser

        setup = configparser.ConfigParser()
        setup.read(Path(__file__).resolve().parents[1] / "setup.cfg")
        return setup.get("metadata", "version", fallback="unknown")
