"""``pip install .`` gives one package, ``raml``, and a ``raml`` command, and shadows nothing.

Marked ``packaging`` (it builds a wheel and installs packages from the registry into a new virtual
environment, about a minute): ``.ci/run`` runs it; ``pytest -m packaging`` runs it by hand. The
wheel is installed without its dependencies (torch alone is several GB); the command's own light
imports (click, numpy, h5py, xxhash) are installed beside Hugging Face's ``evaluate``, the package
whose name our ``evaluate/`` folder would shadow if it were installed at the top level.
"""

from __future__ import annotations

import configparser
import csv
import io
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERIC_NAMES = {"cache", "cli", "extract", "train", "evaluate", "pipeline", "errors", "tests"}

pytestmark = pytest.mark.packaging


def run(*command, cwd=None) -> str:
    done = subprocess.run([str(part) for part in command], capture_output=True, text=True, cwd=cwd, timeout=900)
    assert done.returncode == 0, f"{' '.join(map(str, command))} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of the checkout's files (tracked, or new and not ignored), built from a copy so
    that setuptools' build/ folder neither lands in the checkout nor leaks stale modules in."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("dist")
    for name in run("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).splitlines():
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, source)
    return next(out.glob("raml-*.whl"))


def version() -> str:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    return setup["metadata"]["version"]


def test_the_wheel_installs_only_the_package_raml(wheel):
    with zipfile.ZipFile(wheel) as archive:
        record_name = next(name for name in archive.namelist() if name.endswith(".dist-info/RECORD"))
        rows = list(csv.reader(io.StringIO(archive.read(record_name).decode())))
        entry_points = archive.read(record_name.replace("RECORD", "entry_points.txt")).decode()
    top_level = {row[0].split("/")[0] for row in rows}
    assert top_level == {"raml", f"raml-{version()}.dist-info"}
    assert not GENERIC_NAMES & top_level
    installed = {row[0] for row in rows}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/**/*.py")]:
        relative = path.relative_to(ROOT).as_posix()
        if relative.split("/")[0] in {"cache", "cli", "extract", "train", "evaluate"} or "/" not in relative:
            assert f"raml/{relative}" in installed, f"{relative} is missing from the wheel"
    assert "raml/extract/model_configs/raml-tiny-test.json" in installed
    assert not any(name.startswith("raml/tests/") for name in installed)
    assert "raml = raml.pipeline:main" in entry_points


def test_raml_beside_hugging_faces_evaluate(wheel, tmp_path):
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    pip, python = venv / "bin" / "pip", venv / "bin" / "python"
    run(pip, "install", "-q", "evaluate", "click", "numpy", "h5py", "xxhash")
    run(pip, "install", "-q", "--no-deps", wheel)
    assert f"raml {version()}" in run(venv / "bin" / "raml", "--version", cwd=tmp_path)
    assert "Commands:" in run(venv / "bin" / "raml", "--help", cwd=tmp_path)
    where = run(python, "-c", "import evaluate; print(evaluate.load.__module__, evaluate.__file__)", cwd=tmp_path)
    module, path = where.split()
    assert module.startswith("evaluate.")
    assert Path(path).parent.name == "evaluate" and Path(path).parent.parent.name == "site-packages"
