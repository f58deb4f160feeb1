"""The documentation runs: the getting-started page's commands and the Python API page's worked
example are run as written (tiny model, random weights, synthetic datasets in the real layouts);
every link from the code into docs/ names a page and a heading that exist; the README stays short."""

import configparser
import hashlib
import importlib.util
import json
import os
import re
import shlex
import unicodedata
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from raml.extract.encoder import load_backbone
from raml.extract.identity import TINY_TEST_CONFIG
from raml.pipeline import cli
from tests.synthetic import make_folder, make_mvtec, make_visa

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
WORKSPACE_TOML = f'model = "{TINY_TEST_CONFIG}"\nrandom_weights = true\n[extract]\nworkers = 0\n[train]\nepochs = 2\n'
# Lines of a page's transcripts that name paths the commands chose: each must be printed as shown.
PATH_LINES = ("dataset: ", "cache: ", "run: ", "results: ", "report: ")


def fenced_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def sections(path: Path) -> dict[str, str]:
    """The page's ``## `` sections: heading → text."""
    parts = re.split(r"^## (.+)$", path.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def raml_commands(text: str) -> list[list[str]]:
    """The ``raml ...`` lines of a text's ``bash`` blocks, as argument lists (comments dropped)."""
    return [
        shlex.split(line, comments=True)[1:]
        for block in fenced_blocks(text, "bash")
        for line in block.splitlines()
        if line.startswith("raml ")
    ]


def run(args) -> str:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0 and "Error:" not in result.output, (args, result.output, repr(result.exception))
    return result.output


def slug(heading: str) -> str:
    """The anchor MkDocs' table of contents gives a heading (Python-Markdown's default slugify)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)  # no headings in code
    return {slug(heading) for heading in re.findall(r"^#+ (.+?)\s*$", text, re.M)}


def tracked_python_files() -> list[Path]:
    """The repository's Python files: not the virtual environment, the built site or workspace data."""
    skip = {"site", "build", "demo_out", "datasets", "features", "runs", "results", "__pycache__"}
    found = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name not in skip]
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return found


# --- getting started: each section's commands in a workspace set up as the section says ------------


def workspace_for_three_commands(directory: Path) -> None:
    make_mvtec(directory / "datasets" / "mvtec")
    make_visa(directory / "datasets" / "visa")
    (directory / "raml.toml").write_text(WORKSPACE_TOML)


def workspace_for_own_images(directory: Path) -> None:
    # 20 images, so that the 16 that train after the holdout split make one batch.
    make_folder(directory / "datasets" / "folder", n_good=12, defects=("dent", "scratch"), n_defect=4)
    (directory / "new_parts").mkdir()
    for name in ("good/img0.png", "dent/img1.png"):
        source = directory / "datasets" / "folder" / "widget" / name
        (directory / "new_parts" / name.replace("/", "-")).write_bytes(source.read_bytes())
    (directory / "raml.toml").write_text(WORKSPACE_TOML)


def workspace_for_offline_weights(directory: Path) -> None:
    """A weights file on disk (the tiny model's seeded weights) and no random_weights in raml.toml."""
    make_mvtec(directory / "datasets" / "mvtec", categories=("bottle",))
    (directory / "clip").mkdir()
    backbone = load_backbone(str(TINY_TEST_CONFIG), random_weights=True, device="cpu")
    torch.save(backbone.model.state_dict(), directory / "clip" / "open_clip_pytorch_model.bin")
    (directory / "raml.toml").write_text(f'model = "{TINY_TEST_CONFIG}"\n[extract]\nworkers = 0\n')


WORKSPACES = {
    "A workspace: three commands": workspace_for_three_commands,
    "Your own images": workspace_for_own_images,
    "CLIP weights on an offline machine": workspace_for_offline_weights,
}


@pytest.fixture
def in_empty_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("RAML_CONFIG", raising=False)  # the workspace's own raml.toml
    return tmp_path


def test_every_command_of_getting_started_is_run_here():
    page = sections(DOCS / "getting-started.md")
    with_commands = {heading for heading, text in page.items() if raml_commands(text)}
    assert with_commands == set(WORKSPACES), "a section with raml commands needs a workspace in WORKSPACES"


