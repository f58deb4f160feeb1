"""The int8 engine (``--engine onnx-int8``, ``export --precision int8``) on the tiny CLIP: the quantised
model's cache, features that depend on their image alone, the fidelity check (and its refusal of a
broken model), one precision per cache, the int8 path end to end, and the engine benchmarks."""

import csv
import json
import platform
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

from raml.cache import N_CROPS, read_cache
from raml.cache.format import CACHE_JSON
from raml.errors import CacheError
from raml.evaluate.deploy.export import DEPLOY_JSON, SCRIPT_FILE
from raml.extract import int8_engine
from raml.extract.config import ExtractConfig
from raml.extract.engine_bench import EngineTimes, vit_macs_per_image
from raml.extract.engines import ENGINES, INT8_PRECISION, PRECISIONS, engine_problem
from raml.extract.fidelity import (
    FIDELITY_RECORD,
    MIN_COSINE,
    Fidelity,
    FidelityError,
    measure_fidelity,
    require_fidelity,
)
from raml.extract.int8_engine import (
    INT8_FILE,
    INT8_SIDECAR_FILE,
    MAX_WEIGHT,
    check_pair_sums,
    int8_backbone,
    largest_int8_weight,
)
from raml.extract.onnx_engine import ONNX_FILE, SIDECAR_FILE, OnnxEngineError, export_dir
from raml.extract.pyramid import load_rgb, pyramid_pixels
from raml.extract.run import extract_features
from raml.pipeline import cli
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from tests.conftest import TINY_MODEL

BACKBONE = ["--model", TINY_MODEL, "--random-weights", "--device", "cpu"]
REAL_QUANTISE = int8_engine.quantise


@pytest.fixture(scope="module")
def tiny_int8(tiny_backbone, user_cache_dir):
    return int8_backbone(tiny_backbone, cache_root=user_cache_dir / "onnx")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, mvtec_cache):
    out = tmp_path_factory.mktemp("run") / "raml"
    write_run(out, fit(read_cache(mvtec_cache), make_config("adaptive", epochs=2, batch_size=8)))
    return out


def image_pixels(mvtec_root, backbone, names=("good/000", "broken/000", "scratch/001")):
    return [
        pyramid_pixels(
            load_rgb(mvtec_root / "bottle" / "test" / f"{name}.png"), backbone.input_size, backbone.mean, backbone.std
        )
        for name in names
    ]


def broken_quantise(source, target):
    """The real quantisation, then every int8 weight replaced by noise (in the 7-bit range, so that only the
    fidelity check can catch it): a model that loads and runs."""
    REAL_QUANTISE(source, target)
    model = onnx.load(str(target))
    rng = np.random.default_rng(0)
    for tensor in model.graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8:
            values = numpy_helper.to_array(tensor)
            tensor.CopyFrom(
                numpy_helper.from_array(
                    rng.integers(-MAX_WEIGHT, MAX_WEIGHT + 1, values.shape, dtype=np.int8), tensor.name
                )
            )
    onnx.save(model, str(target))


@pytest.fixture
def broken_int8_cache(tiny_backbone, tiny_int8, user_cache_dir, tmp_path, monkeypatch):
    """A RAML_CACHE_DIR holding a copy of the good fp32 export, in which the int8 model will be broken."""
    good = export_dir(tiny_backbone, user_cache_dir / "onnx")
    directory = export_dir(tiny_backbone, tmp_path / "broken-cache" / "onnx")
    directory.mkdir(parents=True)
    for name in (ONNX_FILE, SIDECAR_FILE):
        shutil.copy(good / name, directory / name)
    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "broken-cache"))
    monkeypatch.setattr(int8_engine, "quantise", broken_quantise)
    return directory


