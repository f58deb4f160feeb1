"""Every option of every command, given a bad value: a usage error before any work (exit status 2),
one ``Error:`` line naming the option, never a traceback.

The table is built from the click commands themselves: each option's bad values follow from its
type (a range, a choice, a path, a number) or, for free text, from ``TEXT_CASES``. An option that
takes any whole or real number, or a text option missing from ``TEXT_CASES``, fails the test: every
new option must say what it refuses."""

import click
import pytest
from click.testing import CliRunner

from raml.cli.options import CheckedText, Device, FiniteFloat
from raml.pipeline import cli
from tests.conftest import TINY_MODEL

# Text options: the values each must refuse. An option in ANY_TEXT takes any text (a name).
TEXT_CASES = {
    "--model": ["nosuch-model", "", "missing.json"],
    "--winclip-model": ["nosuch-model", ""],
    "--pretrained": ["nosuch-tag"],
    "--winclip-pretrained": ["nosuch-tag"],
    "--device": ["tpu", "", "cuda:x", "gpu0"],
    "--categories": ["nosuch", ",", ""],
    "--shard": ["x", "1/1", "2/1", "0/0", "-1/2", "0/2/3"],
    "--seeds": ["", "a,b", "-1", "1.5", ",,", "99999999999"],
    "--margins": ["", "nosuch", "fixed,nosuch"],
    "--vary": ["lr", "lr=", "nosuch=1", "seed=1,2", "lr=abc", "epochs=0", "lr=nan", "margin_base=5", "text_weight=2"],
    "--r-max": ["", "-5", "nan", "inf", "pixels"],
    "--engines": ["nosuch", "onnx,nosuch"],
    "--lrs": ["", "abc", "-1", "nan"],
    "--ablations": ["", "nosuch", "full,nosuch"],
    "--baselines": ["", "nosuch", "linear,nosuch"],
    "--name": [""],
    "--category": [""],
    "--tracking-uri": ["", "mlflow.db", "sqlite:"],
    "--experiment": ["", " "],
    "--host": ["", "two words", "http://127.0.0.1", "[::1]"],
    "--token": ["", "short"],
    "--clients": ["", "0", "a", "1,,4", "300"],
}
# (command, option): the values that command's option refuses, where they differ from TEXT_CASES'
PER_COMMAND = {("export", "--categories"): [",", ""]}  # export may bake in categories it was not trained on
ANY_TEXT = set()
ARGUMENTS_SKIPPED = {"files", "results"}  # paths checked one by one (predict reports each; report: exists=True)


