"""The ONNX Runtime image encoder (``--engine onnx``) on the tiny CLIP: parity with torch, the
export cache's self-repair, and caches that mix both engines."""

import copy
import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from raml.cache import read_cache
from raml.extract.config import ExtractConfig
from raml.extract.onnx_engine import (
    ONNX_FILE,
    PARITY_TOLERANCE,
    SIDECAR_FILE,
    OnnxEngineError,
    export_dir,
    onnx_backbone,
)
from raml.extract.run import extract_features
from tests.conftest import TINY_MODEL


@pytest.fixture(scope="module")
def onnx_root(tmp_path_factory):
    """One export cache for the tests that only read it (an export takes seconds)."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def tiny_onnx(tiny_backbone, onnx_root):
    return onnx_backbone(tiny_backbone, cache_root=onnx_root)


def random_crops(backbone, count, seed=1):
    size = backbone.input_size
    return np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)


def test_onnx_features_equal_torch_features_for_any_batch_size(tiny_backbone, tiny_onnx):
    assert tiny_onnx.engine == "onnx" and tiny_backbone.engine == "torch"
    for count in (1, 5, 21):  # exported with a batch of 2: the batch axis must really be dynamic
        crops = random_crops(tiny_backbone, count)
        onnx_out = tiny_onnx.encode_images(crops)
        assert onnx_out.dtype == np.float32 and onnx_out.shape == (count, tiny_backbone.embed_dim)
        np.testing.assert_allclose(np.linalg.norm(onnx_out, axis=1), 1.0, atol=1e-5)
        assert np.abs(onnx_out - tiny_backbone.encode_images(crops)).max() <= PARITY_TOLERANCE
    assert tiny_onnx.image_encoder.meta["max_abs_diff"] <= PARITY_TOLERANCE
    assert tiny_onnx.image_encoder.provider == "CPUExecutionProvider"
    np.testing.assert_array_equal(
        tiny_onnx.encode_texts(["a flawless bottle"]), tiny_backbone.encode_texts(["a flawless bottle"])
    )


def test_cached_export_is_reused(tiny_backbone, tiny_onnx, onnx_root, capsys):
    onnx_file = tiny_onnx.image_encoder.path
    before = onnx_file.stat().st_mtime_ns
    again = onnx_backbone(tiny_backbone, cache_root=onnx_root)
    assert again.image_encoder.path == onnx_file and onnx_file.stat().st_mtime_ns == before
    err = capsys.readouterr().err
    assert "exported" not in err and "rebuilding" not in err
    assert "CPUExecutionProvider" in err  # the provider that runs is always named


def copy_of_export(tiny_backbone, onnx_root, root):
    """A copy of the module's good export under the export cache ``root``; returns its directory."""
    directory = export_dir(tiny_backbone, root)
    shutil.copytree(export_dir(tiny_backbone, onnx_root), directory)
    return directory


def _truncate(directory):
    data = (directory / ONNX_FILE).read_bytes()
    (directory / ONNX_FILE).write_bytes(data[: len(data) // 2])


def _flip_a_byte_near_the_end(directory):  # same size, different content: only the hash sees it
    data = bytearray((directory / ONNX_FILE).read_bytes())
    data[-100] ^= 0xFF
    (directory / ONNX_FILE).write_bytes(bytes(data))


def _sidecar_of_other_weights(directory):
    meta = json.loads((directory / SIDECAR_FILE).read_text())
    meta["weights"] = "sha256:0123"
    (directory / SIDECAR_FILE).write_text(json.dumps(meta))


def _garbled_sidecar(directory):
    (directory / SIDECAR_FILE).write_text("{not json")


def _garbage_with_a_matching_sidecar(directory):  # e.g. a hand-copied file: only onnxruntime can tell
    garbage = b"not an onnx graph" * 100
    (directory / ONNX_FILE).write_bytes(garbage)
    meta = json.loads((directory / SIDECAR_FILE).read_text())
    meta.update(bytes=len(garbage), sha256=hashlib.sha256(garbage).hexdigest())
    (directory / SIDECAR_FILE).write_text(json.dumps(meta))


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate, "truncated"),
        (_flip_a_byte_near_the_end, "sha256"),
        (_sidecar_of_other_weights, "describes another encoder"),
        (_garbled_sidecar, "unreadable"),
        (_garbage_with_a_matching_sidecar, "cannot load"),
    ],
)
def test_corrupt_cached_export_is_detected_and_rebuilt(
    tiny_backbone, tiny_onnx, onnx_root, tmp_path, capsys, damage, why
):
    directory = copy_of_export(tiny_backbone, onnx_root, tmp_path)
    damage(directory)
    capsys.readouterr()
    rebuilt = onnx_backbone(tiny_backbone, cache_root=tmp_path)
    err = capsys.readouterr().err
    assert f"rebuilding {directory / ONNX_FILE}" in err and why in err
    assert "max |onnx - torch| = " in err  # the rebuilt export reports its parity
    meta = json.loads((rebuilt.image_encoder.path.parent / SIDECAR_FILE).read_text())
    assert meta["bytes"] == rebuilt.image_encoder.path.stat().st_size
    crops = random_crops(tiny_backbone, 3)
    assert np.abs(rebuilt.encode_images(crops) - tiny_backbone.encode_images(crops)).max() <= PARITY_TOLERANCE