def test_int8_model_is_made_once_beside_the_fp32_export_and_reused(tiny_backbone, tiny_int8, user_cache_dir, capsys):
    directory = export_dir(tiny_backbone, user_cache_dir / "onnx")
    assert tiny_int8.image_encoder.path == directory / INT8_FILE
    assert (tiny_int8.engine, tiny_int8.precision, tiny_int8.image_encoder.cpu_crops_per_run) == (
        "onnx-int8",
        INT8_PRECISION,
        N_CROPS,
    )
    meta = json.loads((directory / INT8_SIDECAR_FILE).read_text())
    assert meta["quantisation"]["precision"] == INT8_PRECISION and "7-bit" in meta["quantisation"]["weights"]
    fp32_meta = json.loads((directory / SIDECAR_FILE).read_text())
    assert meta["quantised_from_sha256"] == fp32_meta["sha256"] == tiny_int8.reference_encoder.meta["sha256"]
    assert meta["bytes"] == (directory / INT8_FILE).stat().st_size < fp32_meta["bytes"]
    before = (directory / INT8_FILE).stat().st_mtime_ns
    capsys.readouterr()
    again = int8_backbone(tiny_backbone, cache_root=user_cache_dir / "onnx")
    assert "quantised" not in capsys.readouterr().err and (directory / INT8_FILE).stat().st_mtime_ns == before
    assert again.image_encoder.meta["sha256"] == meta["sha256"]


def _other_fp32_source(directory):
    meta = json.loads((directory / INT8_SIDECAR_FILE).read_text())
    meta["quantised_from_sha256"] = "0" * 64
    (directory / INT8_SIDECAR_FILE).write_text(json.dumps(meta))


def _truncated(directory):
    data = (directory / INT8_FILE).read_bytes()
    (directory / INT8_FILE).write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, why", [(_other_fp32_source, "quantised_from_sha256"), (_truncated, "truncated")])
def test_int8_model_is_rebuilt_when_its_source_changed_or_it_is_damaged(
    tiny_backbone, tiny_int8, user_cache_dir, tmp_path, capsys, damage, why
):
    directory = export_dir(tiny_backbone, tmp_path / "onnx")
    shutil.copytree(export_dir(tiny_backbone, user_cache_dir / "onnx"), directory)
    damage(directory)
    capsys.readouterr()
    rebuilt = int8_backbone(tiny_backbone, cache_root=tmp_path / "onnx")
    err = capsys.readouterr().err
    assert f"rebuilding {directory / INT8_FILE}" in err and why in err and "quantised raml-tiny-test" in err
    assert rebuilt.image_encoder.meta["sha256"] == tiny_int8.image_encoder.meta["sha256"]  # deterministic


def test_int8_features_of_an_image_depend_on_that_image_alone(tiny_int8, mvtec_root):
    """Runs of one image's 21 crops: encoding images together, one by one, or as the deployment's
    script does (one session run per image) gives the same bits."""
    images = image_pixels(mvtec_root, tiny_int8)
    together = tiny_int8.encode_images(np.concatenate(images))
    alone = np.concatenate([tiny_int8.encode_images(crops) for crops in images])
    session = tiny_int8.image_encoder.session
    script_like = np.concatenate([session.run(None, {"pixels": crops})[0] for crops in images])
    np.testing.assert_array_equal(together, alone)
    np.testing.assert_array_equal(together, script_like)
    # what one image per run avoids: a run of 8 crops mixes images and changes their features
    mixed = np.concatenate(
        [session.run(None, {"pixels": chunk})[0] for chunk in np.array_split(np.concatenate(images), 8)]
    )
    assert not np.array_equal(mixed, together)


def test_fidelity_figures_and_limits(tiny_int8, mvtec_root):
    images = image_pixels(mvtec_root, tiny_int8)
    rankings = iter([np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])])  # fp32, then int8
    fidelity = measure_fidelity(tiny_int8, images + images[:1], score=lambda features: next(rankings))
    fp32 = np.stack([tiny_int8.reference_encoder.encode(crops) for crops in images])
    int8 = np.stack([tiny_int8.encode_images(crops) for crops in images])
    cosine = (fp32 * int8).sum(-1)  # both are unit vectors
    assert (fidelity.images, fidelity.crops) == (4, 4 * N_CROPS)
    assert fidelity.cosine_min == pytest.approx(cosine.min(), abs=1e-6) and fidelity.cosine_min >= MIN_COSINE
    assert fidelity.spearman == pytest.approx(1 - 6 * 2 / (4 * (16 - 1)))  # one swapped pair: 0.8
    assert not fidelity.passed and "Spearman of s_final 0.8000 (limit 0.99)" in fidelity.summary()
    assert Fidelity("int8", 32, 672, 0.9951, 0.999, 0.991).passed
    assert not Fidelity("int8", 32, 672, 0.9949, 0.999, None).passed
    assert not Fidelity("int8", 32, 672, float("nan"), float("nan"), None).passed