def commands(group=cli, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def number_cases(kind: str, param_type) -> list[str]:
    low, high = getattr(param_type, "min", None), getattr(param_type, "max", None)
    cases = ["abc", "", "1e999999", "nan", "inf"]
    if kind == "int":
        cases += ["1.5", "99999999999999999999999"]
    for bound, step in ((low, -1), (high, 1)):
        if bound is not None:
            cases.append(str(bound + step) if kind == "int" else repr(bound + step * max(1e-6, abs(bound) * 1e-6)))
            if kind == "float" and (param_type.min_open if step < 0 else param_type.max_open):
                cases.append(repr(float(bound)))
    return cases


def bad_values(path: tuple, option: click.Option, tmp_path) -> list[str]:
    """The bad values ``option`` of command ``path`` must refuse (see the module docstring)."""
    kind = option.type
    name = option.opts[0]
    if (" ".join(path), name) in PER_COMMAND:
        return PER_COMMAND[(" ".join(path), name)]
    if isinstance(kind, (Device, CheckedText)):
        return TEXT_CASES[name]
    if isinstance(kind, click.IntRange):
        if kind.min is None and kind.max is None:
            pytest.fail(f"{name} takes any whole number: give it a click.IntRange")
        return number_cases("int", kind)
    if isinstance(kind, FiniteFloat):
        return number_cases("float", kind)
    if isinstance(kind, click.types.IntParamType):
        pytest.fail(f"{name} takes any whole number: give it a click.IntRange")
    if isinstance(kind, (click.types.FloatParamType, click.FloatRange)):
        pytest.fail(f"{name} takes any float (NaN and inf included): give it a cache.cli.FiniteFloat")
    if isinstance(kind, click.Choice):
        return ["nosuch-choice", ""]
    if isinstance(kind, click.types.BoolParamType):
        return ["maybe", ""]
    if isinstance(kind, click.Path):
        a_file, a_dir = tmp_path / "a-file", tmp_path / "a-dir"
        a_file.write_text("x")
        a_dir.mkdir(exist_ok=True)
        cases = []
        if kind.exists:
            cases.append(str(tmp_path / "absent"))
        if not kind.file_okay:
            cases.append(str(a_file))
        if not kind.dir_okay:
            cases.append(str(a_dir))
        if not cases:
            pytest.fail(f"{name}: a path that need not exist, may be a file or a folder: say what it refuses")
        return cases
    if isinstance(kind, click.types.StringParamType):
        if name in ANY_TEXT:
            return []
        if name not in TEXT_CASES:
            pytest.fail(f"{name} takes text: add the values it refuses to TEXT_CASES (or it to ANY_TEXT)")
        return TEXT_CASES[name]
    pytest.fail(f"{name}: no bad values known for its type {kind!r}")


@pytest.fixture(scope="module")
def base_args(tmp_path_factory, mvtec_root, mvtec_cache):
    """A valid invocation of every command (required options given), to which a bad option is added."""
    from raml.cache import read_cache
    from raml.evaluate.run import evaluate_checkpoints
    from raml.train.config import make_config
    from raml.train.fit import fit, write_run

    work = tmp_path_factory.mktemp("options")
    run = work / "run"
    write_run(run, fit(read_cache(mvtec_cache), make_config("adaptive", epochs=1, batch_size=8)))
    results, _ = evaluate_checkpoints([run], mvtec_cache, work / "results", n_resamples=10, log=lambda line: None)
    backbone = ["--model", TINY_MODEL, "--random-weights"]
    image = str(mvtec_root / "bottle" / "test" / "good" / "000.png")
    cache, out = str(mvtec_cache), str(work / "out")
    feature_baseline = ["--cache-dir", cache, "--out", out]
    return {
        ("extract",): [
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--cache-dir",
            out,
            *backbone,
            "--workers",
            "0",
        ],
        ("info",): ["--cache-dir", cache],
        ("status",): [],
        ("train",): ["--cache-dir", cache, "--out", out, "--epochs", "1", "--batch-size", "8"],
        ("sweep",): ["--cache-dir", cache, "--out", out, "--epochs", "1", "--batch-size", "8", "--seeds", "0"],
        ("ablate",): ["--cache-dir", cache, "--out", out, "--epochs", "1", "--batch-size", "8", "--seeds", "0"],
        ("evaluate",): ["--checkpoint", str(run), "--cache-dir", cache, "--out", out, "--bootstrap", "10"],
        ("report",): [str(results), "--out", out],
        ("baseline", "winclip"): [
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--out",
            out,
            *backbone,
            "--workers",
            "0",
        ],
        ("baseline", "linear"): feature_baseline,
        ("baseline", "knn-tiles"): feature_baseline,
        ("baseline", "knn-patches"): feature_baseline,
        ("baseline", "zero-shot-text"): feature_baseline,
        ("predict",): [image, "--checkpoint", str(run), "--category", "bottle", "--out", out, "--no-heatmaps"],
        ("export",): ["--checkpoint", str(run), "--out", out, *backbone],
        ("demo",): [
            "--out",
            out,
            "--model",
            TINY_MODEL,
            "--winclip-model",
            TINY_MODEL,
            "--random-weights",
            "--limit",
            "24",
            "--epochs",
            "1",
            "--seeds",
            "0",
        ],
        ("bench", "extract"): [*backbone, "--images", "1", "--size", "64", "--rounds", "1", "--workers", "0"],
        ("bench", "predict"): [*backbone, "--images", "1", "--size", "64", "--rounds", "1", "--no-winclip"],
        ("bench", "train"): ["--epochs", "1", "--seeds", "1"],
        ("bench", "cache"): ["--cache-dir", cache],
        ("bench", "maps"): ["--images", "1", "--normals", "1", "--size", "64"],
        ("track",): [str(run)],
        # a bad option stops these before the folder is read: it need not be a deployment
        ("serve",): [str(work)],
        ("calibrate",): [str(work), "--good", str(work)],
        ("bench", "serve"): [str(work)],
    }


def test_every_command_has_a_valid_invocation_here(base_args):
    assert {path for path, _ in commands()} == set(base_args), "add the new command to base_args"


@pytest.mark.parametrize(
    "path, command", list(commands()), ids=lambda value: " ".join(value) if isinstance(value, tuple) else ""
)
def test_every_bad_option_value_is_a_usage_error_naming_the_option(path, command, base_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a default path (./runs, ./results...) lands in this test's folder
    tried = 0
    for option in command.params:
        if not isinstance(option, click.Option) or option.is_flag or option.name in ARGUMENTS_SKIPPED:
            continue
        for value in bad_values(path, option, tmp_path):
            result = CliRunner().invoke(cli, [*path, *base_args[path], option.opts[0], value])
            shown = f"{' '.join(path)} {option.opts[0]} {value!r}: exit {result.exit_code}\n{result.output}"
            assert result.exit_code == 2, shown
            assert "Traceback" not in result.output and result.output.count("Error:") == 1, shown
            assert any(flag in result.output for flag in option.opts), shown
            tried += 1
    assert tried or not [p for p in command.params if isinstance(p, click.Option) and not p.is_flag]


@pytest.mark.parametrize(
    "path, option, value",
    [
        (("extract",), "--shard-size", "0"),
        (("extract",), "--workers", "-1"),
        (("extract",), "--device", "tpu"),
        (("train",), "--weight-decay", "-1"),
        (("train",), "--lr", "nan"),
        (("train",), "--epochs", "inf"),
        # a score weight outside [0, 1] was taken: s_final is a convex combination of s_visual and s_text
        (("evaluate",), "--text-weight", "2"),
        (("evaluate",), "--visual-weight", "-0.5"),
        (("predict",), "--text-weight", "1.01"),
        (("train",), "--text-weight", "2"),
        (("sweep",), "--visual-weight", "1.5"),
        (("sweep",), "--vary", "margin_base=5"),  # a margin beyond the unit sphere's 2
    ],
)
def test_the_cases_the_issue_found_are_usage_errors(path, option, value, base_args, tmp_path, monkeypatch):
    """Each of these ended in a traceback or was taken silently before: now exit 2 and one line naming the
    option (and, for a range, the range)."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, [*path, *base_args[path], option, value])
    assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output
    assert "Traceback" not in result.output and result.output.count("Error:") == 1
    if option.endswith("-weight"):
        assert "is not in the range 0<=x<=1" in result.output
