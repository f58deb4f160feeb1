"""A cache that lost its cache.json, and images stored twice: extract rebuilds cache.json from the
shards and resumes (or stops, saying why), reading reports duplicates in one line of our own, and
``raml info --repair`` removes them, keeping the first copy, safely under kill -9."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from raml.cache import ShardRows, read_cache, write_shard
from raml.cache.format import CACHE_JSON, fingerprint, shard_paths
from raml.cache.lock import WriterSlot
from raml.cache.reader import read_token_rows
from raml.cache.repair import repair_cache, restore_fingerprint
from raml.cache.synthetic import write_synthetic_cache
from raml.errors import CacheError
from raml.extract.identity import backbone_identity
from raml.pipeline import cli
from tests.conftest import TINY_MODEL
from tests.test_cache_integrity import copy_cache
from tests.test_extract import assert_same_table, run

REPO = Path(__file__).resolve().parents[1]
TINY_IDENTITY = dict(model=TINY_MODEL, random_weights=True)
INDEX_COLUMNS = ("relpath", "category", "label", "defect_type", "split", "mask_relpath", "height", "width")


def without_cache_json(source, target) -> Path:
    cache_dir = copy_cache(source, target)
    (cache_dir / CACHE_JSON).unlink()
    return cache_dir


# --- 1. a lost cache.json ------------------------------------------------------------------------


def test_extract_rebuilds_a_lost_cache_json_and_encodes_nothing(mvtec_root, mvtec_token_cache, tmp_path, capsys):
    cache_dir = without_cache_json(mvtec_token_cache, tmp_path / "cache")
    summary = run(mvtec_root, cache_dir, None, identity=backbone_identity(**TINY_IDENTITY))
    assert summary.images == 0 and summary.already_cached == 20 and summary.tokens_added == 0
    restored = json.loads((cache_dir / CACHE_JSON).read_text())
    assert restored == json.loads((mvtec_token_cache / CACHE_JSON).read_text())  # patch_tokens included
    said = capsys.readouterr().err.strip().splitlines()
    assert said == [
        f"extract: {cache_dir} had no cache.json: rebuilt it from the backbone identity recorded in its 1 shard "
        f"(raml-tiny-test ({restored['model_config'][:19]}; random(seed=0), random weights), fp32); resuming"
    ]
    assert sorted(p.name for p in cache_dir.glob("*.h5")) == ["features-000of001-00000.h5"]  # no second set
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_token_cache))


def test_extract_stops_on_shards_of_another_backbone_writing_nothing(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = without_cache_json(mvtec_cache, tmp_path / "cache")
    before = sorted(p.name for p in cache_dir.iterdir())
    lock = "extract-000of001.lock"  # the run's writer slot: all it leaves
    other = backbone_identity(**TINY_IDENTITY, precision="int8")
    with pytest.raises(CacheError) as refused:
        run(mvtec_root, cache_dir, None, identity=other)  # a None backbone: loading it fails
    message = str(refused.value)
    assert message.startswith(f"{cache_dir} has no cache.json, and the features in its 1 shard are of another backbone")
    assert "precision: shards 'fp32', this run 'int8'" in message
    assert message.endswith(f"rebuild its cache.json: raml info --repair --cache-dir {cache_dir}")
    assert sorted(p.name for p in cache_dir.iterdir() if p.name != lock) == before  # no cache.json, no shard


def test_shards_of_two_backbones_are_not_given_a_cache_json(tmp_path):
    cache_dir = tmp_path / "mixed"
    cache_dir.mkdir()
    for number, backbone in enumerate(("alpha", "beta")):
        write_synthetic_cache(tmp_path / backbone, {"bottle": (4, 2, 2, 100)}, dim=8, backbone=backbone)
        shutil.copy(
            tmp_path / backbone / "features-000of001-00000.h5", cache_dir / f"features-00{number}of002-00000.h5"
        )
    with pytest.raises(CacheError) as refused:
        restore_fingerprint(cache_dir)
    message = str(refused.value)
    assert "its shards record 2 different backbones (features-000of002-00000.h5: alpha " in message
    assert "; features-001of002-00000.h5: beta " in message
    assert "raml info --repair --cache-dir DIR on each" in message
    assert not (cache_dir / CACHE_JSON).exists()


def test_a_shard_whose_attributes_were_changed_is_not_trusted(mvtec_cache, tmp_path):
    cache_dir = without_cache_json(mvtec_cache, tmp_path / "cache")
    with h5py.File(shard_paths(cache_dir)[0], "r+") as h5:
        h5.attrs["backbone"] = json.dumps("ViT-B-16")  # the checksum still covers the old value
    with pytest.raises(CacheError, match="its attributes do not match their checksum.*Delete it and re-run extract"):
        restore_fingerprint(cache_dir)
    assert not (cache_dir / CACHE_JSON).exists()


def test_reading_shards_without_cache_json_names_the_repair(mvtec_cache, tmp_path):
    cache_dir = without_cache_json(mvtec_cache, tmp_path / "cache")
    result = CliRunner().invoke(cli, ["info", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1 and result.output.count("Error:") == 1
    assert f"{cache_dir} holds 1 shard but no cache.json" in result.output
    assert f"raml info --repair --cache-dir {cache_dir}" in result.output

    repaired = CliRunner().invoke(cli, ["info", "--repair", "--cache-dir", str(cache_dir)])
    assert repaired.exit_code == 0, repaired.output
    assert repaired.output.startswith(f"repair: {cache_dir} had no cache.json: rebuilt it from")
    assert f"{cache_dir}: 20 images, backbone raml-tiny-test" in repaired.output
    assert json.loads((cache_dir / CACHE_JSON).read_text()) == json.loads((mvtec_cache / CACHE_JSON).read_text())


# --- 2. images stored twice ----------------------------------------------------------------------

FIRST = {"bottle": (6, 2, 4, 100)}  # 12 bottle images: the first copies (seed 1)
LATER = {"bottle": (6, 2, 4, 100), "screw": (6, 2, 4, 120)}  # the same 12 again (seed 0), and 12 screws


@pytest.fixture
def twice_stored(tmp_path) -> tuple[Path, Path]:
    """A cache whose bottle images are stored twice, and the cache of their first copies. The first
    copies (features-000of001-*: 4 shards of 3) come first by name; the later ones (features-000of002-*,
    shards of 5 with patch tokens: 2 of bottles only, 1 of 2 bottles and 3 screws, 2 of screws)."""
    first = write_synthetic_cache(tmp_path / "first", FIRST, dim=8, seed=1, shard_size=3, tokens_per_tile=2)
    later = write_synthetic_cache(tmp_path / "later", LATER, dim=8, seed=0, shard_size=5, tokens_per_tile=2)
    cache_dir = copy_cache(first, tmp_path / "twice")
    for path in shard_paths(later):
        shutil.copy(path, cache_dir / path.name.replace("000of001", "000of002"))
    return cache_dir, first


def test_duplicates_are_one_line_of_ours_once_and_the_first_copy_is_read(twice_stored, capsys):
    cache_dir, first = twice_stored
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no Python warning any more
        table = read_cache(cache_dir)
        read_cache(cache_dir, with_features=False)  # a second read in the same process: no second line
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"warning: {cache_dir}: 12 images are stored more than once (12 extra copies in shards "
        "features-000of001-00000.h5, features-000of001-00001.h5, features-000of001-00002.h5, "
        "features-000of001-00003.h5 and 3 more: two extract runs that did not see each other's work); reading "
        f"the first copy of each. Remove the other copies: raml info --repair --cache-dir {cache_dir}"
    ]
    assert len(table) == 24 and len(set(table.relpath.tolist())) == 24
    bottles = read_cache(first)
    is_bottle = table.category == "bottle"
    np.testing.assert_array_equal(table.features[is_bottle], bottles.features)  # seed 1's: the first copies
    assert {table.shards[n].name[:17] for n in table.shard_file[is_bottle]} == {"features-000of001"}
    assert table.duplicate_rows.tolist() == [[4, 0], [4, 1], [4, 2], [4, 3], [4, 4], [5, 0], [5, 1], [5, 2], [5, 3],
                                             [5, 4], [6, 0], [6, 1]]  # fmt: skip


def test_repair_removes_the_later_copies_and_keeps_everything_else(twice_stored, capsys):
    cache_dir, _ = twice_stored
    before = read_cache(cache_dir, report_duplicates=False)
    tokens_before = read_token_rows(before, range(len(before)))
    sizes = {path.name: path.stat().st_size for path in shard_paths(cache_dir)}

    result = CliRunner().invoke(cli, ["info", "--repair", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 0, result.output
    freed = sizes["features-000of002-00000.h5"] + sizes["features-000of002-00001.h5"]
    freed += sizes["features-000of002-00002.h5"] - (cache_dir / "features-000of002-00002.h5").stat().st_size
    assert result.output.splitlines()[0] == (
        "repair: removed 12 extra copies of images (1 shards rewritten, 2 deleted, "
        f"{freed / 1000:.1f} KB freed); the first copy of each image is kept"
    )
    assert "stored more than once" not in capsys.readouterr().err  # the repair reads them without a word
    assert sorted(p.name for p in cache_dir.glob("*.h5")) == [
        *(f"features-000of001-0000{k}.h5" for k in range(4)),
        *(f"features-000of002-0000{k}.h5" for k in (2, 3, 4)),
    ]
    assert not list(cache_dir.glob("*.partial"))
    after = read_cache(cache_dir)
    assert len(after.duplicate_rows) == 0
    assert_same_table(after, before)
    tokens_after = read_token_rows(after, range(len(after)))
    for mine, theirs in zip(tokens_after, tokens_before):
        np.testing.assert_array_equal(mine, theirs)
    np.testing.assert_array_equal(after.token_defect, before.token_defect)
    assert after.text["screw"]["normal"].tolist() == before.text["screw"]["normal"].tolist()
    assert repair_cache(cache_dir).lines() == ["repair: nothing to repair"]


def test_token_rows_of_a_table_read_before_a_repair_are_refused(twice_stored):
    cache_dir, _ = twice_stored
    stale = read_cache(cache_dir)
    repair_cache(cache_dir)
    screws = np.flatnonzero(stale.relpath == "screw/train/good/000.png")  # row 2 of the shard written anew
    with pytest.raises(CacheError, match="no longer holds screw/train/good/000.png: the shard was rewritten"):
        read_token_rows(stale, screws)


def test_repair_waits_for_no_writer(twice_stored):
    cache_dir, _ = twice_stored
    with WriterSlot(cache_dir, 0, 2):
        with pytest.raises(CacheError, match=f"process {os.getpid()} .* is extracting with --shard 0/2"):
            repair_cache(cache_dir)
    assert len(read_cache(cache_dir, report_duplicates=False).duplicate_rows) == 12  # untouched


# --- 3. kill -9 during the repair ----------------------------------------------------------------

DIM = 8


def write_rows(path: Path, relpaths: list[str], meta: dict, text: dict, rng) -> None:
    """A shard holding random unit features for ``relpaths`` (test images of category bottle)."""
    features = rng.normal(size=(len(relpaths), 21, DIM))
    rows = ShardRows(
        features=list((features / np.linalg.norm(features, axis=-1, keepdims=True)).astype(np.float16)),
        records=[
            SimpleNamespace(category="bottle", label=k % 2, defect_type="x", relpath=p, split="test", mask_relpath="")
            for k, p in enumerate(relpaths)
        ],
        sizes=[(64, 64)] * len(relpaths),
    )
    write_shard(path, rows, meta, text, engine="synthetic")


def many_copies(cache_dir: Path, first_shards: int, later_shards: int) -> Path:
    """``first_shards`` shards of 6 images, then ``later_shards`` shards (later by name) that each
    repeat 3 of those images and add 3 new ones, then 2 shards of 6 repeats only."""
    rng = np.random.default_rng(7)
    meta = fingerprint(
        backbone="synthetic", weights="synthetic", random_weights=True, input_size=32, embed_dim=DIM,
        code_version="test", dataset={"kind": "synthetic"}, prompts={}, mean=(0, 0, 0), std=(1, 1, 1),
    )  # fmt: skip
    directions = rng.normal(size=(3, DIM))
    directions = (directions / np.linalg.norm(directions, axis=1, keepdims=True)).astype(np.float32)
    text = {"bottle": {"normal": directions, "anomalous": directions[::-1].copy()}}
    cache_dir.mkdir(parents=True)
    (cache_dir / CACHE_JSON).write_text(json.dumps(meta))
    shards = [("000of001", [f"bottle/{6 * k + i:04d}.png" for i in range(6)]) for k in range(first_shards)]
    shards += [
        (
            "000of002",
            [f"bottle/{(6 * k + i) % (6 * first_shards):04d}.png" for i in range(3)]
            + [f"bottle/{9000 + 3 * k + i:04d}.png" for i in range(3)],
        )
        for k in range(later_shards)
    ]
    shards += [("000of003", [f"bottle/{i:04d}.png" for i in range(6 * k, 6 * k + 6)]) for k in range(2)]
    for slot in ("000of001", "000of002", "000of003"):
        mine = [relpaths for name, relpaths in shards if name == slot]
        for k, relpaths in enumerate(mine):
            write_rows(cache_dir / f"features-{slot}-{k:05d}.h5", relpaths, meta, text, rng)
    return cache_dir


KILL_AT_STEP = """
import os, signal, sys
from raml.cache import files, repair