def test_int8_weights_cannot_saturate_a_16_bit_pair_sum(tiny_int8, tmp_path):
    """What makes the int8 features the same on every x86 CPU: without VNNI, a uint8 × int8 pair of
    products is summed in a saturating 16-bit integer, and with |w| <= 64 no pair can reach 32,767."""
    assert MAX_WEIGHT == 64 and 2 * 255 * MAX_WEIGHT <= 32767 < 2 * 255 * (MAX_WEIGHT + 1)
    assert 0 < largest_int8_weight(tiny_int8.image_encoder.path) <= MAX_WEIGHT
    # the full 8-bit range (the first scheme) is refused before it could be cached
    from onnxruntime.quantization import QuantType, quantize_dynamic

    full_range = tmp_path / "full-range.onnx"
    quantize_dynamic(tiny_int8.reference_encoder.path, full_range, weight_type=QuantType.QInt8, per_channel=True)
    assert largest_int8_weight(full_range) == 127
    with pytest.raises(OnnxEngineError, match=r"has a weight of 127 \(> 64\): 2 × 255 × 127 > 32767 saturates"):
        check_pair_sums(full_range)


QEMU = shutil.which("qemu-x86_64")
ENCODE_UNDER_QEMU = """
import sys, numpy as np, onnxruntime as ort
crops = np.load(sys.argv[1])
options = ort.SessionOptions(); options.intra_op_num_threads = 1
for model, out in zip(sys.argv[2::2], sys.argv[3::2]):
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    np.save(out, np.concatenate([session.run(None, {"pixels": image})[0] for image in crops]))
"""


