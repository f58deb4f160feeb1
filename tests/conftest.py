"""Shared fixtures: the tiny CLIP (same open_clip code path, random weights) and synthetic data."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on a download in tests

import pytest

from raml.cache import read_cache
from raml.cache.synthetic import write_synthetic_cache
from raml.extract.config import ExtractConfig
from raml.extract.encoder import load_backbone
from raml.extract.identity import TINY_TEST_CONFIG
from raml.extract.run import extract_features
from tests.synthetic import make_mvtec

TINY_MODEL = str(TINY_TEST_CONFIG)


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory):
    """RAML's user cache (identity memo, ONNX exports) in a temporary folder, not ~/.cache/raml;
    subprocesses inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("user-cache")
        patch.setenv("RAML_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="session", autouse=True)
def no_user_workspace_settings():
    """No raml.toml (RAML_CONFIG=/dev/null reads none) and no RAML_DATA from the person running the
    tests: the workspace tests set their own."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RAML_CONFIG", os.devnull)
        patch.delenv("RAML_DATA", raising=False)
        yield


@pytest.fixture(scope="session")
def tiny_backbone():
    """A 2-layer, 32-px CLIP with seeded random weights: exercises the code, means nothing."""
    return load_backbone(TINY_MODEL, random_weights=True, device="cpu")


@pytest.fixture(scope="session")
def mvtec_root(tmp_path_factory):
    return make_mvtec(tmp_path_factory.mktemp("mvtec"))


@pytest.fixture(scope="session")
def mvtec_cache(tmp_path_factory, mvtec_root, tiny_backbone):
    """A cache extracted from the synthetic MVTec tree (2 categories, 20 images). Read-only."""
    cache_dir = tmp_path_factory.mktemp("cache") / "mvtec"
    extract_features("mvtec", mvtec_root, cache_dir, lambda: tiny_backbone, ExtractConfig(workers=0), progress=False)
    return cache_dir


@pytest.fixture(scope="session")
def mvtec_token_cache(tmp_path_factory, mvtec_root, tiny_backbone):
    """The synthetic MVTec tree's cache with patch tokens and mask targets (``--patch-tokens``). Read-only."""
    cache_dir = tmp_path_factory.mktemp("cache") / "mvtec-tokens"
    extract_features(
        "mvtec",
        mvtec_root,
        cache_dir,
        lambda: tiny_backbone,
        ExtractConfig(workers=0, patch_tokens=True),
        progress=False,
    )
    return cache_dir


@pytest.fixture(scope="session")
def two_category_table(tmp_path_factory):
    """A separable synthetic feature cache for stage two: 2 categories × (20 training, 10 good and 10
    defective test images), 32-d features. Read-only."""
    shape = {"bottle": (20, 10, 10, 900), "screw": (20, 10, 10, 1024)}
    return read_cache(
        write_synthetic_cache(tmp_path_factory.mktemp("two-categories") / "cache", shape, dim=32, separation=3.0)
    )


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, mvtec_token_cache):
    """A training run with a pixel head (2 epochs on the token cache). Read-only."""
    from raml.train.config import make_config
    from raml.train.fit import fit, write_run

    out = tmp_path_factory.mktemp("tiny-run") / "raml"
    write_run(out, fit(read_cache(mvtec_token_cache), make_config("adaptive", epochs=2, batch_size=8)))
    return out


@pytest.fixture(scope="session")
def tiny_deployment(tmp_path_factory, tiny_run, tiny_backbone, user_cache_dir):
    """``raml export`` of ``tiny_run`` (categories bottle and metal_nut, random weights). Read-only:
    copy it to change it (``calibrate`` writes deploy.json)."""
    from raml.evaluate.deploy.export import export_deployment
    from raml.train.checkpoint import load_checkpoint

    out = tmp_path_factory.mktemp("tiny-deployment") / "deploy"
    export_deployment(load_checkpoint(tiny_run), out, tiny_backbone, log=lambda line: None)
    return out
