"""The workspace: the design's commands run as written in a directory that holds the
data, defaults from raml.toml, and the messages that say what is missing or ambiguous."""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from raml.cache.synthetic import write_synthetic_cache
from raml.cli import workspace
from raml.cli.config_file import load_default_map
from raml.extract.cli import dataset_root
from raml.extract.identity import TINY_TEST_CONFIG
from raml.pipeline import cli
from tests.synthetic import make_mvtec, make_visa

SMALL = {"bottle": (12, 4, 4, 900), "screw": (12, 4, 4, 1024)}  # a synthetic cache that trains in a second


@pytest.fixture
def empty_dir(tmp_path, monkeypatch):
    """An empty working directory; raml.toml, if any, is the one the test writes there."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAML_CONFIG", raising=False)
    return tmp_path


def run(*args, ok=True):
    result = CliRunner().invoke(cli, [str(arg) for arg in args])
    if ok:
        assert result.exit_code == 0, result.output + repr(result.exception)
    else:
        assert result.exit_code == 1, result.output  # a UserError: one "Error:" line, no traceback
        assert result.output.count("Error:") == 1 and "Traceback" not in result.output, result.output
    return result.output


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_designs_commands_run_as_written(empty_dir):
    """datasets/mvtec, datasets/visa (VisA's original layout) and a raml.toml naming the tiny model:
    extract, train twice, extract VisA, evaluate on VisA — all without a path."""
    make_mvtec(empty_dir / "datasets" / "mvtec")
    make_visa(empty_dir / "datasets" / "visa")
    (empty_dir / "raml.toml").write_text(
        f'model = "{TINY_TEST_CONFIG}"\nrandom_weights = true\n[extract]\nworkers = 0\n[train]\nepochs = 2\n'
    )

    extracted = run("extract", "--dataset", "mvtec")
    mvtec_cache = Path(next(line for line in extracted.splitlines() if line.startswith("cache: "))[7:])
    assert "dataset: datasets/mvtec" in extracted
    assert mvtec_cache.parent == Path("features/mvtec") and mvtec_cache.name.startswith("raml-tiny-test-random-fp32-")
    assert "0 images encoded, 0 skipped, 20 already cached" in run("extract", "--dataset", "mvtec")  # resumes

    first = run("train", "--margin", "fixed")
    assert f"cache: {mvtec_cache}" in first and "run: runs/mvtec/001-fixed-seed0" in first
    first_checkpoint = Path("runs/mvtec/001-fixed-seed0/checkpoint.pt")
    before = sha256(first_checkpoint)
    assert "run: runs/mvtec/002-fixed-seed0" in run("train", "--margin", "fixed")
    assert sha256(first_checkpoint) == before  # the first run is kept as it was
    assert Path("runs/mvtec/002-fixed-seed0/checkpoint.pt").is_file()
    assert os.readlink("runs/mvtec/latest") == "002-fixed-seed0"
    assert json.loads(Path("runs/mvtec/002-fixed-seed0/config.json").read_text())["epochs"] == 2  # [train]

    message = run("evaluate", "--dataset", "visa", ok=False)  # VisA not extracted yet
    assert (
        f"no cache of visa under features/visa/ has the backbone of runs/mvtec/002-fixed-seed0/checkpoint.pt "
        f"(raml-tiny-test, weights random(seed=0), fp32); extract one with raml extract --dataset "
        f"visa --model {TINY_TEST_CONFIG} --random-weights"
    ) in message
    run("extract", "--dataset", "visa")
    scored = run("evaluate", "--dataset", "visa")
    assert "run: runs/mvtec/002-fixed-seed0  (the newest)" in scored
    results = json.loads(Path("results/visa/002-fixed-seed0/results.json").read_text())
    protocol = results["002-fixed"]["protocol"]
    assert protocol["name"] == "transfer" and protocol["dataset"]["kind"] == "visa"
    assert "transfer protocol" in scored

    status = run("status")
    assert f"{mvtec_cache}   20 images, 2 categories; raml-tiny-test" in status
    assert "runs/mvtec/002-fixed-seed0   margin fixed, seed 0, 2 epochs;" in status and "<- latest" in status
    assert "results/visa/002-fixed-seed0   002-fixed: transfer on visa" in status
    assert status.rstrip().endswith("raml evaluate\n  raml report")

    predicted = run("predict", "datasets/mvtec/bottle/test/broken/000.png", "--category", "bottle", "--no-heatmaps")
    assert Path("results/predictions/002-fixed-seed0/predictions.csv").is_file(), predicted

    # Two caches of VisA that both fit the run's backbone: evaluate lists them and names --cache-dir.
    visa_cache = next(Path("features/visa").iterdir())
    shutil.copytree(visa_cache, "features/visa/a-copy")
    message = run("evaluate", "--dataset", "visa", ok=False)
    assert "2 caches of visa fit the backbone of runs/mvtec/002-fixed-seed0/checkpoint.pt" in message
    assert f"  {visa_cache}   raml-tiny-test" in message and "features/visa/a-copy" in message
    assert "--cache-dir" in message


def test_no_dataset_at_the_default_place(empty_dir, monkeypatch):
    message = run("extract", "--dataset", "mvtec", ok=False)
    assert "no mvtec dataset at datasets/mvtec" in message
    assert "./datasets/<dataset> (or $RAML_DATA/<dataset> when RAML_DATA is set)" in message
    assert "datasets/mvtec/<category>/train/good/*.png" in message  # the layout expected
    assert "https://www.mvtec.com/company/research/datasets/mvtec-ad" in message and "CC BY-NC-SA 4.0" in message

    monkeypatch.setenv("RAML_DATA", str(empty_dir / "data"))
    message = run("baseline", "winclip", "--dataset", "visa", ok=False)
    assert f"no visa dataset at {empty_dir / 'data' / 'visa'}" in message
    assert f"RAML_DATA={empty_dir / 'data'}" in message
    assert "split_csv/1cls.csv" in message
    assert "https://github.com/amazon-science/spot-diff" in message and "CC BY 4.0" in message


def test_raml_data_names_where_datasets_are(empty_dir, monkeypatch):
    assert dataset_root("mvtec", "/given/root") == "/given/root"  # --root wins
    assert dataset_root("textile") is None  # the package finds its images
    (empty_dir / "datasets" / "mvtec").mkdir(parents=True)
    assert dataset_root("mvtec") == Path("datasets/mvtec")
    (empty_dir / "elsewhere" / "mvtec").mkdir(parents=True)
    monkeypatch.setenv("RAML_DATA", str(empty_dir / "elsewhere"))
    assert dataset_root("mvtec") == empty_dir / "elsewhere" / "mvtec"


def test_two_caches_that_both_fit(empty_dir):
    for name in ("ViT-B-16-openai-fp32-00000000", "ViT-B-16-openai-int8-w7-11111111"):
        write_synthetic_cache(Path("features/mvtec") / name, SMALL, dim=16)
    message = run("train", "--margin", "fixed", ok=False)
    assert "2 caches of mvtec fit:" in message
    assert "  features/mvtec/ViT-B-16-openai-fp32-00000000   synthetic, weights synthetic, fp32" in message
    assert "features/mvtec/ViT-B-16-openai-int8-w7-11111111" in message
    assert "Pick one with --cache-dir PATH, or name its backbone with --model" in message
    assert not Path("runs").exists()  # nothing was trained

    message = run("sweep", "--dataset", "visa", ok=False)
    assert "no cache of visa under features/visa/: run raml extract --dataset visa first" in message


def test_an_unknown_key_in_raml_toml(empty_dir):
    Path("raml.toml").write_text("[train]\nepoch = 3\n")
    message = run("status", ok=False)
    assert "raml.toml: unknown key 'epoch' at [train]. Did you mean 'epochs'?" in message
    assert "[train] takes the long options of raml train: alpha, attn_dim," in message

    Path("raml.toml").write_text('modle = "ViT-B-16"\n')
    message = run("status", ok=False)
    assert "raml.toml: unknown key 'modle' at the top level. Did you mean 'model'?" in message
    assert "tables are named after commands: [ablate], [baseline]" in message

    Path("raml.toml").write_text("[trian]\nepochs = 3\n")
    assert "raml.toml: [trian] is not a command (did you mean [train]?)" in run("status", ok=False)


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[extract]\nengine = "onnx-fp16"\n',
            "engine = 'onnx-fp16' at [extract]: Invalid value for '--engine': 'onnx-fp16' is not one of 'auto', 'torch', "
            "'onnx', 'onnx-int8', 'torch-bf16', 'openvino', 'openvino-int8', 'openvino-bf16'.",
        ),
        (
            'epochs = "ten"\n',
            "epochs = 'ten' at the top level, for raml bench train: 'ten' is not an "
            "integer. Accepted: an integer >= 1 and <= 100000.",
        ),
        (
            "[bench.predict]\nrounds = 0\n",
            "rounds = 0 at [bench.predict]: Invalid value for '--rounds': 0 is not in the "
            "range 1<=x<=100. Accepted: an integer >= 1 and <= 100.",
        ),
        ("[train]\nlr = true\n", "lr = True at [train]: True is not a number. Accepted: a number > 0."),
        ('[evaluate]\ncheckpoint = "runs/x"\n', "checkpoint = 'runs/x' at [evaluate]: this option takes a list"),
    ],
)
def test_a_bad_value_in_raml_toml(empty_dir, text, expected):
    Path("raml.toml").write_text(text)
    assert f"raml.toml: {expected}" in run("status", ok=False)


def test_the_command_line_wins_over_the_file(empty_dir):
    cache_dir = write_synthetic_cache(Path("features/mvtec/synthetic"), SMALL, dim=16)
    Path("raml.toml").write_text("epochs = 1\n[train]\nepochs = 2\nhidden-dim = 32\n")  # the table wins over the top
    run("train", "--out", "from-file")
    run("train", "--cache-dir", cache_dir, "--out", "from-command-line", "--epochs", "1")
    from_file = json.loads(Path("from-file/config.json").read_text())
    assert (from_file["epochs"], from_file["hidden_dim"]) == (2, 32)
    assert json.loads(Path("from-command-line/config.json").read_text())["epochs"] == 1


def test_raml_config_names_the_file_and_its_relative_paths(empty_dir, monkeypatch):
    settings = empty_dir / "settings"
    settings.mkdir()
    shutil.copy(TINY_TEST_CONFIG, settings / "tiny.json")
    (settings / "team.toml").write_text(
        'model = "tiny.json"\nweights = "w.bin"\n[baseline]\nbatch_size = 3\n[baseline.winclip]\nbatch-size = 4\n'
    )
    Path("raml.toml").write_text("epochs = 1\n")  # not read: RAML_CONFIG names another file
    monkeypatch.setenv("RAML_CONFIG", str(settings / "team.toml"))
    defaults = load_default_map(cli)
    assert defaults["extract"]["model"] == str(settings / "tiny.json")  # relative to the file's directory
    assert defaults["extract"]["weights"] == str(settings / "w.bin")
    assert defaults["baseline"]["winclip"]["batch_size"] == 4  # the sub-command's table wins
    assert "epochs" not in defaults.get("train", {})
    assert "model" not in defaults.get("evaluate", {})  # evaluate has no --model
    monkeypatch.setenv("RAML_CONFIG", str(settings / "missing.toml"))
    assert f"RAML_CONFIG={settings / 'missing.toml'}: no such file" in run("status", ok=False)


def test_runs_are_numbered_across_the_workspace_and_never_reused(empty_dir):
    first = workspace.claim_run_dir("mvtec", "fixed-seed0")
    second = workspace.claim_run_dir("visa", "fixed-seed0")
    third = workspace.claim_run_dir("mvtec", "fixed-seed0")
    assert [first, second, third] == [
        Path("runs/mvtec/001-fixed-seed0"),
        Path("runs/visa/002-fixed-seed0"),
        Path("runs/mvtec/003-fixed-seed0"),
    ]
    workspace.point_latest(third)
    assert os.readlink("runs/mvtec/latest") == "003-fixed-seed0"
    assert [entry.number for entry in workspace.run_entries()] == [1, 2, 3]  # the link is not a run
    (first / "done").touch()
    finished = lambda path: (path / "done").is_file()  # noqa: E731
    assert workspace.newest_run(finished).path == first
    assert workspace.unfinished_run("mvtec", "fixed-seed0", finished) == third
    assert workspace.unfinished_run("visa", "sweep-fixed", finished) is None


def test_the_newest_sweep_is_evaluated_whole(empty_dir):
    cache_dir = write_synthetic_cache(Path("features/synthetic/cache"), SMALL, dim=16)
    run("train", "--cache-dir", cache_dir, "--epochs", "1")
    swept = run("sweep", "--cache-dir", cache_dir, "--margins", "fixed", "--seeds", "0,1", "--epochs", "1")
    assert "run: runs/synthetic/002-sweep-fixed" in swept
    assert os.readlink("runs/synthetic/latest") == "002-sweep-fixed"
    scored = run("evaluate")
    assert "run: runs/synthetic/002-sweep-fixed  (the newest (a sweep: all its runs))" in scored
    results = json.loads(Path("results/synthetic/002-sweep-fixed/results.json").read_text())
    assert results["fixed"]["seeds"] == [0, 1] and results["fixed"]["protocol"]["name"] == "holdout"


def test_backbone_tags_tell_backbones_apart():
    fields = {
        "backbone": "ViT-B-16",
        "model_config": "sha256:aa",
        "weights": "openai",
        "random_weights": False,
        "precision": "fp32",
    }
    tag = workspace.backbone_tag(fields)
    assert tag.startswith("ViT-B-16-openai-fp32-") and len(tag) == len("ViT-B-16-openai-fp32-") + 8
    assert workspace.backbone_tag({**fields, "model_config": "sha256:bb"}) != tag  # same name, other architecture
    assert workspace.backbone_tag({**fields, "weights": "sha256:cc"}).startswith("ViT-B-16-file-fp32-")
    assert workspace.backbone_tag({**fields, "weights": "random(seed=0)", "random_weights": True}).startswith(
        "ViT-B-16-random-fp32-"
    )


def test_weights_on_the_command_line_outrank_random_weights_in_raml_toml(empty_dir):
    """raml.toml's ``random_weights = true`` is a default: ``--weights FILE`` on the command line
    loads that file (here a file that is no checkpoint, refused by name) instead of random weights."""
    make_mvtec(empty_dir / "datasets" / "mvtec")
    (empty_dir / "raml.toml").write_text(
        f'model = "{TINY_TEST_CONFIG}"\nrandom_weights = true\n[extract]\nworkers = 0\n'
    )
    Path("not-weights.pt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(cli, ["extract", "--dataset", "mvtec", "--weights", "not-weights.pt"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "cache: features/mvtec/raml-tiny-test-file-fp32-" in result.output
    assert "Error: --weights not-weights.pt: not a checkpoint" in result.output
    assert not any(Path("features").rglob("*.h5"))