@pytest.mark.skipif(
    platform.machine() != "x86_64" or QEMU is None,
    reason="needs qemu-x86_64 (Debian package qemu-user) to emulate an AVX2-only CPU",
)
def test_int8_fidelity_holds_on_an_emulated_avx2_only_cpu(tiny_int8, mvtec_root, tmp_path):
    """The scheme's claim where it matters, whatever CPU runs the test: under QEMU's Haswell model
    (AVX2, no AVX-512, no VNNI), whose uint8 × int8 pair sums saturate at 16 bits, the engine's int8
    model keeps a per-crop cosine >= MIN_COSINE to fp32. The first scheme's 8-bit weights, run
    alongside, fall below it there: the emulation does reach the saturating kernels."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    full_range = tmp_path / "full-range.onnx"
    quantize_dynamic(tiny_int8.reference_encoder.path, full_range, weight_type=QuantType.QInt8, per_channel=True)
    crops = np.stack(image_pixels(mvtec_root, tiny_int8))
    np.save(tmp_path / "crops.npy", crops)
    outputs = {"engine": tmp_path / "engine.npy", "full_range": tmp_path / "full.npy"}
    child = subprocess.run(
        [
            QEMU,
            "-cpu",
            "Haswell",
            sys.executable,
            "-c",
            ENCODE_UNDER_QEMU,
            str(tmp_path / "crops.npy"),
            str(tiny_int8.image_encoder.path),
            str(outputs["engine"]),
            str(full_range),
            str(outputs["full_range"]),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    fp32 = np.concatenate([tiny_int8.reference_encoder.encode(image) for image in crops])
    cosine = {name: (np.load(path) * fp32).sum(-1).min() for name, path in outputs.items()}  # unit vectors
    assert cosine["engine"] >= MIN_COSINE, cosine
    assert cosine["full_range"] < MIN_COSINE, cosine


class FixedEncoder:
    """An encoder whose output is known: crop i of an image → ``vectors[i]``."""

    def __init__(self, vectors):
        self.vectors = np.asarray(vectors, np.float32)

    def encode(self, crops):
        return self.vectors[: len(crops)]


class FixedBackbone:
    """A backbone below fp32 whose encoder and fp32 reference are known."""

    precision, engine = "int8", "onnx-int8"

    def __init__(self, reference_encoder, image_encoder):
        self.reference_encoder, self.image_encoder = reference_encoder, image_encoder

    def reference_encode(self, crops):
        return self.reference_encoder.encode(crops)

    def encode_images(self, crops):
        return self.image_encoder.encode(crops)


def test_fidelity_figures_and_refusal_on_encoders_of_known_cosine():
    """The check's arithmetic and its limits, on inputs whose result is known (independent of any
    CPU's rounding): int8 crops turned by known angles from the fp32 ones."""
    angles = np.array([0.0, 0.05, 0.1])  # radians; cos 0.1 = 0.995004 passes, cos 0.1001 fails
    fp32 = np.eye(3, 8, dtype=np.float32)
    int8 = np.cos(angles)[:, None] * fp32 + np.sin(angles)[:, None] * np.eye(3, 8, k=3, dtype=np.float32)
    backbone = FixedBackbone(FixedEncoder(fp32), FixedEncoder(int8))
    images = [np.zeros((3, 1))] * 4
    fidelity = measure_fidelity(backbone, images)
    assert (fidelity.images, fidelity.crops, fidelity.spearman) == (4, 12, None)
    assert fidelity.cosine_min == pytest.approx(np.cos(0.1), abs=1e-7)
    assert fidelity.cosine_mean == pytest.approx(np.cos(angles).mean(), abs=1e-7)
    assert fidelity.passed
    require_fidelity(fidelity, "onnx-int8", "x", "y")  # passes: no exception

    turned = np.cos(0.1001) * fp32[2] + np.sin(0.1001) * np.eye(3, 8, k=3, dtype=np.float32)[2]
    backbone.image_encoder = FixedEncoder([*int8[:2], turned])
    worse = measure_fidelity(backbone, images)
    assert worse.cosine_min == pytest.approx(np.cos(0.1001), abs=1e-7) and not worse.passed
    with pytest.raises(
        FidelityError,
        match=r"int8 image encoder \(--engine onnx-int8\) is too far from fp32 on 4 of my images: per-crop cosine "
        r"of int8 to fp32 min 0\.9950 \(limit 0\.995\).*use fp32 here",
    ):
        require_fidelity(worse, "onnx-int8", "4 of my images", "use fp32 here")

    # the rank check: identical scores pass; one swapped pair of four gives Spearman 0.8 and fails
    same = measure_fidelity(backbone, images, score=lambda features: np.arange(4.0))
    assert same.spearman == pytest.approx(1.0) and not same.passed  # (the cosine still fails)
    backbone.image_encoder = FixedEncoder(fp32)
    scores = iter([np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 3.0, 2.0, 4.0])])  # fp32, then int8
    swapped = measure_fidelity(backbone, images, score=lambda features: next(scores))
    assert swapped.cosine_min == pytest.approx(1.0) and swapped.spearman == pytest.approx(0.8)
    assert not swapped.passed and "Spearman of s_final 0.8000 (limit 0.99)" in swapped.summary()


def extract_args(mvtec_root, cache_dir, engine, *extra):
    return [
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(mvtec_root),
        "--cache-dir",
        str(cache_dir),
        *BACKBONE,
        "--workers",
        "0",
        "--engine",
        engine,
        *extra,
    ]