def test_stale_export_of_changed_weights_under_the_same_id_is_rebuilt(
    tiny_backbone, tiny_onnx, onnx_root, tmp_path, capsys
):
    """What no key can see (a config edited under the same name, new open_clip code): the load-time
    comparison with torch catches it."""
    changed = copy.deepcopy(tiny_backbone)
    with torch.no_grad():
        for parameter in changed.model.visual.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    copy_of_export(tiny_backbone, onnx_root, tmp_path)
    capsys.readouterr()
    rebuilt = onnx_backbone(changed, cache_root=tmp_path)
    assert "stale" in capsys.readouterr().err
    crops = random_crops(changed, 3)
    assert np.abs(rebuilt.encode_images(crops) - changed.encode_images(crops)).max() <= PARITY_TOLERANCE


def test_export_that_does_not_match_torch_is_refused_and_not_cached(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setattr("raml.extract.onnx_engine.PARITY_TOLERANCE", 0.0)  # float32 rounding alone now fails
    with pytest.raises(OnnxEngineError, match="does not match the torch encoder: max abs difference"):
        onnx_backbone(tiny_backbone, cache_root=tmp_path)
    assert sorted(p.name for p in export_dir(tiny_backbone, tmp_path).iterdir()) == [".lock"]


def test_cache_written_by_one_engine_takes_images_from_the_other(
    tiny_backbone, tiny_onnx, mvtec_root, mvtec_cache, tmp_path
):
    cache_dir = tmp_path / "mixed"
    extract_features(
        "mvtec",
        mvtec_root,
        cache_dir,
        lambda: tiny_backbone,
        ExtractConfig(categories=["bottle"], workers=0),
        progress=False,
    )
    assert read_cache(cache_dir).engines == ["torch"]
    summary = extract_features(
        "mvtec", mvtec_root, cache_dir, lambda: tiny_onnx, ExtractConfig(workers=0), progress=False
    )
    assert summary.already_cached > 0 and summary.images > 0
    mixed, torch_only = read_cache(cache_dir), read_cache(mvtec_cache)
    assert mixed.engines == ["onnx", "torch"]
    np.testing.assert_array_equal(mixed.relpath, torch_only.relpath)
    # the same images, whichever engine encoded them (float16 storage: half a unit in the last place)
    assert np.abs(mixed.features.astype(np.float32) - torch_only.features.astype(np.float32)).max() <= 1e-3


def test_cli_extract_with_onnx_engine(mvtec_root, tmp_path, monkeypatch):
    from raml.pipeline import cli

    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))
    result = CliRunner().invoke(
        cli,
        [
            "extract",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--cache-dir",
            str(tmp_path / "features"),
            "--model",
            TINY_MODEL,
            "--random-weights",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--limit",
            "2",
            "--engine",
            "onnx",
        ],
    )
    assert result.exit_code == 0, result.output
    assert read_cache(tmp_path / "features").engines == ["onnx"]
    assert list((tmp_path / "user-cache" / "onnx").glob(f"*/{ONNX_FILE}"))
