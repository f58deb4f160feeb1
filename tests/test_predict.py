"""predict: a folder with a corrupt file still scores the others, and says which file failed."""
import csv
import shutil

import pytest
from click.testing import CliRunner

from cache import read_cache
from pipeline import cli
from train.config import make_config
from train.fit import fit, write_run

TINY = "extract/model_configs/raml-tiny-test.json"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mvtec_cache):
    out = tmp_path_factory.mktemp("run") / "raml"
    write_run(out, fit(read_cache(mvtec_cache), make_config("adaptive", epochs=2, batch_size=8)))
    return out


def test_predict_folder_with_one_corrupt_file(tmp_path, run_dir, mvtec_root):
    folder = tmp_path / "parts"
    folder.mkdir()
    shutil.copy(mvtec_root / "bottle" / "test" / "good" / "000.png", folder / "good.png")
    shutil.copy(mvtec_root / "bottle" / "test" / "broken" / "000.png", folder / "broken.png")
    (folder / "corrupt.png").write_bytes((mvtec_root / "bottle" / "test" / "good" / "001.png").read_bytes()[:120])
    (folder / "notes.txt").write_text("not an image: ignored in a folder")
    out = tmp_path / "predictions"
    result = CliRunner().invoke(cli, ["predict", str(folder), "--checkpoint", str(run_dir), "--category", "bottle",
                                      "--out", str(out), "--model", TINY, "--random-weights", "--device", "cpu"])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert any(str(folder / "corrupt.png") in line and "ERROR" in line and "cannot decode" in line for line in lines)
    for name in ("good.png", "broken.png"):
        line = next(line for line in lines if line.startswith(str(folder / name)))
        assert "normal" in line or "ANOMALOUS" in line
    assert "1 of 3 files could not be scored" in result.output
    assert "NOT MEANINGFUL" in result.output
    with open(out / "predictions.csv", newline="") as handle:
        rows = {row["file"].split("/")[-1]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"good.png", "broken.png", "corrupt.png"}
    assert rows["corrupt.png"]["final"] == "" and "cannot decode" in rows["corrupt.png"]["error"]
    assert 0.0 <= float(rows["good.png"]["final"]) <= 1.0 and rows["good.png"]["decision"] in ("normal", "anomalous")
    assert (out / "good_heatmap.png").stat().st_size > 1000 and (out / "broken_heatmap.png").is_file()
    assert not (out / "corrupt_heatmap.png").exists()


def test_predict_refuses_a_backbone_other_than_the_checkpoints(tmp_path, run_dir, mvtec_root):
    result = CliRunner().invoke(cli, ["predict", str(mvtec_root / "bottle" / "test" / "good" / "000.png"),
                                      "--checkpoint", str(run_dir), "--category", "bottle", "--out", str(tmp_path),
                                      "--model", TINY])
    assert result.exit_code == 1
    assert "trained on features of --model raml-tiny-test --random-weights" in result.output
