"""``bench serve``: a bounded load test of ``raml serve`` on this machine, beside the in-process
scorer on the same images.

It starts the service on 127.0.0.1 (any free port) in a child process, and sends requests only
there: one image per request (raw bytes, ``Content-Type: image/png``), each client a thread with its
own keep-alive connection sending its next request when the last one is answered. Per number of
concurrent clients: images/s (answers ÷ wall time), latency p50/p95/p99 and errors (any answer
but 200, or none), each level stopping after ``requests`` requests or ``time_limit`` seconds,
whichever comes first. The service's resident memory (VmRSS, Linux) is read after the first
``WARM_REQUESTS`` requests and again after ``memory_requests``, both sent by as many clients as the
busiest level (so that the first reading already holds the peak of images in flight). The in-process scorer
(``serve_model.DeployedModel``: decode, crops, one encoder and head call per image, as
``predict_onnx.py`` does) is timed on the same images before the service starts and after it
stops, so that a shared machine's drift shows; the ratio uses their mean. CPU time per image (the
service's, from /proc, and this process's while it scores) is printed beside the rates: on shared
cores, wall-clock rates follow the other jobs' load and favour the side with more threads, CPU time
per image much less.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from raml.errors import UserError

WARM_REQUESTS = 100  # the memory baseline is read after these (buffers, pools and caches are full by then)
READY_TIMEOUT_S = 180  # loading a ViT-B/16 deployment on a busy machine takes tens of seconds
IN_PROCESS_IMAGES = 30  # images the in-process scorer scores each time it is timed (after one warm-up)


@dataclass
class Level:
    clients: int
    latencies: list = field(default_factory=list)  # s, of the answered requests
    errors: list = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float | None = None  # the service's CPU time during the level

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    def line(self, reference: float) -> str:
        """The level's row of the table; ``reference``: the in-process scorer's images/s."""
        return (
            f"{self.clients:>7}  {self.rate:8.2f}  {self.rate / reference:12.2f}  {self.percentile(50):8.1f}  "
            f"{self.percentile(95):8.1f}  {self.percentile(99):8.1f}  {len(self.errors):>6}  "
            f"{self.cpu_ms_per_image:11.1f}  {len(self.latencies)} in {self.wall_s:.1f} s"
        )

    @property
    def cpu_ms_per_image(self) -> float:
        return 1000 * self.cpu_s / len(self.latencies) if self.cpu_s is not None and self.latencies else float("nan")

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q) * 1000) if self.latencies else float("nan")


@dataclass
class ServeBench:
    deploy_dir: Path
    size: int
    levels: list = field(default_factory=list)
    in_process: list = field(default_factory=list)  # images/s, before and after the service ran
    in_process_cpu_ms: list = field(default_factory=list)  # CPU ms per image, likewise
    rss_warm: int | None = None  # bytes, after WARM_REQUESTS
    rss_end: int | None = None  # bytes, after memory_requests
    requests_at_end: int = 0
    other_errors: list = field(default_factory=list)  # of the warm-up and top-up requests
    exit_status: int | None = None

    def lines(self) -> list[str]:
        reference = statistics.mean(self.in_process)
        out = [
            f"bench serve: {self.deploy_dir}, {self.size} px PNGs, one image per request, raw bytes",
            f"in-process scorer: {' then '.join(f'{r:.2f}' for r in self.in_process)} images/s, "
            f"{' then '.join(f'{c:.1f}' for c in self.in_process_cpu_ms)} CPU ms/image (before, after the service)",
            f"{'clients':>7}  {'images/s':>8}  {'x in-process':>12}  {'p50 ms':>8}  {'p95 ms':>8}  {'p99 ms':>8}  "
            f"{'errors':>6}  {'CPU ms/img':>11}  answered",
        ]
        out += [level.line(reference) for level in self.levels]
        for level in self.levels:
            for error in sorted(set(level.errors))[:3]:
                out.append(f"  error with {level.clients} clients: {error}")
        if self.rss_warm and self.rss_end:
            growth = (self.rss_end - self.rss_warm) / self.rss_warm
            out.append(
                f"service memory: {self.rss_warm / 2**20:.1f} MiB after {WARM_REQUESTS} requests, "
                f"{self.rss_end / 2**20:.1f} MiB after {self.requests_at_end} ({growth:+.1%})"
            )
        out.append(f"errors outside the levels (warm-up, top-up to the memory reading): {len(self.other_errors)}")
        out += [f"  {error}" for error in sorted(set(self.other_errors))[:3]]
        out.append(f"service stopped by SIGTERM with exit status {self.exit_status}")
        return out


def rss_bytes(pid: int) -> int | None:
    """Resident memory of process ``pid`` (Linux: /proc/PID/status), None elsewhere."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmRSS:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) * 1024 if match else None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux: /proc/PID/stat), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14, 15


