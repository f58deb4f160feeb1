"""A cache that cannot lie: bad inputs, one writer per shard slot, the model config by
content, checksums and validation on read, stale partial shards, EXIF orientation; and a re-run
with nothing to encode that never loads CLIP."""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raml.cache import ShardRows, read_cache, write_shard
from raml.cache.format import CACHE_JSON, mismatched_fields
from raml.cache.lock import WriterSlot, partial_shard_status
from raml.errors import CacheError
from raml.extract import pyramid
from raml.extract.config import ExtractConfig
from raml.extract.encoder import load_backbone
from raml.extract.identity import backbone_identity, config_sha256, identity_of, weights_sha256
from raml.extract.pyramid import BadImageError, load_rgb
from raml.extract.run import extract_features
from raml.pipeline import cli
from tests.conftest import TINY_MODEL
from tests.synthetic import make_folder, make_mvtec, part_image
from tests.test_extract import assert_same_table, run

REPO = Path(__file__).resolve().parents[1]
TINY_IDENTITY = dict(model=TINY_MODEL, random_weights=True)


def must_not_load():
    raise AssertionError("CLIP was loaded although there was nothing to encode")


def copy_cache(source, target) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.lock"))
    return Path(target)


# --- 1. decompression bombs -------------------------------------------------------------------


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG whose header claims ``width`` x ``height`` px, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )
    return path


def test_decompression_bomb_is_an_ordinary_named_reject(tmp_path, tiny_backbone):
    root = make_folder(tmp_path / "data", category="widget", n_good=3, defects=("dent",), n_defect=1)
    bomb = png_header(root / "widget" / "good" / "bomb.png", 100_000, 100_000)
    with pytest.raises(BadImageError) as info:
        load_rgb(bomb)
    assert str(bomb) in str(info.value)
    assert "10000000000 pixels" in info.value.reason and "178956970 pixels" in info.value.reason

    summary = run(root, tmp_path / "cache", tiny_backbone, dataset="folder", skip_bad=True)
    assert summary.images == 4 and [path for path, _ in summary.skipped] == [str(bomb)]
    assert read_cache(tmp_path / "cache").skipped[0][0] == "widget/good/bomb.png"


def test_images_over_the_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "part.png"
    part_image(0, size=(97, 83)).save(path)
    monkeypatch.setattr(pyramid, "MAX_IMAGE_PIXELS", 97 * 83 - 1)
    with pytest.raises(BadImageError, match=r"8,051 px \(97x83\), over RAML's limit of 8,050 px"):
        load_rgb(path)


# --- 2. file names that are not valid UTF-8 ----------------------------------------------------


@pytest.fixture
def folder_with_latin1_name(tmp_path):
    root = make_folder(tmp_path / "data", category="widget", n_good=3, defects=("dent",), n_defect=1)
    good = os.fsencode(root / "widget" / "good")
    part_image(7).save(os.fsdecode(good + b"/zz_\xff.png"))  # "ÿ" in Latin-1: not UTF-8
    return root


def test_name_that_is_not_utf8_stops_the_run_by_name_before_encoding(folder_with_latin1_name, tmp_path):
    cache_dir = tmp_path / "cache"
    with pytest.raises(BadImageError) as info:
        run(folder_with_latin1_name, cache_dir, None, dataset="folder", identity=backbone_identity(**TINY_IDENTITY))
    message = str(info.value)
    assert "widget/good/zz_\\xff.png" in message and "not valid UTF-8" in message and "--skip-bad" in message
    assert not list(cache_dir.glob("*.h5"))


def test_name_that_is_not_utf8_is_skipped_and_listed_under_skip_bad(folder_with_latin1_name, tmp_path, tiny_backbone):
    cache_dir = tmp_path / "cache"
    summary = run(folder_with_latin1_name, cache_dir, tiny_backbone, dataset="folder", skip_bad=True)
    assert summary.images == 4 and len(summary.skipped) == 1 and summary.skipped[0][0].endswith("zz_\\xff.png")
    table = read_cache(cache_dir)
    assert len(table) == 4 and [path for path, _ in table.skipped] == ["widget/good/zz_\\xff.png"]
    shards = sorted(cache_dir.glob("*.h5"))

    again = run(
        folder_with_latin1_name,
        cache_dir,
        None,
        dataset="folder",
        skip_bad=True,
        identity=backbone_identity(**TINY_IDENTITY),
    )
    assert again.images == 0 and again.skipped == [] and again.already_cached == 5
    assert sorted(cache_dir.glob("*.h5")) == shards


# --- 3. one writer per (cache, shard i/n) ----------------------------------------------------

