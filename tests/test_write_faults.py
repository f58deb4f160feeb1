"""Write faults, injected: a disk that fills up, a file-size limit, a directory the user may not
write, a file system that is read-only. Each command stops with one ``Error:`` line naming the
path and the cause in words (exit status 1, never a traceback or a crash), what was finished
before stays intact, and a re-run after the fault completes the same cache. Plus the checks
before a long job: free space, and the entries of image folders that are not read."""

import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import raml.cache.files
from raml.cache import read_cache
from raml.cache.format import partial_shards, shard_paths
from raml.pipeline import cli
from tests.conftest import TINY_MODEL
from tests.synthetic import make_folder, make_mvtec
from tests.test_extract import assert_same_table

REPO = Path(__file__).resolve().parents[1]
BACKBONE = ["--model", TINY_MODEL, "--random-weights", "--device", "cpu"]


def extract_args(root, cache_dir, *extra):
    return [
        "extract",
        "--dataset",
        "mvtec",
        "--root",
        str(root),
        "--cache-dir",
        str(cache_dir),
        *BACKBONE,
        "--workers",
        "0",
        *extra,
    ]


class FailingDisk:
    """Every project module's ``atomic_write`` (the one path of every file write, ``cache.files``)
    replaced by one that lets ``allowed`` writes through and fails the next ones half-way: the
    temporary file is written, then cut to half its size, then ``OSError(error)`` is raised — a disk
    that fills up while writing. ``only`` limits it to files whose name contains that text.
    ``cache.files`` itself is patched too, so that a module the command imports later (the CLI
    imports its workers lazily) binds the failing one."""

    def __init__(self, monkeypatch, allowed: int = 0, error: int = errno.ENOSPC, only: str = ""):
        self.allowed, self.error, self.only, self.failed = allowed, error, only, []
        self.real = raml.cache.files.atomic_write
        monkeypatch.setattr(raml.cache.files, "atomic_write", self)
        for module in list(sys.modules.values()):
            bound = getattr(module, "atomic_write", None)
            if (bound is self.real or isinstance(bound, FailingDisk)) and module.__name__.startswith("raml."):
                monkeypatch.setattr(module, "atomic_write", self)

    def __call__(self, path, write, *, tmp=None):
        if self.only not in Path(path).name or self.allowed > 0:
            self.allowed -= self.only in Path(path).name
            return self.real(path, write, tmp=tmp)

        def half_then_fail(target):
            write(target)
            data = Path(target).read_bytes()
            Path(target).write_bytes(data[: len(data) // 2])
            raise OSError(self.error, os.strerror(self.error), str(target))

        self.failed.append(Path(path))
        return self.real(path, half_then_fail, tmp=tmp)


def one_error_line(output: str, *expected: str) -> str:
    """The one ``Error:`` line of a command's output, which must hold every text of ``expected``."""
    assert "Traceback" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    for text in expected:
        assert text in errors[0], errors[0]
    return errors[0]


def test_extract_on_a_disk_that_fills_up_stops_with_one_line_and_resumes_to_the_same_cache(tmp_path, monkeypatch):
    root = make_mvtec(tmp_path / "data", n_train=6, n_test_good=3, n_defect=3)  # 30 images, shards of 8
    args = extract_args(root, tmp_path / "cache", "--batch-size", "8", "--shard-size", "8")
    disk = FailingDisk(monkeypatch, allowed=2, only="features-")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1
    one_error_line(
        result.output,
        "features-000of001-00002.h5: cannot write: no space left on the device",
        "Free some space or write elsewhere, then run the same command again (extract and sweep keep what they",
    )
    assert [path.name for path in disk.failed] == ["features-000of001-00002.h5"]
    assert len(read_cache(tmp_path / "cache")) == 16  # the two shards written before are intact
    assert not partial_shards(tmp_path / "cache") and not list((tmp_path / "cache").glob(".*.tmp"))
    monkeypatch.undo()  # space freed
    resumed = CliRunner().invoke(cli, args)
    assert resumed.exit_code == 0, resumed.output
    assert "14 images encoded, 0 skipped, 16 already cached" in resumed.output
    straight = CliRunner().invoke(
        cli, extract_args(root, tmp_path / "straight", "--batch-size", "8", "--shard-size", "8")
    )
    assert straight.exit_code == 0, straight.output
    assert_same_table(read_cache(tmp_path / "cache"), read_cache(tmp_path / "straight"))


def _file_size_limit(limit: int):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writing past the limit is then EFBIG, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_extract_past_a_file_size_limit_is_one_line_not_a_crash(tmp_path):
    """A real fault from the kernel in a child process (RLIMIT_FSIZE, SIGXFSZ ignored: every write
    past the limit fails with EFBIG). HDF5 used to meet it mid-shard and crash the process
    (segmentation fault); shards are now written by Python and the run says what happened."""
    root = make_mvtec(tmp_path / "data")
    command = [sys.executable, "pipeline.py", *extract_args(root, tmp_path / "cache", "--shard-size", "8")]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    limited = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300, preexec_fn=_file_size_limit(12_000)
    )
    assert limited.returncode == 1, limited.stderr
    one_error_line(
        limited.stderr,
        "features-000of001-00000.h5: cannot write: the file is larger than the file "
        "system or the file-size limit (ulimit -f) allows",
    )
    assert not partial_shards(tmp_path / "cache") and not shard_paths(tmp_path / "cache")
    again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert len(read_cache(tmp_path / "cache")) == 20


def test_train_on_a_full_disk_leaves_no_checkpoint_and_the_earlier_run_intact(mvtec_cache, tmp_path, monkeypatch):
    args = ["train", "--cache-dir", str(mvtec_cache), "--epochs", "1", "--batch-size", "8", "--out"]
    first = CliRunner().invoke(cli, [*args, str(tmp_path / "first")])
    assert first.exit_code == 0, first.output
    before = (tmp_path / "first" / "checkpoint.pt").read_bytes()
    FailingDisk(monkeypatch, only="checkpoint.pt")
    failed = CliRunner().invoke(cli, [*args, str(tmp_path / "second")])
    assert failed.exit_code == 1
    one_error_line(failed.output, f"{tmp_path / 'second' / 'checkpoint.pt'}: cannot write: no space left")
    # the run directory this command created is removed again: nothing half-written is left
    assert not (tmp_path / "second").exists()
    (tmp_path / "third").mkdir()  # a directory the user made stays, without a checkpoint or temporary file
    failed = CliRunner().invoke(cli, [*args, str(tmp_path / "third")])
    assert failed.exit_code == 1
    assert sorted(p.name for p in (tmp_path / "third").iterdir()) == ["config.json", "history.json", "split.json"]
    assert (tmp_path / "first" / "checkpoint.pt").read_bytes() == before


@pytest.mark.parametrize(
    "error, words",
    [
        (errno.EROFS, "the file system is read-only"),
        (errno.EDQUOT, "the disk quota is exhausted"),
        (errno.EACCES, "permission denied"),
    ],
)
def test_evaluate_write_fault_keeps_the_previous_results(mvtec_cache, tmp_path, monkeypatch, error, words):
    run = tmp_path / "run"
    assert (
        CliRunner()
        .invoke(
            cli, ["train", "--cache-dir", str(mvtec_cache), "--epochs", "1", "--batch-size", "8", "--out", str(run)]
        )
        .exit_code
        == 0
    )
    args = [
        "evaluate",
        "--checkpoint",
        str(run),
        "--cache-dir",
        str(mvtec_cache),
        "--out",
        str(tmp_path / "res"),
        "--bootstrap",
        "10",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0
    before = (tmp_path / "res" / "results.json").read_text()
    FailingDisk(monkeypatch, error=error, only="results.json")
    failed = CliRunner().invoke(cli, [*args, "--name", "renamed"])
    assert failed.exit_code == 1
    one_error_line(failed.output, f"{tmp_path / 'res' / 'results.json'}: cannot write: {words}")
    assert (tmp_path / "res" / "results.json").read_text() == before


def test_export_and_predict_write_faults_are_one_line(mvtec_root, mvtec_cache, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert (
        CliRunner()
        .invoke(
            cli, ["train", "--cache-dir", str(mvtec_cache), "--epochs", "1", "--batch-size", "8", "--out", str(run)]
        )
        .exit_code
        == 0
    )
    FailingDisk(monkeypatch, only="deploy.json")
    exported = CliRunner().invoke(
        cli, ["export", "--checkpoint", str(run), "--out", str(tmp_path / "deploy"), *BACKBONE]
    )
    assert exported.exit_code == 1
    one_error_line(exported.output, "deploy.json: cannot write: no space left on the device")
    assert not (tmp_path / "deploy" / "deploy.json").exists()  # the deployment reads as incomplete
    monkeypatch.undo()
    disk = FailingDisk(monkeypatch, only="predictions.csv")
    files = sorted((mvtec_root / "bottle" / "test").glob("*/*.png"))[:2]
    predicted = CliRunner().invoke(
        cli,
        [
            "predict",
            *map(str, files),
            "--checkpoint",
            str(run),
            "--category",
            "bottle",
            "--out",
            str(tmp_path / "pred"),
            *BACKBONE,
            "--no-heatmaps",
        ],
    )
    assert predicted.exit_code == 1, (predicted.output, disk.failed, repr(predicted.exception))
    one_error_line(predicted.output, "predictions.csv: cannot write: no space left on the device")
    assert not (tmp_path / "pred" / "predictions.csv").exists()


@pytest.fixture
def closed_dir(tmp_path):
    """A directory this process may read but not write in, and the words of the fault: for a user,
    mode r-x (EACCES: "permission denied"); for root, whom modes do not stop, the immutable
    attribute (``chattr +i``, EPERM: "operation not permitted"). Skipped where neither works."""
    closed = tmp_path / "closed"
    closed.mkdir()
    if os.geteuid() != 0:
        closed.chmod(0o555)
        yield closed, "permission denied"
        closed.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(closed)]).returncode != 0:
        pytest.skip("runs as root on a file system without chattr +i: no directory it cannot write")
    yield closed, "operation not permitted"
    subprocess.run(["chattr", "-i", str(closed)], check=True)


def test_directories_the_user_may_not_write_are_one_line_each(mvtec_root, mvtec_cache, closed_dir, tmp_path):
    closed, words = closed_dir
    runner = CliRunner()
    extracted = runner.invoke(cli, extract_args(mvtec_root, closed / "cache"))
    assert extracted.exit_code == 1
    one_error_line(extracted.output, f"{closed / 'cache'}: cannot write: {words}")

    train = ["train", "--cache-dir", str(mvtec_cache), "--epochs", "1", "--batch-size", "8", "--out"]
    trained = runner.invoke(cli, [*train, str(closed / "run")])
    assert trained.exit_code == 1
    one_error_line(trained.output, f"{closed / 'run'}: cannot write: {words}")

    run_dir = tmp_path / "run"
    assert runner.invoke(cli, [*train, str(run_dir)]).exit_code == 0
    for command, target in (
        (
            ["evaluate", "--checkpoint", str(run_dir), "--cache-dir", str(mvtec_cache), "--bootstrap", "10", "--out"],
            "results",
        ),
        (["export", "--checkpoint", str(run_dir), *BACKBONE, "--out"], "deploy"),
        (
            [
                "predict",
                str(mvtec_root / "bottle" / "test" / "good" / "000.png"),
                "--checkpoint",
                str(run_dir),
                "--category",
                "bottle",
                *BACKBONE,
                "--out",
            ],
            "predictions",
        ),
    ):
        result = runner.invoke(cli, [*command, str(closed / target)])
        assert result.exit_code == 1, (command[0], result.output)
        one_error_line(result.output, f"{closed / target}: cannot write: {words}")
    assert (
        runner.invoke(
            cli,
            [
                "evaluate",
                "--checkpoint",
                str(run_dir),
                "--cache-dir",
                str(mvtec_cache),
                "--bootstrap",
                "10",
                "--out",
                str(tmp_path / "results"),
            ],
        ).exit_code
        == 0
    )
    reported = runner.invoke(cli, ["report", str(tmp_path / "results"), "--out", str(closed / "report")])
    assert reported.exit_code == 1
    one_error_line(reported.output, f"{closed / 'report'}: cannot write: {words}")
    # the ONNX export goes to the user's cache: an unwritable one is named too
    exported = runner.invoke(
        cli,
        extract_args(mvtec_root, tmp_path / "onnx-cache", "--engine", "onnx"),
        env={"RAML_CACHE_DIR": str(closed / "user-cache")},
    )
    assert exported.exit_code == 1
    one_error_line(exported.output, f"{closed / 'user-cache'}", f"cannot write: {words}")
    assert sorted(p.name for p in closed.iterdir()) == []
    assert (run_dir / "checkpoint.pt").is_file()  # earlier work intact


def test_a_read_only_cache_directory_is_one_line(mvtec_root, mvtec_cache, tmp_path, monkeypatch):
    """A read-only file system (EROFS) on the lock file, which extract opens first."""
    import raml.cache.lock

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "c" / "extract-000of001.lock"))

    monkeypatch.setattr(raml.cache.lock.os, "open", read_only)
    result = CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "c"))
    assert result.exit_code == 1
    one_error_line(
        result.output,
        "extract-000of001.lock: cannot write: the file system is read-only",
        "Write to a directory on a writable disk",
    )


