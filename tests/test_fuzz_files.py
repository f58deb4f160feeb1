"""Every file a user hands over, damaged (Hypothesis): truncated, bytes flipped, emptied, replaced by
another kind of file or by garbage, and for JSON files every value swapped for one of another kind
or an absurd size. Reading it either works (a flip where nothing checks it, e.g. in a weight) or
raises the error a user reads (``UserError``: the command line's one ``Error:`` line) naming the
file — never a traceback. Derandomised with a bounded number of examples, so that CI cannot flake."""

import io
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raml.cache import read_cache
from raml.cache.format import CACHE_JSON, shard_paths
from raml.cache.reader import read_token_rows
from raml.errors import UserError
from raml.evaluate.protocols import read_split_manifest
from raml.evaluate.report import write_report
from raml.evaluate.results_file import read_results
from raml.extract.encoder import load_backbone
from raml.extract.identity import TINY_TEST_CONFIG, backbone_identity
from raml.extract.pyramid import load_mask, load_rgb
from raml.train.checkpoint import load_checkpoint
from raml.train.config import make_config
from raml.train.fit import fit, write_run
from raml.train.split import holdout_split
from raml.train.sweep import finished_metrics
from tests.synthetic import mask_image, part_image

FUZZ = settings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
OTHER_FILES = [
    b"",
    b"\x00" * 64,
    b"not the file you are looking for\n",
    b'{"a": 1}',
    b"[]",
    b"null",
    b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\xff\xff\x00\x00\xff\xff\x08\x02",
]  # PNG: 65535² px
ABSURD = [None, True, -1, 0, 10**12, -(10**12), 1e308, "x", "", [], {}, [1, 2], {"k": "v"}]


def damaged(data: bytes):
    """Strategy: ``data`` truncated, with bytes flipped, or replaced by another file or garbage."""

    def flip(flips):
        out = bytearray(data)
        for offset, mask in flips:
            out[offset % len(out)] ^= mask
        return bytes(out)

    return st.one_of(
        st.integers(0, len(data) - 1).map(lambda n: data[:n]),
        st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(1, 255)), min_size=1, max_size=16).map(flip),
        st.sampled_from(OTHER_FILES),
        st.binary(max_size=300),
    )


