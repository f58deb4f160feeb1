"""The engines beyond fp32 ONNX: what each CPU type can run, the bf16 torch engine, the OpenVINO
engines, ``--engine auto``'s choice (on faked timings) and the floors of each precision. Every test
holds on every CPU type: an engine this CPU cannot run is skipped, saying why."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.cache import N_CROPS, read_cache
from raml.errors import UserError
from raml.extract import auto_engine, engines
from raml.extract.auto_engine import choose_engine, engine_ranking
from raml.extract.bf16_engine import bf16_backbone
from raml.extract.engine_bench import EngineTimes, precision_family
from raml.extract.engines import BF16_PRECISION, INT8_PRECISION, cpu_model, engine_problem
from raml.extract.fidelity import FidelityError, measure_fidelity
from raml.extract.onnx_engine import PARITY_TOLERANCE
from raml.pipeline import cli
from tests import test_export
from tests.conftest import TINY_MODEL
from tests.test_export import SCORE_TOLERANCE, predict_scores, script_scores

run_dir, parts = test_export.run_dir, test_export.parts  # its fixtures: a trained tiny run, and images to score
AMX_XEON = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}
AVX2_ONLY = {"avx2", "fma"}


def crops_of(backbone, count=N_CROPS, seed=0):
    size = backbone.input_size
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def test_what_each_cpu_type_can_run(monkeypatch):
    monkeypatch.setattr(engines, "cpu_flags", lambda: AVX2_ONLY)
    assert "needs a CPU with bfloat16 arithmetic" in engine_problem("torch-bf16")
    assert engine_problem("openvino-bf16") is not None  # no bf16 arithmetic (or no OpenVINO installed)
    assert engine_problem("torch") is None and engine_problem("onnx-int8") is None
    assert "runs on the CPU" in engine_problem("onnx-int8", "cuda")
    assert engine_problem("torch", "cuda") is None
    monkeypatch.setattr(engines, "cpu_flags", lambda: AMX_XEON)
    assert engine_problem("torch-bf16") is None
    assert cpu_model().endswith("(AVX-512, VNNI, AVX512_BF16, AMX)")
    assert precision_family("openvino-int8") == precision_family("onnx-int8") == "int8"
    assert precision_family("torch-bf16") == "bf16" and precision_family("openvino") == "fp32"


def test_bf16_engine_is_refused_where_the_cpu_emulates_it(tiny_backbone, monkeypatch):
    monkeypatch.setattr(engines, "cpu_flags", lambda: AVX2_ONLY)
    with pytest.raises(UserError, match="needs a CPU with bfloat16 arithmetic.*emulated bf16 is slower than fp32"):
        bf16_backbone(tiny_backbone)


def test_bf16_engine_fidelity_against_fp32(tiny_backbone):
    """Emulated where the CPU has no bf16 (check_cpu=False): the numbers are the same, only slower."""
    bf16 = bf16_backbone(tiny_backbone, check_cpu=False)
    assert (bf16.engine, bf16.precision) == ("torch-bf16", BF16_PRECISION)
    assert next(bf16._image_tower.parameters()).dtype == torch.bfloat16
    assert next(tiny_backbone.model.visual.parameters()).dtype == torch.float32  # the fp32 model is untouched
    images = [crops_of(tiny_backbone, seed=seed) for seed in range(3)]
    fidelity = measure_fidelity(bf16, images)
    fp32 = np.stack([tiny_backbone.encode_images(crops) for crops in images])
    ours = np.stack([bf16.encode_images(crops) for crops in images])
    cosine = (fp32 * ours).sum(-1)
    assert fidelity.cosine_min == pytest.approx(cosine.min(), abs=1e-6) and fidelity.precision == "bf16"
    assert 0.99 < fidelity.cosine_min < 1.0  # bf16 keeps 8 bits of mantissa: close to fp32, not equal
    assert bf16.fidelity_key.startswith("torch-bf16:") and bf16.fidelity_key == bf16.fidelity_key


def test_bf16_engine_on_this_cpu(tiny_backbone):
    problem = engine_problem("torch-bf16")
    if problem:
        pytest.skip(f"this CPU: {problem}")
    bf16 = bf16_backbone(tiny_backbone)
    assert measure_fidelity(bf16, [crops_of(tiny_backbone)]).passed


@pytest.fixture(scope="module")
def tiny_openvino(tiny_backbone, user_cache_dir):
    problem = engine_problem("openvino")
    if problem:
        pytest.skip(f"this machine: {problem}")
    from raml.extract.openvino_engine import openvino_backbone

    return openvino_backbone(tiny_backbone, "openvino")


@pytest.mark.openvino
def test_openvino_fp32_matches_the_fp32_export(tiny_openvino, tiny_backbone):
    crops = crops_of(tiny_backbone, 2 * N_CROPS)
    ours, reference = tiny_openvino.encode_images(crops), tiny_backbone.encode_images(crops)
    assert tiny_openvino.precision == "fp32" and np.abs(ours - reference).max() <= 10 * PARITY_TOLERANCE
    embeddings, tokens = tiny_openvino.image_encoder.encode(crops, with_tokens=True)
    np.testing.assert_array_equal(embeddings, ours)
    _, torch_tokens = tiny_backbone._encode_pixels(torch.from_numpy(crops), with_tokens=True)
    assert tokens.shape == torch_tokens.shape and np.abs(tokens - torch_tokens).max() <= 10 * PARITY_TOLERANCE


@pytest.mark.openvino
def test_openvino_int8_is_made_once_checked_and_rebuilt_when_corrupt(tiny_backbone, user_cache_dir):
    problem = engine_problem("openvino-int8")
    if problem:
        pytest.skip(f"this machine: {problem}")
    from raml.extract.openvino_engine import OV_INT8_FILE, openvino_backbone

    int8 = openvino_backbone(tiny_backbone, "openvino-int8")
    assert (int8.engine, int8.precision) == ("openvino-int8", "int8-ov") and int8.reference_encoder is not None
    images = [crops_of(tiny_backbone, seed=seed) for seed in range(3)]
    fidelity = measure_fidelity(int8, images)
    assert fidelity.precision == "int8-ov" and 0.9 < fidelity.cosine_min <= 1.0 + 1e-6
    xml = int8.image_encoder.path
    assert xml.name == OV_INT8_FILE and int8.fidelity_key.startswith("openvino-int8:")
    again = openvino_backbone(tiny_backbone, "openvino-int8")  # reused: the same files
    assert again.image_encoder.meta["sha256"] == int8.image_encoder.meta["sha256"]
    weights = xml.with_suffix(".bin")
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # a flipped tail: rebuilt, not used
    rebuilt = openvino_backbone(tiny_backbone, "openvino-int8")
    np.testing.assert_allclose(rebuilt.encode_images(images[0]), int8.encode_images(images[0]), atol=1e-6)


class FakeEngine(SimpleNamespace):
    """A built engine for auto's choice: its precision, and a gate that passes or refuses."""