step, done = int(sys.argv[2]), [0]

def killed_at_step(real):
    def step_or_die(*args):
        done[0] += 1
        if done[0] == step:  # the new shard is complete in its .partial, not yet renamed (or not yet deleted)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args)
    return step_or_die

files.move_into_place = killed_at_step(files.move_into_place)
repair.remove_durably = killed_at_step(repair.remove_durably)
repair.repair_cache(sys.argv[1])
"""


def assert_reads_as(cache_dir: Path, expected) -> None:
    table = read_cache(cache_dir, report_duplicates=False)
    for column in INDEX_COLUMNS:
        np.testing.assert_array_equal(getattr(table, column), getattr(expected, column))
    np.testing.assert_array_equal(table.features, expected.features)


def test_kill_9_at_every_step_of_the_repair_leaves_a_readable_cache(tmp_path):
    """Killed just before each shard's rename and each deletion: the cache reads as before, and a
    second repair finishes the work."""
    source = many_copies(tmp_path / "source", first_shards=3, later_shards=4)  # 4 rewrites, 2 deletions
    expected = read_cache(source, report_duplicates=False)
    assert len(expected.duplicate_rows) == 12 + 12
    for step in range(1, 7):
        cache_dir = copy_cache(source, tmp_path / f"killed-{step}")
        victim = subprocess.run([sys.executable, "-c", KILL_AT_STEP, str(cache_dir), str(step)], cwd=REPO)
        assert victim.returncode == -signal.SIGKILL, f"step {step}: the repair was not killed"
        assert_reads_as(cache_dir, expected)
        again = repair_cache(cache_dir)
        assert len(again.rewritten) + len(again.deleted) == 6 - step + 1
        assert len(read_cache(cache_dir).duplicate_rows) == 0 and not list(cache_dir.glob("*.partial"))
        assert_reads_as(cache_dir, expected)


REPAIR_TIMED = """
import sys, time
from raml.cache.repair import repair_cache
print("ready", flush=True)
start = time.perf_counter()
repair_cache(sys.argv[1])
print(time.perf_counter() - start, flush=True)
"""


@pytest.mark.slow  # seven processes; the test above kills the repair at each of its steps
def test_kill_9_at_random_moments_of_the_repair_leaves_a_readable_cache(tmp_path):
    """A real kill -9 from outside, at seeded random moments of a repair of 22 shards."""
    source = many_copies(tmp_path / "source", first_shards=10, later_shards=20)
    expected = read_cache(source, report_duplicates=False)
    timed = copy_cache(source, tmp_path / "timed")
    output = subprocess.run(
        [sys.executable, "-c", REPAIR_TIMED, str(timed)], cwd=REPO, capture_output=True, text=True, check=True
    )
    duration = float(output.stdout.split()[1])
    rng = np.random.default_rng(0)
    killed_midway = 0
    for attempt in range(6):
        cache_dir = copy_cache(source, tmp_path / f"killed-{attempt}")
        victim = subprocess.Popen(
            [sys.executable, "-c", REPAIR_TIMED, str(cache_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True
        )
        assert victim.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0, duration))
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        left = len(read_cache(cache_dir, report_duplicates=False).duplicate_rows)
        killed_midway += 0 < left < len(expected.duplicate_rows)
        assert_reads_as(cache_dir, expected)
        repair_cache(cache_dir)
        assert len(read_cache(cache_dir).duplicate_rows) == 0
        assert_reads_as(cache_dir, expected)
    assert killed_midway, "no kill landed inside the repair: the test proved nothing"
