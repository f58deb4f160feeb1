"""What a user sees when something goes wrong that no check foresaw, and the integrity of every
shard attribute."""

import json
import shutil

import h5py
import pytest
from click.testing import CliRunner

from raml.cache import read_cache
from raml.cache.checks import ATTRIBUTES
from raml.cache.format import CHECKSUM_ATTRIBUTE, shard_paths
from raml.errors import CacheError
from raml.pipeline import cli
from tests.conftest import TINY_MODEL


def test_an_unexpected_error_is_one_line_naming_what_was_processed_and_its_log(mvtec_cache, tmp_path, monkeypatch):
    """A bug (here: an exception no check foresaw, raised while reading a shard) is a short message
    with the command, the shard, and the log file that holds the whole traceback."""
    import raml.cache.reader

    monkeypatch.setenv("RAML_CACHE_DIR", str(tmp_path / "user-cache"))

    def broken(path, meta):
        raise ZeroDivisionError("division by zero in a helper")

    monkeypatch.setattr(raml.cache.reader, "load_shard", broken)
    result = CliRunner().invoke(cli, ["info", "--cache-dir", str(mvtec_cache)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    shard = shard_paths(mvtec_cache)[0]
    assert (
        f"Error: unexpected ZeroDivisionError in `cli info` while processing shard {shard}: division by zero "
        "in a helper. This is a bug in RAML or a library, not your input: its traceback is in"
    ) in result.output
    logs = list((tmp_path / "user-cache" / "logs").glob("error-*.log"))
    assert len(logs) == 1 and str(logs[0]) in result.output
    text = logs[0].read_text()
    assert "Traceback (most recent call last)" in text and "in broken" in text and "ZeroDivisionError" in text

    monkeypatch.setenv("RAML_DEBUG", "1")  # the traceback itself, for whoever debugs it
    debug = CliRunner().invoke(cli, ["info", "--cache-dir", str(mvtec_cache)])
    assert isinstance(debug.exception, ZeroDivisionError)


def _shard_copy(mvtec_cache, tmp_path):
    cache_dir = tmp_path / "cache"
    shutil.copytree(mvtec_cache, cache_dir)
    return cache_dir, shard_paths(cache_dir)[0]


@pytest.mark.parametrize("attribute", ["dataset", "engine", "code_version", "prompts", "format_version", "weights"])
def test_a_changed_shard_attribute_is_caught_and_the_shard_named(mvtec_cache, tmp_path, attribute):
    cache_dir, shard = _shard_copy(mvtec_cache, tmp_path)
    with h5py.File(shard, "r+") as h5:
        value = json.loads(h5.attrs[attribute])
        changed = (
            {**value, "root": "/elsewhere"}
            if attribute == "dataset"
            else {
                "engine": "onnx",
                "code_version": "9.9.9",
                "prompts": {"templates": ["x"]},
                "format_version": 3,
                "weights": "openai",
            }[attribute]
        )
        h5.attrs[attribute] = json.dumps(changed)
    with pytest.raises(CacheError, match=f"{shard}: ") as caught:
        read_cache(cache_dir)
    message = str(caught.value)
    # a fingerprint field differs from cache.json (caught first), or the checksum of the attributes does
    assert (
        ("written by another backbone" in message and attribute in message)
        or "attributes (" in message
        and "do not match their checksum (corrupted)" in message
    )


def test_a_shard_of_format_2_without_the_checksum_of_its_attributes_is_refused(mvtec_cache, tmp_path):
    cache_dir, shard = _shard_copy(mvtec_cache, tmp_path)
    with h5py.File(shard, "r+") as h5:
        assert json.loads(h5.attrs["format_version"]) == 2
        checksums = json.loads(h5.attrs[CHECKSUM_ATTRIBUTE])
        del checksums[ATTRIBUTES]
        h5.attrs[CHECKSUM_ATTRIBUTE] = json.dumps(checksums)
    with pytest.raises(CacheError, match="its attributes have no checksum although the shard is of format 2"):
        read_cache(cache_dir)


def test_model_config_that_is_not_json_names_the_file(tmp_path, mvtec_root):
    broken = tmp_path / "broken.json"
    broken.write_text('{"embed_dim": 32, "vision_cfg": ')
    result = CliRunner().invoke(
        cli,
        [
            "extract",
            "--dataset",
            "mvtec",
            "--root",
            str(mvtec_root),
            "--cache-dir",
            str(tmp_path / "c"),
            "--model",
            str(broken),
            "--random-weights",
        ],
    )
    assert result.exit_code in (1, 2) and "Traceback" not in result.output
    assert str(broken) in result.output or "broken.json" in result.output
    assert TINY_MODEL not in result.output
