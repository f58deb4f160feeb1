"""Stage one end to end with the tiny CLIP: cache round-trip, resume, sharding, bad input, refusals."""

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raml.cache import read_cache
from raml.errors import CacheError
from raml.extract.config import ExtractConfig
from raml.extract.datasets import read_dataset
from raml.extract.encoder import WeightsUnavailableError, load_backbone
from raml.extract.prompts import prompts_for
from raml.extract.pyramid import BadImageError, load_rgb, pyramid_pixels
from raml.extract.run import extract_features
from raml.pipeline import cli
from tests.conftest import TINY_MODEL
from tests.synthetic import make_folder, make_mvtec


def run(root, cache_dir, backbone, dataset="mvtec", identity=None, **settings):
    """extract_features with ``settings`` (``ExtractConfig``'s fields; no decoding workers unless given)."""
    settings.setdefault("workers", 0)
    config = ExtractConfig(**settings)
    return extract_features(dataset, root, cache_dir, lambda: backbone, config, identity=identity, progress=False)


def assert_same_table(a, b):
    for column in ("relpath", "category", "label", "defect_type", "split", "mask_relpath", "height", "width"):
        np.testing.assert_array_equal(getattr(a, column), getattr(b, column))
    np.testing.assert_array_equal(a.features, b.features)


def test_round_trip_matches_direct_encoding(mvtec_root, mvtec_cache, tiny_backbone):
    table = read_cache(mvtec_cache)
    _, records = read_dataset("mvtec", mvtec_root)
    assert len(table) == len(records) == 20
    assert table.features.shape == (20, 21, 32) and table.features.dtype == np.float16
    assert table.relpath.tolist() == [r.relpath for r in records]
    assert table.label.tolist() == [r.label for r in records]
    assert (table.height == 83).all() and (table.width == 97).all()
    np.testing.assert_allclose(np.linalg.norm(table.features.astype(np.float32), axis=-1), 1, atol=2e-3)

    index = 7
    image = load_rgb(mvtec_root / records[index].relpath)
    direct = tiny_backbone.encode_images(pyramid_pixels(image, 32, tiny_backbone.mean, tiny_backbone.std))
    np.testing.assert_array_equal(table.features[index], direct.astype(np.float16))

    assert set(table.text) == {"bottle", "metal_nut"}
    expected = tiny_backbone.encode_texts(prompts_for("metal_nut")["anomalous"])
    np.testing.assert_allclose(table.text["metal_nut"]["anomalous"], expected, atol=1e-6)
    assert "damaged metal nut with defects." in prompts_for("metal_nut")["anomalous"]
    meta = table.meta
    assert meta["backbone"] == "raml-tiny-test" and meta["random_weights"] is True
    assert meta["input_size"] == 32 and meta["crop_layout"] == [[1, 1], [2, 2], [4, 4]]
    assert table.engines == ["torch"]


def test_rerun_encodes_nothing(mvtec_root, mvtec_cache, tiny_backbone, tmp_path):
    cache_dir = tmp_path / "copy"
    shutil.copytree(mvtec_cache, cache_dir)
    summary = run(mvtec_root, cache_dir, tiny_backbone)
    assert summary.images == 0 and summary.already_cached == 20


class CrashAfter:
    """Wraps a backbone and dies (like kill -9 from the cache's point of view) after n batches."""

    def __init__(self, backbone, batches):
        self._backbone, self._left = backbone, batches

    def __getattr__(self, name):
        return getattr(self._backbone, name)

    def encode_crops(self, crops):
        if self._left == 0:
            raise KeyboardInterrupt
        self._left -= 1
        return self._backbone.encode_crops(crops)


def test_resume_after_crash_gives_the_same_cache(mvtec_root, mvtec_cache, tiny_backbone, tmp_path):
    cache_dir = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(mvtec_root, cache_dir, CrashAfter(tiny_backbone, 5), batch_size=2, shard_size=4)
    assert len(read_cache(cache_dir)) == 8  # two finished shards; the third was in memory only
    (cache_dir / "features-000of001-00002.h5.partial").write_bytes(b"half a shard")  # killed mid-write
    summary = run(mvtec_root, cache_dir, tiny_backbone, batch_size=2, shard_size=4)
    assert summary.already_cached == 8 and summary.images == 12
    assert not list(cache_dir.glob("*.partial"))
    uninterrupted = tmp_path / "straight"
    run(mvtec_root, uninterrupted, tiny_backbone, batch_size=2, shard_size=4)
    assert_same_table(read_cache(cache_dir), read_cache(uninterrupted))
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))


def test_two_shards_read_as_one_run(mvtec_root, mvtec_cache, tiny_backbone, tmp_path):
    cache_dir = tmp_path / "sharded"
    first = run(mvtec_root, cache_dir, tiny_backbone, shard="0/2")
    second = run(mvtec_root, cache_dir, tiny_backbone, shard="1/2")
    assert first.images == second.images == 10
    assert sorted(p.name for p in cache_dir.glob("*.h5")) == [
        "features-000of002-00000.h5",
        "features-001of002-00000.h5",
    ]
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))