def test_space_check_refuses_a_job_that_does_not_fit_and_warns_when_it_nearly_does(mvtec_root, tmp_path, monkeypatch):
    from raml.extract import plan as extract_plan

    free = {"bytes": 30_000}
    monkeypatch.setattr(
        extract_plan.shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - free["bytes"], free["bytes"]),
    )
    refused = CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "c"))
    assert refused.exit_code == 1
    line = one_error_line(
        refused.output, "20 images to encode need about", "but its file system has 30.0 KB free", "nothing was encoded"
    )
    need = float(line.split("need about ")[1].split(" KB")[0]) * 1000
    assert 20 * 21 * 32 * 2 < need < 300_000  # features (26.9 KB) plus rows and one shard
    assert "--random-weights" not in refused.output  # refused before the backbone was loaded
    assert not shard_paths(tmp_path / "c")
    free["bytes"] = int(need / 0.9)
    warned = CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "c"))
    assert warned.exit_code == 0, warned.output
    assert "extract: warning: 20 images to encode need about" in warned.output and len(read_cache(tmp_path / "c")) == 20


def test_entries_of_image_folders_that_are_not_read_are_listed(tmp_path):
    root = make_folder(tmp_path / "parts", n_good=3, n_defect=2)
    good = root / "widget" / "good"
    (good / "animated.gif").write_bytes(b"GIF89a")
    (good / "phone.HEIC").write_bytes(b"\0")
    (good / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (good / "more").mkdir()
    (good / ".DS_Store").write_bytes(b"\0")  # hidden: not an image, passed over
    cache_dir = tmp_path / "cache"
    result = CliRunner().invoke(
        cli,
        [
            "extract",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--cache-dir",
            str(cache_dir),
            *BACKBONE,
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    report = cache_dir / "extract-report-000of001.json"
    assert f"5 images encoded, 0 skipped, 0 already cached, 4 not read: see {report}" in result.output
    not_read = {Path(entry["path"]).name: entry["reason"] for entry in json.loads(report.read_text())["not_read"]}
    assert set(not_read) == {"animated.gif", "phone.HEIC", "gone.png", "more"}
    assert not_read["animated.gif"].startswith("suffix '.gif' is not one RAML reads (.bmp .jpeg .jpg .png")
    assert not_read["gone.png"] == f"a dangling symbolic link (its target {tmp_path / 'nowhere.png'} does not exist)"
    assert not_read["more"] == "a folder: images are read only directly inside their folder"
    again = CliRunner().invoke(
        cli,
        [
            "extract",
            "--dataset",
            "folder",
            "--root",
            str(root),
            "--cache-dir",
            str(cache_dir),
            *BACKBONE,
            "--workers",
            "0",
        ],
    )
    assert "0 images encoded, 0 skipped, 5 already cached, 4 not read" in again.output


def test_limit_zero_is_refused_before_any_work(mvtec_root, tmp_path):
    result = CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "c", "--limit", "0"))
    assert (
        result.exit_code == 2 and "Invalid value for '--limit': 0 is not in the range 1<=x<=10000000" in result.output
    )
    assert not (tmp_path / "c").exists()


def test_info_shows_the_size_per_image(mvtec_cache):
    result = CliRunner().invoke(cli, ["info", "--cache-dir", str(mvtec_cache)])
    size = sum(path.stat().st_size for path in shard_paths(mvtec_cache))
    assert f"size on disk: {size / 1000:.1f} KB in shards, {size / 20 / 1000:.1f} KB per image" in result.output


def test_write_fault_words_for_every_errno():
    for code, (words, advice) in raml.cache.files.WRITE_FAULTS.items():
        fault = raml.cache.files.write_fault(OSError(code, os.strerror(code), "/x/y"))
        assert str(fault) == f"/x/y: cannot write: {words}. {advice[0].upper()}{advice[1:]}."
    assert raml.cache.files.write_fault(OSError(errno.ENOENT, "No such file", "/x")) is None
    wrapped = RuntimeError("exporter failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/tmp/t")
    assert "/out/model.onnx: cannot write: no space left" in str(
        raml.cache.files.write_fault(wrapped, "/out/model.onnx")
    )
    assert raml.cache.files.write_fault(ValueError("x")) is None


def test_space_check_counts_the_patch_tokens(mvtec_root, tmp_path, monkeypatch):
    """Room for the features alone: a run with --patch-tokens is refused, naming what the tokens take."""
    from raml.cache.writer import estimated_bytes
    from raml.extract import plan as extract_plan

    features = estimated_bytes(20, 32, 256)
    monkeypatch.setattr(
        extract_plan.shutil,
        "disk_usage",
        lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 2 * features, 2 * features),
    )
    refused = CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "c", "--patch-tokens"))
    assert refused.exit_code == 1
    line = one_error_line(
        refused.output, "20 images to encode need about", "of patch tokens for each of 20 images", "nothing was encoded"
    )
    assert not shard_paths(tmp_path / "c")
    assert CliRunner().invoke(cli, extract_args(mvtec_root, tmp_path / "d")).exit_code == 0, line  # features fit
