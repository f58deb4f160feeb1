"""``ablate``: every ablation and baseline on the same held-out images, one sorted table with paired
differences from the full method, resumable."""

import json

import pytest
from click.testing import CliRunner

from raml.cache import read_cache
from raml.cache.synthetic import write_synthetic_cache
from raml.errors import UserError
from raml.evaluate.ablate import ABLATIONS, REFERENCE, RESCORED, run_ablation
from raml.evaluate.results import SCORES_CSV, read_scores_csv
from raml.pipeline import cli
from raml.train import sweep as sweep_module
from raml.train.config import VARIANT_DEFAULTS

FAST = dict(epochs=2, lr=1e-3, hidden_dim=32, attn_dim=8, feature_dim=16)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    shape = {"bottle": (30, 10, 10, 900), "screw": (30, 10, 10, 1024)}
    return read_cache(
        write_synthetic_cache(
            tmp_path_factory.mktemp("ablate") / "cache", shape, dim=32, separation=3.0, tokens_per_tile=2
        )
    )


@pytest.fixture(scope="module")
def ablation(tmp_path_factory, table):
    out = tmp_path_factory.mktemp("ablation")
    return out, run_ablation(table, out, [0, 1], n_resamples=100, **FAST)


def test_every_configuration_and_baseline_is_a_row_on_the_same_images(ablation):
    out, result = ablation
    names = [row["configuration"] for row in result["rows"]]
    assert set(names) == set(ABLATIONS) | {"linear", "knn-tiles", "knn-patches", "zero-shot-text"}
    mapped = {row["configuration"] for row in result["rows"] if row["aupro"] is not None}
    assert {"full", "map-fused", "knn-patches", "zero-shot-text"} <= mapped and "knn-tiles" not in mapped
    aurocs = [row["auroc"]["mean"] for row in result["rows"]]
    assert aurocs == sorted(aurocs, reverse=True)  # sorted by AUROC
    for row in result["rows"]:
        trained = row["configuration"] in ABLATIONS
        assert row["auroc"]["n"] == (2 if trained else 1)
        low, high = row["auroc_ci95"]
        assert low <= row["auroc"]["mean"] + 1e-6 and row["auroc"]["mean"] - 1e-6 <= high or row["auroc"]["n"] > 1
    reference = next(row for row in result["rows"] if row["configuration"] == REFERENCE)
    assert reference["difference"] == {"value": 0.0, "ci95": [0.0, 0.0]}  # paired: exactly 0 against itself
    hashes = {
        json.loads(path.read_text())[name]["protocol"]["image_list_hash"]
        for path in out.rglob("results.json")
        for name in json.loads(path.read_text())
    }
    assert hashes == {result["heldout_hash"]}
    markdown = (out / "ablation.md").read_text()
    assert "| full | RAML |" in markdown and "knn-tiles" in markdown and "NOT MEANINGFUL" in markdown
    assert "| AUPRO % |" in markdown
    assert (out / "ablation.png").stat().st_size > 0
    assert json.loads((out / "ablation.json").read_text()) == result


def test_ablations_change_only_what_they_name(ablation):
    out, _ = ablation
    full = json.loads((out / "runs" / "full-seed0" / "config.json").read_text())
    for name, changes in ABLATIONS.items():
        if name in RESCORED:
            continue
        config = json.loads((out / "runs" / f"{name}-seed0" / "config.json").read_text())
        differing = {key for key in config if config[key] != full[key]}
        implied = (
            set(VARIANT_DEFAULTS) if changes.get("loss_variant") == "original" else set()
        )  # the variant's own defaults
        assert differing == {key for key, value in changes.items() if full[key] != value} | implied, name


def test_score_only_rows_rescore_the_full_runs_without_training(ablation):
    out, _ = ablation
    assert RESCORED and not list((out / "runs").glob("visual-score-only-seed*"))
    full = {
        (r["seed"], r["relpath"]): r
        for r in read_scores_csv(out / "runs" / "results" / SCORES_CSV)
        if r["config"] == REFERENCE
    }
    rescored = [r for r in read_scores_csv(out / "rescored" / "visual-score-only" / SCORES_CSV)]
    assert len(rescored) == len(full) > 0
    for row in rescored:  # s_final = 1·s_visual + 0·s_text of the very same checkpoint
        assert row["config"] == "visual-score-only"
        assert float(row["final"]) == pytest.approx(float(full[row["seed"], row["relpath"]]["visual"]), abs=1e-6)


def test_a_rerun_trains_nothing(ablation, table, monkeypatch):
    out, first = ablation
    calls = []
    monkeypatch.setattr(sweep_module, "fit_runs", lambda *args, **kwargs: calls.append(1))
    again = run_ablation(table, out, [0, 1], n_resamples=100, **FAST)
    assert calls == [] and again["rows"] == first["rows"]


def test_unknown_ablation_and_missing_reference_are_refused(tmp_path, table):
    with pytest.raises(UserError, match="unknown ablation"):
        run_ablation(table, tmp_path, [0], ablations=("full", "no-brain"))
    with pytest.raises(UserError, match="must include 'full'"):
        run_ablation(table, tmp_path, [0], ablations=("bce-only",))


def test_ablate_cli(tmp_path, table):
    result = CliRunner().invoke(
        cli,
        [
            "ablate",
            "--cache-dir",
            str(table.cache_dir),
            "--out",
            str(tmp_path),
            "--seeds",
            "0",
            "--ablations",
            "full,no-text-fusion",
            "--baselines",
            "knn-tiles",
            "--bootstrap",
            "50",
            "--epochs",
            "1",
            "--hidden-dim",
            "16",
            "--attn-dim",
            "8",
            "--feature-dim",
            "8",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "| no-text-fusion |" in result.output and "| knn-tiles |" in result.output


def test_rows_that_need_patch_tokens_are_left_out_with_a_note_on_a_cache_without_them(tmp_path):
    shape = {"bottle": (20, 6, 6, 900)}
    plain = read_cache(write_synthetic_cache(tmp_path / "cache", shape, dim=16, separation=3.0))
    notes = []
    result = run_ablation(
        plain,
        tmp_path / "out",
        [0],
        ablations=("full", "map-fused"),
        baselines=("knn-patches",),
        n_resamples=20,
        progress=notes.append,
        epochs=1,
        hidden_dim=16,
        attn_dim=8,
        feature_dim=8,
    )
    assert [row["configuration"] for row in result["rows"]] == ["full"]
    assert any("left out knn-patches" in note and "--patch-tokens" in note for note in notes)
    assert any("left out map-fused" in note and "no pixel head" in note for note in notes)