GATED_EXTRACT = """
import sys, time
from raml.extract.encoder import load_backbone
from raml.extract.identity import backbone_identity
from raml.extract.config import ExtractConfig
from raml.extract.run import extract_features
from pathlib import Path

root, cache_dir, shard, gate = sys.argv[1:5]

def load():   # called with the slot held: wait until the test opens the gate
    Path(gate + ".waiting").write_text("")
    while not Path(gate).exists():
        time.sleep(0.01)
    return load_backbone(sys.argv[5], random_weights=True, device="cpu")

summary = extract_features("mvtec", root, cache_dir, load, ExtractConfig(shard=shard, workers=0), progress=False,
                           identity=backbone_identity(sys.argv[5], random_weights=True))
print("encoded", summary.images)
"""


def start_gated(root, cache_dir, shard, gate) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", GATED_EXTRACT, str(root), str(cache_dir), shard, str(gate), TINY_MODEL],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def listing(directory: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(directory.iterdir())}


def test_second_writer_of_a_shard_stops_at_once_naming_the_holder(mvtec_root, mvtec_cache, tmp_path):
    cache_dir, gate = tmp_path / "cache", tmp_path / "gate"
    holder = start_gated(mvtec_root, cache_dir, "0/1", gate)
    try:
        wait_for(Path(f"{gate}.waiting"), holder)
        before = listing(cache_dir)
        second = subprocess.run(
            [
                sys.executable,
                "pipeline.py",
                "extract",
                "--dataset",
                "mvtec",
                "--root",
                str(mvtec_root),
                "--cache-dir",
                str(cache_dir),
                "--model",
                TINY_MODEL,
                "--random-weights",
                "--workers",
                "0",
                "--shard",
                "0/1",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"shard 0/1 is being written by process {holder.pid}" in second.stderr
        assert "Traceback" not in second.stderr
        assert listing(cache_dir) == before  # the second writer wrote nothing
    finally:
        gate.write_text("")
        output = holder.communicate(timeout=300)[0]
    assert holder.returncode == 0 and "encoded 20" in output, output
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))


@pytest.mark.slow  # two CLIP processes; test_partial_of_a_live_writer checks the same locks in-process
def test_shards_of_one_count_are_written_side_by_side(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    gates = [tmp_path / "gate0", tmp_path / "gate1"]
    writers = [start_gated(mvtec_root, cache_dir, f"{i}/2", gate) for i, gate in enumerate(gates)]
    try:
        for writer, gate in zip(writers, gates):
            wait_for(Path(f"{gate}.waiting"), writer)  # both hold their slot at the same time
    finally:
        for gate in gates:
            gate.write_text("")
        outputs = [writer.communicate(timeout=300)[0] for writer in writers]
    assert [w.returncode for w in writers] == [0, 0] and all("encoded 10" in out for out in outputs), outputs
    assert_same_table(read_cache(cache_dir), read_cache(mvtec_cache))


def test_another_shard_count_at_work_is_refused(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = copy_cache(mvtec_cache, tmp_path / "cache")
    with WriterSlot(cache_dir, 1, 2):
        with pytest.raises(CacheError, match=rf"process {os.getpid()} .* is extracting with --shard 1/2"):
            run(mvtec_root, cache_dir, None, identity=backbone_identity(**TINY_IDENTITY))


def test_writer_refuses_rows_not_encoded_from_an_image(tmp_path, mvtec_cache):
    table = read_cache(mvtec_cache)
    meta, text = table.meta, table.text
    record = SimpleNamespace(
        category="bottle", label=0, defect_type="good", relpath="bottle/x.png", split="train", mask_relpath=""
    )
    good = table.features[0]
    cases = {
        "all-zero features": (np.zeros_like(good), record),
        "empty relpath": (good, SimpleNamespace(**{**vars(record), "relpath": ""})),
        "empty category and split": (good, SimpleNamespace(**{**vars(record), "category": "", "split": ""})),
        "label -1": (good, SimpleNamespace(**{**vars(record), "label": -1})),
        "non-UTF-8 name": (good, SimpleNamespace(**{**vars(record), "relpath": "bottle/zz_\udcff.png"})),
    }
    for case, (features, row) in cases.items():
        path = tmp_path / "features-000of001-00000.h5"
        rows = ShardRows(features=[features], records=[row], sizes=[(83, 97)])
        with pytest.raises(AssertionError, match="nothing was written"):
            write_shard(path, rows, meta, text, "torch")
        assert list(tmp_path.iterdir()) == [], case


# --- 4. the model config by content ----------------------------------------------------------


def test_same_config_name_with_other_content_is_refused(tmp_path):
    config = json.loads(Path(TINY_MODEL).read_text())
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tiny.json").write_text(json.dumps(config))
    config["vision_cfg"]["layers"] = 3  # another architecture; same name, input size and embedding size
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tiny.json").write_text(json.dumps(config))
    root = make_mvtec(tmp_path / "data", categories=("pill",), n_train=2, n_test_good=1, defects=("crack",), n_defect=1)
    run(root, tmp_path / "cache", load_backbone(str(tmp_path / "a" / "tiny.json"), random_weights=True, device="cpu"))
    other = load_backbone(str(tmp_path / "b" / "tiny.json"), random_weights=True, device="cpu")
    make_mvtec(tmp_path / "data", categories=("screw",), n_train=2, n_test_good=1, defects=("crack",), n_defect=1)
    with pytest.raises(CacheError, match=r"another backbone \(model_config: cache has 'sha256:"):
        run(root, tmp_path / "cache", other)


def test_identity_is_the_resolved_config_for_built_in_names_too(tmp_path):
    import open_clip

    plain = backbone_identity("ViT-B-16", random_weights=True)
    assert plain.model_config == config_sha256(open_clip.get_model_config("ViT-B-16"))
    copy = tmp_path / "my-vit.json"
    copy.write_text(json.dumps(open_clip.get_model_config("ViT-B-16")))
    assert backbone_identity(str(copy), random_weights=True).model_config == plain.model_config  # content, not name
    openai = backbone_identity("ViT-B-16", "openai")  # no download: only the tag's description
    assert openai.model_config != plain.model_config  # OpenAI's weights need QuickGELU: another config
    assert openai.weights == "openai" and openai.input_size == 224 and openai.embed_dim == 512
    assert openai.mean == (0.48145466, 0.4578275, 0.40821073)


def test_identity_is_the_one_load_backbone_builds_and_is_memoised(tmp_path, monkeypatch):
    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))
    resolved = backbone_identity(**TINY_IDENTITY)  # cold: resolved with open_clip, then memoised
    assert len(list((tmp_path / "user-cache" / "identity").glob("identity-*.json"))) == 1
    assert backbone_identity(**TINY_IDENTITY) == resolved  # warm
    assert identity_of(load_backbone(TINY_MODEL, random_weights=True, device="cpu")) == resolved
    assert backbone_identity(**TINY_IDENTITY, precision="int8").precision == "int8"