def json_leaves(value, path=()):
    """Every (path, value) of a JSON document, containers included."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from json_leaves(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:3]):
            yield from json_leaves(item, (*path, index))


def json_mutated(document):
    """Strategy: ``document`` with one value (or the document itself) replaced by an absurd one."""
    paths = [path for path, _ in json_leaves(document)]

    def replace(choice):
        path, new = choice
        if not path:
            return new
        copy = json.loads(json.dumps(document))
        target = copy
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = new
        return copy

    return st.tuples(st.sampled_from(paths), st.sampled_from(ABSURD)).map(replace)


def refused_in_words(read, named: str) -> None:
    """``read()`` works, or raises a ``UserError`` (or a missing file) whose message names ``named``."""
    try:
        read()
    except (UserError, FileNotFoundError) as err:
        assert named in str(err), str(err)


def copy_once(cache, to: Path) -> Path:
    """``to``: a copy of ``cache``, made by the first example (the others overwrite the file they damage)."""
    if not to.exists():
        shutil.copytree(cache, to)
    return to


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mvtec_cache):
    out = tmp_path_factory.mktemp("fuzz-run") / "run"
    write_run(out, fit(read_cache(mvtec_cache), make_config("adaptive", epochs=1, batch_size=8)))
    return out


@given(data=st.data())
@FUZZ
def test_model_config(tmp_path, data):
    path = tmp_path / "model.json"
    original = TINY_TEST_CONFIG.read_bytes()
    mutated = data.draw(
        st.one_of(damaged(original), json_mutated(json.loads(original)).map(lambda doc: json.dumps(doc).encode()))
    )
    path.write_bytes(mutated)
    refused_in_words(lambda: backbone_identity(str(path), random_weights=True), str(path))


@given(data=st.data())
@settings(FUZZ, max_examples=25)
def test_weights_file(tmp_path, tiny_backbone, data):
    buffer = io.BytesIO()
    torch.save(tiny_backbone.model.state_dict(), buffer)
    path = tmp_path / "weights.pt"
    path.write_bytes(data.draw(damaged(buffer.getvalue())))
    refused_in_words(lambda: load_backbone(str(TINY_TEST_CONFIG), weights=str(path), device="cpu"), str(path))


@given(data=st.data())
@FUZZ
def test_checkpoint(tmp_path, trained_run, data):
    path = tmp_path / "checkpoint.pt"
    original = (trained_run / "checkpoint.pt").read_bytes()
    if data.draw(st.booleans()):
        path.write_bytes(data.draw(damaged(original)))
    else:  # a checkpoint whose structure was edited: torch.load reads it, RAML must check it
        payload = torch.load(trained_run / "checkpoint.pt", weights_only=True)
        key = data.draw(
            st.sampled_from(
                ["config", "fingerprint", "manifest", "thresholds", "categories", "loss_state", "state_dict", "format"]
            )
        )
        value = payload[key]
        editable = (
            json.loads(json.dumps(value, default=lambda tensor: 0))
            if key != "state_dict"
            else {name: 0 for name in value}
        )
        payload[key] = data.draw(json_mutated(editable))
        torch.save(payload, path)
    refused_in_words(lambda: load_checkpoint(path), str(path))


@given(data=st.data())
@FUZZ
def test_cache_json(tmp_path, mvtec_cache, data):
    cache_dir = copy_once(mvtec_cache, tmp_path / "cache")
    original = (mvtec_cache / CACHE_JSON).read_bytes()
    mutated = data.draw(
        st.one_of(damaged(original), json_mutated(json.loads(original)).map(lambda doc: json.dumps(doc).encode()))
    )
    (cache_dir / CACHE_JSON).write_bytes(mutated)
    refused_in_words(lambda: read_cache(cache_dir), str(cache_dir))


@given(data=st.data())
@FUZZ
def test_shard(tmp_path, mvtec_cache, data):
    cache_dir = copy_once(mvtec_cache, tmp_path / "cache")
    shard = shard_paths(cache_dir)[0]
    shard.write_bytes(data.draw(damaged(shard_paths(mvtec_cache)[0].read_bytes())))
    refused_in_words(lambda: read_cache(cache_dir), str(shard))


@given(data=st.data())
@settings(FUZZ, max_examples=25)
def test_shard_with_patch_tokens(tmp_path, mvtec_token_cache, data):
    cache_dir = copy_once(mvtec_token_cache, tmp_path / "cache")
    shard = shard_paths(cache_dir)[0]
    shard.write_bytes(data.draw(damaged(shard_paths(mvtec_token_cache)[0].read_bytes())))

    def read_every_token():
        table = read_cache(cache_dir)
        read_token_rows(table, range(len(table)))

    refused_in_words(read_every_token, str(shard))


@given(data=st.data())
@FUZZ
def test_image_and_mask(tmp_path, data):
    image_bytes, mask_bytes = io.BytesIO(), io.BytesIO()
    part_image(1, (80, 72)).save(image_bytes, format=data.draw(st.sampled_from(["PNG", "JPEG", "BMP", "TIFF"])))
    mask_image((80, 72)).save(mask_bytes, format="PNG")
    image, mask = tmp_path / "part.png", tmp_path / "part_mask.png"
    image.write_bytes(data.draw(damaged(image_bytes.getvalue())))
    mask.write_bytes(data.draw(damaged(mask_bytes.getvalue())))
    refused_in_words(lambda: load_rgb(image), str(image))
    refused_in_words(lambda: load_mask(mask, 80, 72), str(mask))


@given(data=st.data())
@FUZZ
def test_split_manifest(tmp_path, trained_run, data):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    original = (trained_run / "split.json").read_bytes()
    (run / "split.json").write_bytes(
        data.draw(
            st.one_of(damaged(original), json_mutated(json.loads(original)).map(lambda doc: json.dumps(doc).encode()))
        )
    )
    refused_in_words(lambda: read_split_manifest(run), str(run / "split.json"))


@pytest.fixture(scope="module")
def results_file(tmp_path_factory, trained_run, mvtec_cache):
    from raml.evaluate.run import evaluate_checkpoints

    path, _ = evaluate_checkpoints(
        [trained_run], mvtec_cache, tmp_path_factory.mktemp("fuzz-results"), n_resamples=10, log=lambda line: None
    )
    return path


@given(data=st.data())
@settings(FUZZ, max_examples=40)
def test_results_file_and_the_report_on_it(tmp_path, results_file, data):
    results = tmp_path / "results"
    if not results.exists():
        shutil.copytree(results_file.parent, results)
    original = results_file.read_bytes()
    (results / results_file.name).write_bytes(
        data.draw(
            st.one_of(damaged(original), json_mutated(json.loads(original)).map(lambda doc: json.dumps(doc).encode()))
        )
    )
    refused_in_words(lambda: read_results(results / results_file.name), str(results / results_file.name))
    refused_in_words(lambda: write_report([results / results_file.name], tmp_path / "report"), str(results))


@given(data=st.data())
@FUZZ
def test_a_sweep_runs_config_and_metrics(tmp_path, trained_run, mvtec_cache, data):
    """A sweep that resumes reads each finished run's config.json and metrics.json."""
    table = read_cache(mvtec_cache)
    config = make_config("adaptive", epochs=1, batch_size=8)
    run = tmp_path / "adaptive-seed0"
    if not run.exists():
        shutil.copytree(trained_run, run)
    fingerprint = {key: table.meta.get(key) for key in table.meta}
    heldout_hash = holdout_split(table, config.split_seed, config.holdout_fraction).manifest()["heldout_hash"]
    metrics = {"run": run.name, "seed": 0, "heldout_hash": heldout_hash, "fingerprint": fingerprint}
    name = data.draw(st.sampled_from(["config.json", "metrics.json"]))
    original = json.dumps(config.to_dict() if name == "config.json" else metrics).encode()
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "config.json").write_text(json.dumps(config.to_dict()))
    (run / name).write_bytes(
        data.draw(
            st.one_of(damaged(original), json_mutated(json.loads(original)).map(lambda doc: json.dumps(doc).encode()))
        )
    )
    refused_in_words(lambda: finished_metrics(run, config, table, heldout_hash), str(run))