def fake_build(precisions):
    built = []

    def build(engine):
        built.append(engine)
        return FakeEngine(engine=engine, precision=precisions[engine], device=torch.device("cpu"))

    return build, built


FAKE_TORCH = SimpleNamespace(
    name="tiny", model_config="sha256:x", weights="random(seed=0)", input_size=32, device=torch.device("cpu")
)


def test_auto_picks_the_fastest_engine_that_passes_its_gate(tmp_path, monkeypatch):
    monkeypatch.setattr(
        auto_engine, "candidates", lambda device, precision=None: ["torch", "onnx", "onnx-int8", "torch-bf16"]
    )
    precisions = {"torch": "fp32", "onnx": "fp32", "onnx-int8": INT8_PRECISION, "torch-bf16": BF16_PRECISION}
    seconds = {"torch": 4.0, "onnx": 3.0, "onnx-int8": 1.0, "torch-bf16": 0.5}
    build, built = fake_build(precisions)

    def refuse_bf16(backbone):
        if backbone.precision == BF16_PRECISION:
            raise FidelityError("too far")

    chosen = choose_engine(
        FAKE_TORCH, build, refuse_bf16, threads=2, root=tmp_path, measure=lambda backbone: seconds[backbone.engine]
    )
    assert chosen.engine == "onnx-int8"  # torch-bf16 is faster, and refused by its gate
    remembered = json.loads(next(tmp_path.glob("tiny-*.json")).read_text())
    assert remembered["seconds_per_image"] == seconds and remembered["key"]["threads"] == 2

    def never(backbone):
        raise AssertionError("timed again: the timings are remembered")

    ranked, _ = engine_ranking(FAKE_TORCH, build, list(seconds), threads=2, root=tmp_path, measure=never)
    assert ranked == ["torch-bf16", "onnx-int8", "onnx", "torch"]
    elsewhere, _ = engine_ranking(FAKE_TORCH, build, ["onnx"], threads=1, root=tmp_path, measure=lambda b: 9.0)
    assert elsewhere == ["onnx"] and len(list(tmp_path.glob("tiny-*.json"))) == 2  # other threads: timed anew


