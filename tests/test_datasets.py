"""Dataset readers on synthetic trees in the exact layouts of MVTec AD, VisA and generic folders."""

import shutil

import pytest

from raml.errors import OptionError
from raml.extract.datasets import DatasetLayoutError, ImageRecord, read_dataset
from tests.synthetic import make_folder, make_mvtec, make_visa


def test_mvtec_records(tmp_path):
    make_mvtec(tmp_path, categories=("bottle", "metal_nut"), n_train=3, n_test_good=2, n_defect=2)
    root, records = read_dataset("mvtec", tmp_path)
    assert root == tmp_path and len(records) == 2 * (3 + 2 + 2 * 2)
    assert records == sorted(records, key=lambda r: (r.category, r.relpath))
    assert ImageRecord("bottle", 0, "good", "bottle/train/good/000.png", "train") in records
    assert ImageRecord("bottle", 0, "good", "bottle/test/good/001.png", "test") in records
    assert (
        ImageRecord(
            "metal_nut",
            1,
            "scratch",
            "metal_nut/test/scratch/001.png",
            "test",
            "metal_nut/ground_truth/scratch/001_mask.png",
        )
        in records
    )
    _, only = read_dataset("mvtec", tmp_path, ["metal_nut"])
    assert {r.category for r in only} == {"metal_nut"}


def test_mvtec_uppercase_suffix_and_category_without_anomalies(tmp_path):
    make_mvtec(tmp_path, categories=("screw",), suffix=".JPG")
    make_mvtec(tmp_path, categories=("tile",), defects=())
    _, records = read_dataset("mvtec", tmp_path)
    screws = [r for r in records if r.category == "screw"]
    assert screws and all(r.relpath.endswith(".JPG") for r in screws)
    tiles = [r for r in records if r.category == "tile"]
    assert len(tiles) == 6 and {r.label for r in tiles} == {0}


def test_visa_original_layout_uses_split_csv(tmp_path):
    make_visa(tmp_path, categories=("candle", "pcb1"), n_normal=5, n_anomaly=3)
    root, records = read_dataset("visa", tmp_path)
    assert len(records) == 16
    candle = [r for r in records if r.category == "candle"]
    assert sum(r.label for r in candle) == 3
    assert {r.split for r in candle if r.label == 0} == {"train", "test"}
    anomaly = next(r for r in candle if r.label == 1)
    assert anomaly.relpath == "candle/Data/Images/Anomaly/0000.JPG"
    assert anomaly.mask_relpath == "candle/Data/Masks/Anomaly/0000.png" and anomaly.defect_type == "anomaly"


def test_visa_converted_to_mvtec_layout(tmp_path):
    make_mvtec(tmp_path, categories=("cashew",))
    _, records = read_dataset("visa", tmp_path)
    assert {r.category for r in records} == {"cashew"} and len(records) == 4 + 2 + 2 * 2


def test_visa_csv_pointing_at_missing_image_is_named(tmp_path):
    make_visa(tmp_path, categories=("candle",))
    (tmp_path / "candle/Data/Images/Normal/0001.JPG").unlink()
    with pytest.raises(DatasetLayoutError, match=r"1cls.csv:3: image candle/Data/Images/Normal/0001.JPG"):
        read_dataset("visa", tmp_path)


def test_folder_layout_multi_and_single_category(tmp_path):
    make_folder(tmp_path / "many", category="widget", n_good=4, defects=("dent", "scratch"), n_defect=3)
    _, records = read_dataset("folder", tmp_path / "many")
    assert len(records) == 4 + 6 and {r.split for r in records} == {"test"}
    dent = next(r for r in records if r.defect_type == "dent")
    assert dent.label == 1 and dent.mask_relpath == "widget/masks/dent/img0_mask.png"

    make_folder(tmp_path / "single", category="gear")
    _, single = read_dataset("folder", tmp_path / "single" / "gear")
    assert {r.category for r in single} == {"gear"} and len(single) == 7


def test_textile_demo_data():
    root, records = read_dataset("textile", None)
    assert len(records) == 2000
    assert sum(r.label == 0 for r in records) == 1000
    assert {r.defect_type for r in records} == {"good", "local", "global"}
    assert (root / records[0].relpath).is_file()


@pytest.mark.parametrize("kind", ["mvtec", "visa", "folder"])
def test_missing_root_shows_expected_layout(tmp_path, kind):
    with pytest.raises(DatasetLayoutError) as info:
        read_dataset(kind, tmp_path / "nope")
    message = str(info.value)
    assert "does not exist" in message and "<root>/<category>/" in message


def test_wrong_layout_and_unknown_category(tmp_path):
    (tmp_path / "bottle" / "images").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="no mvtec category found"):
        read_dataset("mvtec", tmp_path)
    shutil.rmtree(tmp_path / "bottle")
    make_mvtec(tmp_path, categories=("bottle",))
    with pytest.raises(OptionError, match=r"--categories: .* has no category zipper \(it has: bottle\)"):
        read_dataset("mvtec", tmp_path, ["zipper"])