def test_extract_int8_records_its_precision_and_checks_once_per_cache(tiny_int8, user_cache_dir, mvtec_root, tmp_path):
    cache_dir = tmp_path / "int8"
    first = CliRunner().invoke(cli, extract_args(mvtec_root, cache_dir, "onnx-int8", "--categories", "bottle"))
    assert first.exit_code == 0, first.output
    assert f"onnx-int8 fidelity on 10 of your images: per-crop cosine of {INT8_PRECISION} to fp32 min" in first.output
    record = json.loads((cache_dir / FIDELITY_RECORD).read_text())
    assert list(record) == [tiny_int8.fidelity_key] and record[list(record)[0]]["passed"] is True
    assert tiny_int8.fidelity_key == f"onnx-int8:{tiny_int8.image_encoder.meta['sha256']}"
    resumed = CliRunner().invoke(cli, extract_args(mvtec_root, cache_dir, "onnx-int8"))  # adds metal_nut
    assert resumed.exit_code == 0, resumed.output
    assert "onnx-int8 fidelity on this cache's images: checked on" in resumed.output
    table = read_cache(cache_dir)
    assert table.meta["precision"] == INT8_PRECISION and table.engines == ["onnx-int8"] and len(table) == 20
    bottle = table.select(table.category == "bottle")
    crops = pyramid_pixels(
        load_rgb(mvtec_root / bottle.relpath[0]), tiny_int8.input_size, tiny_int8.mean, tiny_int8.std
    )
    np.testing.assert_array_equal(bottle.features[0], tiny_int8.encode_images(crops).astype(np.float16))


def test_one_cache_never_mixes_precisions(tiny_backbone, tiny_int8, mvtec_root, mvtec_cache, tmp_path):
    fp32_cache = tmp_path / "fp32"
    shutil.copytree(mvtec_cache, fp32_cache)
    into_fp32 = CliRunner().invoke(cli, extract_args(mvtec_root, fp32_cache, "onnx-int8"))
    assert into_fp32.exit_code == 1
    assert f"{fp32_cache} holds fp32 features; this run would add {INT8_PRECISION} features" in into_fp32.output
    fp32_engines = " or ".join(f"--engine {engine}" for engine, precision in PRECISIONS.items() if precision == "fp32")
    assert f"Use {fp32_engines} (or auto) with this cache, or another --cache-dir" in into_fp32.output
    assert "--random-weights" not in into_fp32.output  # refused before any model was loaded (it warns)
    assert not (fp32_cache / FIDELITY_RECORD).exists()

    int8_cache = tmp_path / "int8"
    extract_features(
        "mvtec",
        mvtec_root,
        int8_cache,
        lambda: tiny_int8,
        ExtractConfig(categories=["bottle"], workers=0),
        progress=False,
    )
    into_int8 = CliRunner().invoke(cli, extract_args(mvtec_root, int8_cache, "onnx"))
    assert into_int8.exit_code == 1
    assert f"{int8_cache} holds {INT8_PRECISION} features; this run would add fp32" in into_int8.output
    assert "Use --engine onnx-int8 (or auto) with this cache" in into_int8.output
    # the store refuses too, for code that writes without the command's early check
    with pytest.raises(CacheError, match=f"precision: cache has 'fp32', this run '{INT8_PRECISION}'"):
        extract_features("mvtec", mvtec_root, fp32_cache, lambda: tiny_int8, ExtractConfig(workers=0), progress=False)
    with pytest.raises(CacheError, match=f"precision: cache has '{INT8_PRECISION}', this run 'fp32'"):
        extract_features(
            "mvtec", mvtec_root, int8_cache, lambda: tiny_backbone, ExtractConfig(workers=0), progress=False
        )
    assert read_cache(fp32_cache).engines == ["torch"] and read_cache(int8_cache).engines == ["onnx-int8"]


def test_fidelity_check_stops_on_a_broken_quantised_model(broken_int8_cache, run_dir, mvtec_root, tmp_path):
    cache_dir = tmp_path / "features"
    result = CliRunner().invoke(cli, extract_args(mvtec_root, cache_dir, "onnx-int8"))
    assert result.exit_code == 1, result.output
    assert (
        f"the {INT8_PRECISION} image encoder (--engine onnx-int8) is too far from fp32 on 20 images of" in result.output
    )
    assert f"(limit {MIN_COSINE})" in result.output and "use an fp32 engine (--engine torch or onnx)" in result.output
    assert not (cache_dir / CACHE_JSON).exists() and not list(cache_dir.glob("features-*"))
    assert not (cache_dir / FIDELITY_RECORD).exists()

    out = tmp_path / "deploy"
    exported = CliRunner().invoke(
        cli,
        [
            "export",
            "--checkpoint",
            str(run_dir),
            "--out",
            str(out),
            *BACKBONE,
            "--precision",
            "int8",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
        ],
    )
    assert exported.exit_code == 1 and "export with --precision fp32 instead" in exported.output
    assert "Spearman of s_final" in exported.output and not out.exists()

    files = sorted((mvtec_root / "bottle" / "test").glob("*/*.png"))
    predicted = CliRunner().invoke(
        cli,
        [
            "predict",
            *map(str, files),
            "--checkpoint",
            str(run_dir),
            "--category",
            "bottle",
            "--out",
            str(tmp_path / "p"),
            *BACKBONE,
            "--engine",
            "onnx-int8",
        ],
    )
    assert predicted.exit_code == 1 and "too far from fp32 on 6 of the images given" in predicted.output
    assert not (tmp_path / "p").exists()