def test_weights_file_hash_is_memoised_by_path_size_and_mtime(tmp_path, monkeypatch):
    import hashlib

    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"a" * 1000)
    assert weights_sha256(weights) == hashlib.sha256(b"a" * 1000).hexdigest()
    assert len(list((tmp_path / "user-cache" / "identity").glob("file-sha256-*.json"))) == 1
    weights.write_bytes(b"b" * 1001)
    assert weights_sha256(weights) == hashlib.sha256(b"b" * 1001).hexdigest()


def test_cache_from_before_model_config_is_read_but_not_extended(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = copy_cache(mvtec_cache, tmp_path / "old")
    meta = json.loads((cache_dir / CACHE_JSON).read_text())
    del meta["model_config"]
    (cache_dir / CACHE_JSON).write_text(json.dumps(meta))
    for shard in cache_dir.glob("*.h5"):
        with h5py.File(shard, "r+") as h5:  # as RAML wrote shards then: format 1, attributes unchecked
            del h5.attrs["model_config"]
            h5.attrs["format_version"] = json.dumps(1)
            checksums = json.loads(h5.attrs["xxh3_64"])
            del checksums["@attributes"]
            h5.attrs["xxh3_64"] = json.dumps(checksums)
    assert len(read_cache(cache_dir)) == 20
    with pytest.raises(CacheError, match="written before RAML recorded the content of the model config"):
        run(mvtec_root, cache_dir, None, identity=backbone_identity(**TINY_IDENTITY))
    checkpoint_before = {
        key: meta.get(key)
        for key in ("backbone", "weights", "random_weights", "input_size", "embed_dim", "crop_layout")
    }
    assert mismatched_fields(checkpoint_before, read_cache(mvtec_cache).meta) == []  # unrecorded: matches
    assert mismatched_fields(meta, read_cache(mvtec_cache).meta, unrecorded_matches=False) == ["model_config"]


# --- 5. checksums and validation on read ----------------------------------------------------


def flip_bytes(path: Path, offset: int, count: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(offset)
        data = bytearray(handle.read(count))
        handle.seek(offset)
        handle.write(bytes(b ^ 0xFF for b in data))


def data_offset(path: Path, dataset: str) -> tuple[int, int]:
    """Where the bytes of ``dataset`` (its first chunk, if chunked) lie in the file, and how many."""
    with h5py.File(path, "r") as h5:
        data = h5[dataset]
        if data.chunks is None:
            return data.id.get_offset(), data.id.get_storage_size()
        info = data.id.get_chunk_info(0)
    return info.byte_offset, info.size


@pytest.fixture
def damaged(mvtec_cache, tmp_path):
    """A copy of the cache and its first shard, to damage."""
    cache_dir = copy_cache(mvtec_cache, tmp_path / "damaged")
    return cache_dir, sorted(cache_dir.glob("*.h5"))[0]


def test_flipped_feature_bytes_are_caught_and_the_shard_named(damaged, mvtec_root):
    cache_dir, shard = damaged
    offset, size = data_offset(shard, "features")
    flip_bytes(shard, offset + size // 2, 64)
    for read in (lambda: read_cache(cache_dir), lambda: read_cache(cache_dir, with_features=False)):
        with pytest.raises(CacheError) as info:
            read()
        message = str(info.value)
        assert str(shard) in message and "dataset features does not match its checksum" in message
        assert "Delete it and re-run extract" in message
    result = CliRunner().invoke(cli, ["info", "--cache-dir", str(cache_dir)])
    assert result.exit_code == 1 and "does not match its checksum" in result.output and "Traceback" not in result.output
    with pytest.raises(CacheError, match="does not match its checksum"):
        run(mvtec_root, cache_dir, None, identity=backbone_identity(**TINY_IDENTITY))


def test_flipped_label_byte_is_caught(damaged):
    cache_dir, shard = damaged
    offset, _ = data_offset(shard, "label")
    flip_bytes(shard, offset, 1)  # 0 → -1
    with pytest.raises(CacheError, match=r"dataset label does not match its checksum"):
        read_cache(cache_dir)


def test_flipped_relpath_byte_is_caught(damaged):
    cache_dir, shard = damaged
    relpath = read_cache(cache_dir).relpath[0].encode()
    data = shard.read_bytes()
    flip_bytes(shard, data.index(relpath) + len(relpath) - 5, 1)
    with pytest.raises(CacheError, match="dataset relpath does not match its checksum"):
        read_cache(cache_dir)


def legacy_shard(path: Path, table, *, scale=1.0, label=None, split=None, relpath=None) -> None:
    """A shard as RAML wrote it before checksums, from ``table``'s rows, optionally damaged."""
    with h5py.File(path, "w") as h5:
        for key, value in table.meta.items():
            h5.attrs[key] = json.dumps(value)
        h5.attrs["engine"] = json.dumps("torch")
        h5["features"] = (table.features.astype(np.float32) * scale).astype(np.float16)
        h5["label"] = table.label if label is None else label
        string = h5py.string_dtype("utf-8")
        columns = {
            "category": table.category,
            "defect_type": table.defect_type,
            "mask_relpath": table.mask_relpath,
            "relpath": table.relpath if relpath is None else relpath,
            "split": table.split if split is None else split,
        }
        for name, values in columns.items():
            h5.create_dataset(name, data=np.array(values.tolist(), dtype=object), dtype=string)
        h5["height"], h5["width"] = table.height, table.width
        for category, kinds in table.text.items():
            for kind, vectors in kinds.items():
                h5[f"text/{category}/{kind}"] = vectors
        h5.create_dataset("skipped/relpath", data=np.array([], dtype=object), dtype=string)
        h5.create_dataset("skipped/reason", data=np.array([], dtype=object), dtype=string)


@pytest.mark.parametrize(
    "damage, reason",
    [
        ({}, None),
        ({"scale": 2.0}, r"crop 0 of bottle/test/broken/000.png has L2 norm 2"),
        ({"label": np.r_[-1, np.zeros(19, np.int8)].astype(np.int8)}, r"labels \[-1\] are not 0 or 1"),
        ({"split": np.array(["val"] * 20)}, r"splits \['val'\] are none of train, test"),
        ({"relpath": np.array([""] * 20)}, r"20 rows with an empty relpath"),
    ],
)
def test_shards_without_checksums_are_validated(mvtec_cache, tmp_path, damage, reason):
    table = read_cache(mvtec_cache)
    cache_dir = tmp_path / "legacy"
    cache_dir.mkdir()
    shutil.copy(mvtec_cache / CACHE_JSON, cache_dir / CACHE_JSON)
    legacy_shard(cache_dir / "features-000of001-00000.h5", table, **damage)
    if reason is None:
        assert_same_table(read_cache(cache_dir), table)
    else:
        with pytest.raises(CacheError, match=reason + ".*Delete it and re-run extract"):
            read_cache(cache_dir)


# --- 6. stale partial shards -----------------------------------------------------------------


def test_stale_partials_are_listed_by_info_and_removed_by_extract(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = copy_cache(mvtec_cache, tmp_path / "cache")
    stale = cache_dir / "features-000of002-00000.h5.partial"  # a killed --shard 0/2 run
    stale.write_bytes(b"half a shard")
    info = CliRunner().invoke(cli, ["info", "--cache-dir", str(cache_dir)])
    assert "partial features-000of002-00000.h5.partial: stale, left by a killed run" in info.output

    summary = run(mvtec_root, cache_dir, None, identity=backbone_identity(**TINY_IDENTITY))  # --shard 0/1
    assert summary.stale_partials == [stale] and not stale.exists() and summary.images == 0


def test_partial_of_a_live_writer_is_kept(mvtec_cache, tmp_path):
    cache_dir = copy_cache(mvtec_cache, tmp_path / "cache")
    live = cache_dir / "features-001of003-00000.h5.partial"
    live.write_bytes(b"being written")
    with WriterSlot(cache_dir, 1, 3):
        assert partial_shard_status(cache_dir) == [
            (
                live,
                f"process {os.getpid()} on {os.uname().nodename}, since "
                + json.loads((cache_dir / "extract-001of003.lock").read_text())["started"],
            )
        ]
        with WriterSlot(cache_dir, 0, 3) as slot:  # same shard count: may run alongside, leaves it alone
            assert slot.remove_stale_partials() == [] and live.exists()


# --- 7. EXIF orientation -----------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    """Decision: images are encoded upright, as viewers show them (phone photos carry the tag)."""
    raw = part_image(3, size=(97, 83), anomalous=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    raw.save(tmp_path / "phone.png", exif=exif)
    upright = load_rgb(tmp_path / "phone.png")
    assert upright.size == (83, 97)
    np.testing.assert_array_equal(np.asarray(upright), np.asarray(raw.transpose(Image.Transpose.ROTATE_270)))
    spec = importlib.util.spec_from_file_location(
        "predict_onnx_template", REPO / "evaluate" / "deploy" / "predict_onnx.py"
    )
    deployed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(deployed)  # the deployment's own copy of load_rgb agrees
    np.testing.assert_array_equal(np.asarray(deployed.load_rgb(tmp_path / "phone.png", 64)), np.asarray(upright))


# --- nothing to do, done at once ---------------------------------------------------------------


def test_nothing_to_encode_never_loads_clip(mvtec_root, mvtec_cache, tmp_path):
    cache_dir = copy_cache(mvtec_cache, tmp_path / "cache")
    shards = listing(cache_dir)
    summary = extract_features(
        "mvtec",
        mvtec_root,
        cache_dir,
        must_not_load,
        ExtractConfig(workers=0),
        progress=False,
        identity=backbone_identity(**TINY_IDENTITY),
    )
    assert summary.images == 0 and summary.already_cached == 20
    assert {name: value for name, value in listing(cache_dir).items() if name.endswith(".h5")} == {
        name: value for name, value in shards.items() if name.endswith(".h5")
    }
    other = json.loads(Path(TINY_MODEL).read_text())
    other["vision_cfg"]["image_size"] = 48
    (tmp_path / "tiny48.json").write_text(json.dumps(other))
    with pytest.raises(CacheError, match="input_size: cache has 32, this run 48"):  # refused, still without CLIP
        extract_features(
            "mvtec",
            mvtec_root,
            cache_dir,
            must_not_load,
            ExtractConfig(workers=0),
            progress=False,
            identity=backbone_identity(str(tmp_path / "tiny48.json"), random_weights=True),
        )


def test_nothing_to_encode_imports_neither_open_clip_nor_torch(mvtec_root, mvtec_cache, tmp_path):
    """The command line's re-run, as a user types it: it answers without importing either (each
    takes seconds), once the identity memo is warm, as after any run that loaded the model."""
    cache_dir = copy_cache(mvtec_cache, tmp_path / "cache")
    backbone_identity(**TINY_IDENTITY)
    result = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "pipeline.py",
            "extract",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--cache-dir",
            str(cache_dir),
            "--model",
            TINY_MODEL,
            "--random-weights",
            "--workers",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "0 images encoded, 0 skipped, 20 already cached" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")
    }
    assert "raml.extract.run" in imported and not {"torch", "open_clip"} & imported