def test_torchrun_environment_picks_the_shard(mvtec_root, tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    run(mvtec_root, tmp_path / "c", tiny_backbone)
    assert [p.name for p in (tmp_path / "c").glob("*.h5")] == ["features-001of003-00000.h5"]
    assert len(read_cache(tmp_path / "c")) == 7  # rows 1, 4, 7, ..., 19 of 20


@pytest.fixture
def folder_with_bad_file(tmp_path):
    root = make_folder(tmp_path / "data", category="widget", n_good=6, defects=("dent",), n_defect=3)
    bad = root / "widget" / "good" / "img3.png"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated
    return root, bad


def test_bad_image_stops_with_its_name_and_keeps_finished_shards(folder_with_bad_file, tiny_backbone, tmp_path):
    root, bad = folder_with_bad_file
    cache_dir = tmp_path / "cache"
    with pytest.raises(BadImageError) as info:
        run(root, cache_dir, tiny_backbone, dataset="folder", batch_size=1, shard_size=2)
    assert str(bad) in str(info.value) and "--skip-bad" in str(info.value)
    table = read_cache(cache_dir)
    # sorted order: dent/img0..2, good/img0..5; the bad file is the 7th: three shards of 2 finished
    assert table.relpath.tolist() == [
        "widget/dent/img0.png",
        "widget/dent/img1.png",
        "widget/dent/img2.png",
        "widget/good/img0.png",
        "widget/good/img1.png",
        "widget/good/img2.png",
    ]


def test_skip_bad_lists_skipped_files_and_never_writes_zeros(folder_with_bad_file, tiny_backbone, tmp_path):
    root, bad = folder_with_bad_file
    cache_dir = tmp_path / "cache"
    summary = run(root, cache_dir, tiny_backbone, dataset="folder", skip_bad=True)
    assert summary.images == 8 and [p for p, _ in summary.skipped] == [str(bad)]
    table = read_cache(cache_dir)
    assert "widget/good/img3.png" not in table.relpath.tolist() and len(table) == 8
    assert table.skipped[0][0] == "widget/good/img3.png" and "cannot decode" in table.skipped[0][1]
    assert (np.abs(table.features.astype(np.float32)).sum(axis=(1, 2)) > 0).all()
    report = json.loads((cache_dir / "extract-report-000of001.json").read_text())
    assert report["skipped"][0]["path"] == str(bad)

    assert run(root, cache_dir, tiny_backbone, dataset="folder", skip_bad=True).images == 0  # skipped = done
    Image.new("RGB", (90, 90), (9, 9, 9)).save(bad)  # the user repairs the file
    repaired = run(root, cache_dir, tiny_backbone, dataset="folder", retry_skipped=True)
    assert repaired.images == 1 and len(read_cache(cache_dir)) == 9 and read_cache(cache_dir).skipped == []


def test_refuses_to_mix_backbones(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = tmp_path / "mixed"
    shutil.copytree(mvtec_cache, cache_dir)
    config = json.loads(open(TINY_MODEL).read())
    config["vision_cfg"]["image_size"] = 48
    other = tmp_path / "raml-tiny-48.json"
    other.write_text(json.dumps(config))
    backbone = load_backbone(str(other), random_weights=True, device="cpu")
    with pytest.raises(CacheError, match=r"another backbone.*input_size: cache has 32, this run 48"):
        run(mvtec_root, cache_dir, backbone)


def test_weights_unavailable_message():
    with pytest.raises(WeightsUnavailableError) as info:
        load_backbone("ViT-B-16", pretrained="openai", device="cpu")
    message = str(info.value)
    assert "ViT-B-16" in message and "--weights PATH" in message and "--random-weights" in message
    with pytest.raises(WeightsUnavailableError, match="no such file"):
        load_backbone("ViT-B-16", weights="/nowhere/ViT-B-16.bin", device="cpu")


def test_cli_extract_and_info(tmp_path):
    root = make_mvtec(tmp_path / "data", categories=("pill",), n_train=2, n_test_good=1, defects=("crack",), n_defect=1)
    runner = CliRunner()
    args = [
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--cache-dir",
        str(tmp_path / "c"),
        "--model",
        TINY_MODEL,
        "--random-weights",
        "--workers",
        "0",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "extract: 4 images encoded, 0 skipped" in result.output
    result = runner.invoke(cli, ["info", "--cache-dir", str(tmp_path / "c")])
    assert "pill" in result.output and "3 normal" in result.output and "random weights" in result.output

    missing = runner.invoke(cli, args[:4] + [str(tmp_path / "absent")] + args[5:])
    assert missing.exit_code == 1 and "dataset root does not exist" in missing.output
    assert "Traceback" not in missing.output


def test_kill_9_then_rerun_gives_the_same_cache(tmp_path):
    """A real ``kill -9`` of the command line mid-run; the re-run completes the identical cache."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = make_mvtec(
        tmp_path / "data", categories=("bottle", "cable", "grid"), n_train=30, n_test_good=10, n_defect=10
    )
    command = [
        sys.executable,
        "pipeline.py",
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--model",
        TINY_MODEL,
        "--random-weights",
        "--workers",
        "0",
        "--batch-size",
        "1",
        "--shard-size",
        "2",
        "--cache-dir",
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    victim = subprocess.Popen(
        command + [str(tmp_path / "killed")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 600  # a busy machine imports torch slowly: wait for the shards, not a clock
    while len(list((tmp_path / "killed").glob("*.h5"))) < 3 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    if (tmp_path / "killed" / "extract-report-000of001.json").exists():
        pytest.skip("the run finished before it could be killed")
    assert len(read_cache(tmp_path / "killed")) < 150
    subprocess.run(command + [str(tmp_path / "killed")], env=env, check=True, capture_output=True)
    subprocess.run(command + [str(tmp_path / "straight")], env=env, check=True, capture_output=True)
    assert_same_table(read_cache(tmp_path / "killed"), read_cache(tmp_path / "straight"))


def test_worker_processes_give_the_same_cache(mvtec_root, mvtec_cache, tiny_backbone, tmp_path):
    """Decoding in two worker processes (crops through shared memory) changes nothing in the cache."""
    run(mvtec_root, tmp_path / "workers", tiny_backbone, workers=2)
    assert_same_table(read_cache(tmp_path / "workers"), read_cache(mvtec_cache))


def test_failed_shard_write_stops_the_run_and_keeps_the_shards_before(
    mvtec_root, mvtec_cache, tiny_backbone, tmp_path, monkeypatch
):
    """Shards are written by a background thread: its error still stops the run, in the caller."""
    from raml.extract import run as extract_run

    real_write, calls = extract_run.write_shard, []

    def write_then_fail(path, *args):
        calls.append(path.name)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_write(path, *args)

    monkeypatch.setattr(extract_run, "write_shard", write_then_fail)
    cache_dir = tmp_path / "full-disk"
    with pytest.raises(OSError, match="No space left"):
        run(mvtec_root, cache_dir, tiny_backbone, batch_size=2, shard_size=4)
    assert calls[:2] == ["features-000of001-00000.h5", "features-000of001-00001.h5"]
    assert len(read_cache(cache_dir)) == 4
    monkeypatch.setattr(extract_run, "write_shard", real_write)
    assert run(mvtec_root, cache_dir, tiny_backbone, batch_size=2, shard_size=4).images == 16
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))


def test_kill_9_with_batches_in_flight_then_rerun_gives_the_same_cache(tmp_path, tiny_backbone):
    """SIGKILL to the whole process group while two workers decode, a batch waits on the encoder's
    device, one is encoded and shards are written by their thread; the re-run completes the cache
    that one uninterrupted run writes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    root = make_mvtec(
        tmp_path / "data", categories=("bottle",), n_train=24, n_test_good=8, n_defect=4, size=(211, 157)
    )  # 40 images
    killed = tmp_path / "killed"
    command = [
        sys.executable,
        "pipeline.py",
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--model",
        TINY_MODEL,
        "--random-weights",
        "--workers",
        "2",
        "--batch-size",
        "2",
        "--shard-size",
        "4",
        "--cache-dir",
        str(killed),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    victim = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    deadline = time.monotonic() + 600  # a busy machine imports torch slowly: wait for the shards, not a clock
    while len(list(killed.glob("*.h5"))) < 2 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    if (killed / "extract-report-000of001.json").exists():
        pytest.skip("the run finished before it could be killed")
    cached = len(read_cache(killed))
    assert 8 <= cached < 40 and cached % 4 == 0  # whole shards only
    # The re-run and the uninterrupted run go through the same code in this process: no second torch import.
    rerun = run(root, killed, tiny_backbone, workers=2, batch_size=2, shard_size=4)
    assert (rerun.already_cached, rerun.images) == (cached, 40 - cached)
    assert not list(killed.glob("*.partial"))
    run(root, tmp_path / "straight", tiny_backbone, workers=2, batch_size=2, shard_size=4)
    assert_same_table(read_cache(killed), read_cache(tmp_path / "straight"))


def test_torchrun_two_processes_write_the_cache_of_one(mvtec_root, mvtec_cache, tmp_path):
    """``torchrun --nproc_per_node 2``: each rank takes its share from RANK/WORLD_SIZE and writes its
    own shard; read together they are the single-process cache."""
    import os
    import subprocess
    import sys

    cache_dir = tmp_path / "ranks"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "pipeline.py",
            "extract",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--model",
            TINY_MODEL,
            "--random-weights",
            "--workers",
            "0",
            "--cache-dir",
            str(cache_dir),
        ],
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        check=True,
        capture_output=True,
    )
    assert sorted(p.name for p in cache_dir.glob("*.h5")) == [
        "features-000of002-00000.h5",
        "features-001of002-00000.h5",
    ]
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))
