"""The workspace: where commands find datasets and caches, and put runs and results, when no path
is given. Everything lives under the working directory::

    raml.toml                          defaults for the commands' options (``cache.config_file``)
    datasets/<dataset>/                the images (``$RAML_DATA/<dataset>`` when RAML_DATA is set)
    features/<dataset>/<backbone tag>/ one feature cache per dataset and backbone (``backbone_tag``)
    runs/<dataset>/NNN-<name>/         one directory per train or sweep, never reused
    runs/<dataset>/latest              symlink to the run of that dataset that finished last
    results/<dataset>/<run>/           evaluate's results; <baseline>/ and ablate/ beside them
    results/report/                    report's; results/predictions/<run>/, results/export/<run>/

An explicit path (``--root``, ``--cache-dir``, ``--out``, ``--checkpoint``) always wins; these
defaults apply only where one is omitted.

Runs are numbered across the whole workspace (``001-fixed-seed0``, ``002-sweep-adaptive-fixed``,
...), so names sort in the order the directories were made (``train`` makes its own once training
succeeded, ``sweep`` before its first run), a second ``train --margin fixed`` never meets the
first, and "the newest run" is the highest number, whatever its dataset. Numbers are handed out
under an ``flock`` on ``runs/.lock``, so two commands finishing at once get different numbers. This module knows the layout only: what a finished run holds is the caller's to say
(``finished`` arguments), since run files are defined by the stages above this one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from raml.cache.format import CACHE_JSON, fingerprint_field, read_fingerprint

DATA_ENV = "RAML_DATA"
DATASETS, FEATURES, RUNS, RESULTS = Path("datasets"), Path("features"), Path("runs"), Path("results")
REPORT_DIR = RESULTS / "report"
LATEST = "latest"
SWEEP_PREFIX = "sweep-"  # a run directory named NNN-sweep-... holds a sweep's runs
_RUN_NAME = re.compile(r"^(\d+)-(.+)$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


def datasets_home() -> Path:
    """``$RAML_DATA`` when set, else ``./datasets``."""
    return Path(os.environ[DATA_ENV]).expanduser() if os.environ.get(DATA_ENV) else DATASETS


def default_dataset_root(dataset: str) -> Path:
    """Where a dataset is looked for when ``--root`` is not given."""
    return datasets_home() / dataset


def where_datasets_are_looked_for() -> str:
    """The rule ``default_dataset_root`` follows, in words, for messages."""
    if os.environ.get(DATA_ENV):
        return f"$RAML_DATA/<dataset> (RAML_DATA={os.environ[DATA_ENV]})"
    return "./datasets/<dataset> (or $RAML_DATA/<dataset> when RAML_DATA is set)"


def backbone_tag(fields: dict) -> str:
    """The name of a backbone's cache directory: model, weights and precision to read, then 8 hex
    digits of a SHA-256 over the identity fields (``backbone``, ``model_config``, ``weights``,
    ``precision``), so that two backbones never share a directory even when the readable part
    agrees (the same config file name with another architecture, two weights files).

    ``fields``: ``extract.identity.BackboneIdentity.fingerprint_fields()``, e.g. ``ViT-B-16`` with
    OpenAI's weights in fp32 → ``ViT-B-16-openai-fp32-<hash>``; random weights read ``random``, a
    weights file ``file``.
    """
    weights = str(fields["weights"])
    label = "random" if fields.get("random_weights") else "file" if weights.startswith("sha256:") else weights
    identity = {key: fields.get(key) for key in ("backbone", "model_config", "weights", "precision")}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()[:8]
    return _UNSAFE.sub("_", "-".join([str(fields["backbone"]), label, str(fields["precision"]), digest]))


def cache_dir_for(dataset: str, backbone_fields: dict) -> Path:
    """``features/<dataset>/<backbone tag>``: the cache ``extract`` writes when no --cache-dir is given."""
    return FEATURES / dataset / backbone_tag(backbone_fields)


def caches_of(dataset: str) -> list[Path]:
    """The caches (directories holding a ``cache.json``) under ``features/<dataset>``, sorted."""
    home = FEATURES / dataset
    return sorted(path.parent for path in home.glob(f"*/{CACHE_JSON}")) if home.is_dir() else []


def dataset_of(cache_dir) -> str:
    """The dataset a cache's fingerprint names (``mvtec``, ``visa``, ...; ``other`` if none): the
    ``<dataset>`` of the runs and results made from it."""
    meta = read_fingerprint(Path(cache_dir)) or {}
    return (meta.get("dataset") or {}).get("kind") or "other"


def describe_cache(cache_dir) -> str:
    """The backbone a cache was extracted with, in a few words (from its ``cache.json``)."""
    meta = read_fingerprint(Path(cache_dir)) or {}
    return f"{meta.get('backbone')}, weights {meta.get('weights')}, {fingerprint_field(meta, 'precision')}"


@dataclass(frozen=True)
class RunEntry:
    """One numbered directory under ``runs/<dataset>/``: a training run or a sweep."""

    path: Path
    dataset: str
    number: int
    name: str  # the part after the number: ``fixed-seed0``, ``sweep-adaptive-fixed-strong``

    @property
    def is_sweep(self) -> bool:
        return self.name.startswith(SWEEP_PREFIX)


def run_entries() -> list[RunEntry]:
    """Every numbered run directory of the workspace, oldest first (``latest`` links are skipped)."""
    entries = []
    for path in RUNS.glob("*/*") if RUNS.is_dir() else ():
        match = _RUN_NAME.match(path.name)
        if match and path.is_dir() and not path.is_symlink():
            entries.append(RunEntry(path, path.parent.name, int(match.group(1)), match.group(2)))
    return sorted(entries, key=lambda entry: (entry.number, entry.dataset, entry.name))


def newest_run(finished, *, sweeps: bool = True, dataset: str | None = None) -> RunEntry | None:
    """The highest-numbered run for which ``finished(path)`` holds (a train run once its checkpoint
    is written, a sweep once its summary is); with ``sweeps=False`` training runs only."""
    candidates = [
        entry
        for entry in run_entries()
        if (sweeps or not entry.is_sweep) and (dataset is None or entry.dataset == dataset) and finished(entry.path)
    ]
    return candidates[-1] if candidates else None


def claim_run_dir(dataset: str, name: str) -> Path:
    """Create and return ``runs/<dataset>/NNN-<name>``, NNN one more than any run of the workspace."""
    safe_name = _UNSAFE.sub("_", name)
    (RUNS / dataset).mkdir(parents=True, exist_ok=True)
    with open(RUNS / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        number = max((entry.number for entry in run_entries()), default=0) + 1
        path = RUNS / dataset / f"{number:03d}-{safe_name}"
        path.mkdir()
    return path


def unfinished_run(dataset: str, name: str, finished) -> Path | None:
    """The newest run of ``dataset`` named ``name`` if it is not finished (a command to resume)."""
    same = [entry for entry in run_entries() if entry.dataset == dataset and entry.name == _UNSAFE.sub("_", name)]
    return same[-1].path if same and not finished(same[-1].path) else None


def point_latest(run_dir: Path) -> Path:
    """Make ``runs/<dataset>/latest`` a relative symlink to ``run_dir``, atomically (a new link
    renamed over the old one), and return the link. Called when a run finishes: with two runs
    finishing at once, it names the one that finished last."""
    run_dir = Path(run_dir)
    link = run_dir.parent / LATEST
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)
    return link


def results_dir(*parts: str) -> Path:
    """``results/<parts...>``: e.g. ``results_dir("visa", "002-fixed-seed0")``."""
    return RESULTS.joinpath(*parts)