def script_scores(deploy_dir, files):
    """{folder/name: s_final} printed by the deployment's standalone script."""
    child = subprocess.run(
        [sys.executable, str(deploy_dir / SCRIPT_FILE), *map(str, files), "--category", "bottle"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr
    return {
        "/".join(line.split()[0].split("/")[-2:]): float(line.split()[1]) for line in child.stdout.splitlines()[1:-1]
    }


def test_int8_path_end_to_end_export_quantise_predict(tiny_int8, user_cache_dir, run_dir, mvtec_root, tmp_path):
    out = tmp_path / "deploy"
    exported = CliRunner().invoke(
        cli,
        [
            "export",
            "--checkpoint",
            str(run_dir),
            "--out",
            str(out),
            *BACKBONE,
            "--precision",
            "int8",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
        ],
    )
    assert exported.exit_code == 0, exported.output
    assert f"int8 encoder: per-crop cosine of {INT8_PRECISION} to fp32 min" in exported.output
    deploy = json.loads((out / DEPLOY_JSON).read_text())
    assert deploy["precision"] == deploy["encoder"]["precision"] == "int8"
    assert deploy["encoder"]["sha256"] == tiny_int8.image_encoder.meta["sha256"]  # the cached int8 model
    fidelity = deploy["encoder"]["fidelity"]
    assert fidelity["passed"] and fidelity["images"] == 20 and fidelity["crops"] == 20 * N_CROPS
    assert fidelity["cosine_min"] >= MIN_COSINE and fidelity["spearman"] >= 0.99

    files = sorted((mvtec_root / "bottle" / "test").glob("*/*.png"))
    predict_out = tmp_path / "predictions"
    args = [
        "predict",
        *map(str, files),
        "--checkpoint",
        str(run_dir),
        "--category",
        "bottle",
        "--out",
        str(predict_out),
        *BACKBONE,
        "--engine",
        "onnx-int8",
        "--no-heatmaps",
        "--fidelity-sample",
        "4",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "onnx-int8 fidelity on 4 of your images" in first.output
    second = CliRunner().invoke(cli, args)
    assert "onnx-int8 fidelity for this checkpoint and 'bottle': checked on" in second.output
    with open(predict_out / "predictions.csv", newline="") as handle:
        predicted = {"/".join(row["file"].split("/")[-2:]): float(row["final"]) for row in csv.DictReader(handle)}
    scripted = script_scores(out, files)
    assert set(predicted) == set(scripted) and len(predicted) == 6
    for name, score in predicted.items():  # predict's int8 scores are the deployment's (6 decimals printed)
        assert abs(score - scripted[name]) <= 1e-5, name


def test_vit_macs_per_image_by_hand(tiny_backbone):
    # tiny: 16 patches + class token, width 64, MLP 256, 2 blocks, 8 px patches, projection 64 → 32
    per_crop = 16 * 64 * 3 * 8 * 8 + 2 * (17 * (4 * 64 * 64 + 2 * 64 * 256) + 2 * 17 * 17 * 64) + 64 * 32
    assert vit_macs_per_image(tiny_backbone) == 21 * per_crop == 40_819_968
    # ViT-B/16's shape, without building it: the speed target's "370 GFLOP per image"
    block = SimpleNamespace(mlp=SimpleNamespace(c_fc=SimpleNamespace(out_features=3072)))
    visual = SimpleNamespace(
        conv1=SimpleNamespace(in_channels=3, kernel_size=(16, 16)),
        grid_size=(14, 14),
        class_embedding=np.zeros(768),
        proj=np.zeros((768, 512)),
        transformer=SimpleNamespace(width=768, resblocks=[block] * 12),
    )
    assert vit_macs_per_image(SimpleNamespace(model=SimpleNamespace(visual=visual), name="ViT-B-16")) == 368_832_522_240


def test_engine_times_lines_give_each_engine_against_its_own_floor_and_the_best():
    times = EngineTimes(
        what="bench x",
        model="m",
        macs_per_image=370e9,
        rates={"fp32": [180.0, 200.0, 185.0], "bf16": [5.0, 6.0, 4.0], "int8": [700.0, 760.0, 740.0]},
        hardware={"fp32": "AVX2", "bf16": "emulated: no AVX512_BF16 or AMX", "int8": "AVX2 16-bit pair sums, no VNNI"},
        seconds={"onnx": [3.0, 2.9, 3.1], "onnx-int8": [1.0, 0.9, 1.1], "WinCLIP": [4.0, 3.0, 5.0]},
        reference="WinCLIP",
    )
    assert times.floor_seconds("fp32") == pytest.approx(2.0)  # 370 G / 185 GFLOP/s
    assert times.floor_seconds("int8") == pytest.approx(0.5)  # 370 G / 740 GOP/s
    assert times.best_precision == "int8"  # emulated bf16 (370 / 5 = 74 s) is no floor
    lines = times.lines()
    assert lines[1].endswith("= 2.00 s") and "185 GFLOP/s (AVX2, 180-200)" in lines[1]
    assert lines[2].endswith(": no floor") and "emulated" in lines[2]
    assert lines[3].endswith("= 0.50 s") and "740 GOP/s" in lines[3]
    assert lines[4].split() == [
        "onnx",
        "3.00",
        "s/image",
        "(2.90-3.10)",
    ] + "1.50 × fp32 floor 6.00 × int8 floor".split() + [
        "0.75",
        "×",
        "WinCLIP",
    ]
    assert lines[5].split() == ["onnx-int8", "1.00", "s/image", "(0.90-1.10)", "2.00", "×", "int8", "floor"] + [
        "0.25",
        "×",
        "WinCLIP",
    ]
    assert lines[6].split() == ["WinCLIP", "4.00", "s/image", "(3.00-5.00)"]  # another model: no floor ratio


def test_bench_commands_compare_the_engines(tiny_int8, user_cache_dir):
    result = CliRunner().invoke(
        cli, ["bench", "extract", *BACKBONE, "--images", "1", "--size", "64", "--workers", "0", "--rounds", "1"]
    )
    assert result.exit_code == 0, result.output
    engines = [line.split()[0] for line in result.output.splitlines() if " s/image (" in line and "floor" in line]
    assert engines == [engine for engine in ENGINES if engine_problem(engine) is None]  # every engine that runs here
    for engine in set(ENGINES) - set(engines):
        assert f"bench: {engine} left out: {engine_problem(engine)}" in result.output
    assert "fp32 floor:" in result.output and "int8 floor:" in result.output and "bf16 floor:" in result.output
    result = CliRunner().invoke(
        cli,
        [
            "bench",
            "predict",
            *BACKBONE,
            "--images",
            "1",
            "--size",
            "64",
            "--rounds",
            "1",
            "--engines",
            "onnx,onnx-int8",
            "--no-winclip",
        ],
    )
    assert result.exit_code == 0, result.output
    timed = [line.split()[0] for line in result.output.splitlines() if " s/image " in line]
    assert timed == ["onnx", "onnx-int8"]


def test_winclip_is_timed_as_the_reference(tiny_backbone, tiny_int8):
    from raml.evaluate.deploy.bench import WINCLIP, compare_predict

    times = compare_predict({"onnx-int8": tiny_int8}, images=1, size=64, rounds=1, winclip_backbone=tiny_backbone)
    assert times.reference == WINCLIP and set(times.seconds) == {"onnx-int8", WINCLIP}
    # (predict's figure is a difference of two timings: on the tiny model it is noise around zero)
    assert len(times.seconds["onnx-int8"]) == 1 and times.seconds[WINCLIP][0] > 0
