"""What every command shares, and nothing else: click types and option helpers (``options``), how
a command shows an error (``failures``), where the workspace keeps datasets, caches, runs and
results (``workspace``) and the defaults file ``raml.toml`` (``config_file``). Imported only by
the stages' command modules (``*/cli.py``) and pipeline.py; nothing below the command line
imports it.
"""