def in_process_rate(deploy_dir, images: list[bytes], category: int) -> tuple[float, float]:
    """(images/s, CPU ms per image) of decode, crops and one model call per image, in this process."""
    from raml.evaluate.deploy.serve_model import DeployedModel
    from raml.evaluate.deploy.serve_settings import ServeSettings

    model = DeployedModel(deploy_dir, ServeSettings().max_pixels)
    model.load()
    model.score([model.prepare("warm-up", images[0], category, False)])
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(IN_PROCESS_IMAGES):
        model.score([model.prepare(f"image {i}", images[i % len(images)], category, False)])
    cpu_ms = 1000 * (time.process_time() - cpu) / IN_PROCESS_IMAGES
    return IN_PROCESS_IMAGES / (time.perf_counter() - start), cpu_ms


def _start_service(deploy_dir) -> tuple[subprocess.Popen, str, int]:
    command = [sys.executable, "-m", "raml.pipeline", "serve", str(deploy_dir), "--port", "0", "--no-access-log"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = child.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        child.kill()
        raise UserError(f"raml serve did not start: {line.strip() or 'no output'}")
    port = int(match.group(1))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return child, line.strip(), port
        except OSError:
            pass
        finally:
            connection.close()
        if child.poll() is not None:
            raise UserError(f"raml serve exited with status {child.returncode} while loading {deploy_dir}")
        time.sleep(0.2)
    child.kill()
    raise UserError(f"raml serve was not ready after {READY_TIMEOUT_S} s")


def _load(port: int, images: list[bytes], category: str, clients: int, requests: int, time_limit: float) -> Level:
    """``requests`` requests from ``clients`` threads (or fewer, at ``time_limit`` s)."""
    level, lock = Level(clients), threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + time_limit

    def client():
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=time_limit + 30)
        path = f"/v1/score?category={category}"
        while time.monotonic() < deadline:
            with lock:
                number = next(counter, None)
            if number is None:
                break
            start = time.perf_counter()
            try:
                connection.request(
                    "POST", path, body=images[number % len(images)], headers={"Content-Type": "image/png"}
                )
                response = connection.getresponse()
                response.read()
                problem = None if response.status == 200 else f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as err:
                problem = f"{type(err).__name__}: {err}"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=time_limit + 30)
            with lock:
                (level.errors.append(problem) if problem else level.latencies.append(time.perf_counter() - start))
        connection.close()

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall_s = time.perf_counter() - start
    return level


def bench_serve(
    deploy_dir,
    *,
    clients=(1, 4, 16),
    requests: int = 300,
    memory_requests: int = 1000,
    time_limit: float = 120.0,
    size: int = 900,
    distinct: int = 8,
    category: str | None = None,
    echo=print,
) -> ServeBench:
    """Run the load test (module docstring); ``echo`` gets a line as each phase ends."""
    from raml.evaluate.deploy.predict_onnx import read_deployment
    from raml.extract.bench import synthetic_images

    try:
        deploy = read_deployment(deploy_dir)
    except ValueError as err:
        raise UserError(str(err)) from None
    category = category or deploy["categories"][0]
    if category not in deploy["categories"]:
        raise UserError(f"--category {category}: not in {deploy_dir}; one of {', '.join(deploy['categories'])}")
    with tempfile.TemporaryDirectory(prefix="raml-bench-serve-") as tmp:
        images = [path.read_bytes() for path in synthetic_images(Path(tmp), distinct, size)]
    result = ServeBench(Path(deploy_dir), size)
    index = deploy["categories"].index(category)
    _record(result, in_process_rate(deploy_dir, images, index))
    echo(f"in-process scorer: {result.in_process[0]:.2f} images/s")
    child, started, port = _start_service(deploy_dir)
    echo(started)
    try:
        busiest = max(clients)  # warm-up and top-up at the highest concurrency: both memory readings
        # then follow the same high-water mark of images in flight, and the difference is growth alone
        warm = _load(port, images, category, busiest, WARM_REQUESTS, time_limit)
        sent = len(warm.latencies) + len(warm.errors)
        result.other_errors += warm.errors
        result.rss_warm = rss_bytes(child.pid)
        for count in clients:
            cpu = cpu_seconds(child.pid)
            level = _load(port, images, category, count, requests, time_limit)
            after = cpu_seconds(child.pid)
            level.cpu_s = None if cpu is None or after is None else after - cpu
            result.levels.append(level)
            sent += len(level.latencies) + len(level.errors)
            echo(level.line(result.in_process[0]))
        if sent < memory_requests:
            top_up = _load(port, images, category, busiest, memory_requests - sent, time_limit)
            sent += len(top_up.latencies) + len(top_up.errors)
            result.other_errors += top_up.errors
        result.rss_end, result.requests_at_end = rss_bytes(child.pid), sent
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            result.exit_status = child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            child.kill()
            result.exit_status = child.wait()
    _record(result, in_process_rate(deploy_dir, images, index))
    return result


def _record(result: ServeBench, timed: tuple[float, float]) -> None:
    result.in_process.append(timed[0])
    result.in_process_cpu_ms.append(timed[1])


def machine_line() -> str:
    """Load average and CPU, to quote beside the figures (the cores may be shared)."""
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    model = ""
    try:
        model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M).group(1)
    except (OSError, AttributeError):
        pass
    return f"machine: {os.cpu_count()} logical CPUs {model}; load average {load}"