@pytest.mark.parametrize("heading", sorted(WORKSPACES))
def test_getting_started_commands_run_as_written(heading, in_empty_dir, monkeypatch):
    text = sections(DOCS / "getting-started.md")[heading]
    directory = in_empty_dir / "workspace"
    directory.mkdir()
    WORKSPACES[heading](directory)
    monkeypatch.chdir(directory)
    printed = "".join(run(args) for args in raml_commands(text))
    for block in fenced_blocks(text, "text"):
        for line in block.splitlines():
            if line.startswith(PATH_LINES):
                assert line in printed, f"{heading}: the page shows {line!r}, the commands printed:\n{printed}"
    if heading == "A workspace: three commands":
        assert (
            json.loads(Path("results/visa/001-fixed-seed0/results.json").read_text())["001-fixed"]["protocol"]["name"]
            == "transfer"
        )
        assert Path("results/report/report.md").is_file()
    if heading == "Your own images":
        predictions = Path("results/predictions/001-adaptive-seed0/predictions.csv").read_text()
        assert "new_parts/dent-img1.png" in predictions and "new_parts/good-img0.png" in predictions
    if heading == "CLIP weights on an offline machine":
        (cache,) = Path("features/mvtec").iterdir()
        meta = json.loads((cache / "cache.json").read_text())
        weights = hashlib.sha256(Path("clip/open_clip_pytorch_model.bin").read_bytes()).hexdigest()
        assert meta["weights"] == f"sha256:{weights}" and meta["random_weights"] is False


def test_the_api_pages_worked_example_runs(in_empty_dir, monkeypatch, capsys):
    (example,) = fenced_blocks((DOCS / "api.md").read_text(), "python")
    make_mvtec(in_empty_dir / "datasets" / "mvtec")
    monkeypatch.chdir(in_empty_dir)
    exec(compile(example, str(DOCS / "api.md"), "exec"), {})
    printed = capsys.readouterr().out
    assert "extract: 20 images encoded" in printed and "20 images in ['bottle', 'metal_nut']" in printed
    assert Path("runs/notebook-seed0/checkpoint.pt").is_file() and Path("results/notebook/results.json").is_file()
    assert sorted(path.name for path in Path("predictions").iterdir()) == [
        "000_map.npy",
        "000_overlay.png",
        "001_map.npy",
        "001_overlay.png",
        "predictions.csv",
    ]


# --- links from the code into the docs ----------------------------------------------------------


def test_links_from_the_code_name_existing_pages_and_headings():
    links = set()
    for path in [*tracked_python_files(), ROOT / "README.md"]:
        links |= {(path, page, anchor) for page, anchor in re.findall(r"docs/([\w-]+\.md)#([\w-]+)", path.read_text())}
    assert len(links) >= 20  # the method's sections are cited throughout the code
    for path, page, anchor in sorted(links):
        assert (DOCS / page).is_file(), f"{path.relative_to(ROOT)}: docs/{page} does not exist"
        assert anchor in anchors(DOCS / page), f"{path.relative_to(ROOT)}: docs/{page} has no heading #{anchor}"


def test_the_code_cites_the_docs_not_a_spec_file_or_issue_numbers():
    for path in tracked_python_files():
        if path.name == "test_docs.py":
            continue
        text = path.read_text()
        assert not re.search(r"\bS[P]EC\b", text), (
            f"{path.relative_to(ROOT)} cites the old spec file: link docs/method.md"
        )
        assert not re.search(r"(?i)\bissue \d", text), f"{path.relative_to(ROOT)} cites an issue number"


def test_the_readme_fits_on_a_few_screens_and_names_the_version_history():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    version = setup.get("metadata", "version")
    assert f"## [{version}]" in (ROOT / "CHANGELOG.md").read_text()
    assert run(["--version"]).strip() == f"raml {version}"


# --- the generated reference pages ---------------------------------------------------------------


def reference_hook():
    pytest.importorskip("mkdocs", reason="the docs extra is not installed (make docs installs it)")
    spec = importlib.util.spec_from_file_location("reference_hook", DOCS / "hooks" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_raml_toml_table_links_each_key_to_a_command_section_that_exists():
    hook = reference_hook()
    commands_page = hook.command_sections(cli)
    headings = {slug(heading) for heading in re.findall(r"^#+ (.+)$", commands_page, re.M)}
    table = hook.keys_table(cli)
    rows = {row.split("|")[1].strip(" `"): row for row in table.splitlines()[2:]}
    assert "`extract`" in rows["patch_tokens"] and "an integer ≥ 1, ≤ 100000" in rows["epochs"]
    assert set(rows) >= {"model", "random_weights", "epochs", "batch_size", "seeds", "margin", "root", "out"}
    for anchor in re.findall(r"\(commands\.md#([\w-]+)\)", table):
        assert anchor in headings, anchor
    assert "Usage: raml train [OPTIONS]" in commands_page and "--margin [adaptive|fixed|strong|custom]" in commands_page