def test_auto_keeps_to_a_precision_and_passes_over_engines_that_fail(tmp_path, monkeypatch):
    monkeypatch.setattr(engines, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(engines, "engine_problem", lambda engine, device="cpu": None)
    monkeypatch.setattr(auto_engine, "engine_problem", lambda engine, device="cpu": None)
    precisions = dict(engines.PRECISIONS)
    build, built = fake_build(precisions)

    def measure(backbone):
        if backbone.engine == "openvino":
            raise RuntimeError("cannot compile")
        return {"torch": 4.0, "onnx": 3.0}.get(backbone.engine, 1.0)

    chosen = choose_engine(
        FAKE_TORCH, build, lambda b: None, precision="fp32", threads=2, root=tmp_path, measure=measure
    )
    assert chosen.engine == "onnx"  # openvino failed (remembered with its reason), int8 and bf16 are not fp32
    timings = json.loads(next(tmp_path.glob("tiny-*.json")).read_text())["seconds_per_image"]
    assert set(timings) == {"torch", "onnx", "openvino"} and timings["openvino"].startswith("failed: RuntimeError")
    with pytest.raises(UserError, match="no engine of precision int8-w7 can run here; passed over: onnx-int8"):

        def refuse(backbone):
            raise FidelityError("too far")

        choose_engine(FAKE_TORCH, build, refuse, precision=INT8_PRECISION, threads=2, root=tmp_path, measure=measure)


def test_auto_on_a_gpu_is_torch():
    gpu = SimpleNamespace(device=torch.device("cuda"))
    assert choose_engine(gpu, None, None, threads=1) is gpu


def test_extract_auto_picks_gates_and_records_the_precision(user_cache_dir, mvtec_root, tmp_path, monkeypatch):
    """The command line end to end, on faked timings: int8 is fastest, passes its gate on the
    dataset's images, and the cache records int8; a resumed run keeps to it."""
    monkeypatch.setattr(auto_engine, "candidates", lambda device, precision=None: ["torch", "onnx-int8"])
    monkeypatch.setattr(auto_engine, "time_engine", lambda backbone: {"torch": 2.0, "onnx-int8": 1.0}[backbone.engine])
    monkeypatch.setattr(auto_engine, "user_cache_root", lambda: tmp_path / "user")
    cache_dir = tmp_path / "auto"
    args = ["extract", "--dataset", "mvtec", "--root", str(mvtec_root), "--cache-dir", str(cache_dir)]
    args += ["--model", TINY_MODEL, "--random-weights", "--device", "cpu", "--workers", "0", "--engine", "auto"]
    first = CliRunner().invoke(cli, [*args, "--categories", "bottle", "--fidelity-sample", "4"])
    assert first.exit_code == 0, first.output
    assert "auto: picked --engine onnx-int8 (int8-w7)" in first.output and "onnx-int8 fidelity on 4" in first.output
    assert read_cache(cache_dir).meta["precision"] == INT8_PRECISION
    # a cache of int8 features: auto keeps to int8 however fast the others are
    monkeypatch.setattr(
        auto_engine, "candidates", lambda device, precision=None: ["torch"] if precision == "fp32" else ["onnx-int8"]
    )
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    table = read_cache(cache_dir)
    assert len(table) == 20 and table.engines == ["onnx-int8"]


def test_floors_of_every_precision_on_this_cpu():
    from raml.extract.engine_bench import hardware_of, precision_rates

    rates = precision_rates()
    assert set(rates) >= {"fp32", "bf16"} and all(rate > 0 for rate in rates.values())
    times = EngineTimes(
        "x", "m", 1e9, rates={p: [r] for p, r in rates.items()}, hardware={p: hardware_of(p) for p in rates}
    )
    emulated = "emulated" in hardware_of("bf16")
    assert times.is_floor("bf16") != emulated and times.best_precision in rates


@pytest.mark.openvino
def test_openvino_deployment_scores_as_predict_does(run_dir, parts, user_cache_dir, tmp_path):
    """export --format openvino: encoder.xml/.bin beside head.onnx, and the torch-free script runs it
    with OpenVINO and gives predict's scores."""
    problem = engine_problem("openvino")
    if problem:
        pytest.skip(f"this machine: {problem}")
    out = tmp_path / "deploy"
    args = ["export", "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu", "--format", "openvino"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    deploy = json.loads((out / "deploy.json").read_text())
    encoder = deploy["encoder"]
    assert (encoder["format"], encoder["file"], encoder["weights_file"]) == ("openvino", "encoder.xml", "encoder.bin")
    assert encoder["inference_precision"] == "f32" and not (out / "encoder.onnx").exists()
    assert encoder["bytes"] == (out / "encoder.xml").stat().st_size
    standalone, errors = script_scores(out, parts, tmp_path)
    predicted = predict_scores(parts, run_dir, tmp_path / "predict", "onnx")
    assert len(errors) == 1 and set(standalone) == set(predicted) and len(standalone) == 4
    for name, (score, _) in predicted.items():
        assert abs(standalone[name][0] - score) <= SCORE_TOLERANCE, name


@pytest.mark.openvino
def test_openvino_extract_with_worker_processes_from_the_script(user_cache_dir, mvtec_root, tmp_path):
    """``python pipeline.py extract --engine openvino --workers 2``: OpenVINO is loaded before the
    decoding workers start, which then start from a fresh process (a forked one crashed), find the
    checkout's package, and give the cache one worker-less run gives."""
    problem = engine_problem("openvino")
    if problem:
        pytest.skip(problem)
    script = Path(__file__).resolve().parent.parent / "pipeline.py"
    caches = {}
    for workers in ("0", "2"):
        caches[workers] = tmp_path / f"workers-{workers}"
        args = ["extract", "--dataset", "mvtec", "--root", str(mvtec_root), "--cache-dir", str(caches[workers])]
        args += ["--model", TINY_MODEL, "--random-weights", "--device", "cpu", "--engine", "openvino"]
        done = subprocess.run(
            [sys.executable, str(script), *args, "--categories", "bottle", "--workers", workers],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout + done.stderr
    alone, with_workers = read_cache(caches["0"]), read_cache(caches["2"])
    assert len(alone) == len(with_workers) == 10 and alone.engines == with_workers.engines == ["openvino"]
    np.testing.assert_array_equal(alone.features, with_workers.features)
