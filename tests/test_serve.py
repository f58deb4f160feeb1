"""serve: the HTTP service over a deployment answers like its standalone script, refuses bad
requests with a 4xx that says what is wrong and goes on serving, batches concurrent requests,
enforces its token and Host checks, and finishes the request in flight on SIGTERM."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from raml.cache.tokens import map_at
from raml.evaluate.deploy.serve_settings import is_loopback
from raml.pipeline import cli
from tests.synthetic import part_image

pytest.importorskip("starlette", reason="raml serve needs its extra: pip install 'raml[serve]'")
pytest.importorskip("uvicorn", reason="raml serve needs its extra: pip install 'raml[serve]'")

SCORE_TOLERANCE = 1e-5  # the service answers like the torch-free predict_onnx.py, within this
TOKEN = "a-test-token-of-sufficient-length"
LIMITS = ["--max-pixels", "1000000", "--max-upload-mb", "1", "--max-images", "4", "--batch-wait-ms", "50"]


class Service:
    """``raml serve`` in a child process on 127.0.0.1 (or ``host``), port chosen by the system."""

    def __init__(self, deploy_dir, *options, host="127.0.0.1", env=None, cwd=None):
        command = [sys.executable, "-m", "raml.pipeline", "serve", str(deploy_dir), "--port", "0", "--host", host]
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a full pipe would stop the service
        self.cwd = cwd
        self.child = subprocess.Popen(
            [*command, *options],
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        line = self.child.stdout.readline()
        assert "raml serve: http://" in line, line + self.errors()
        self.port = int(line.split("://")[1].split()[0].rsplit(":", 1)[1])
        deadline = time.monotonic() + 180
        while self.request("GET", "/health", headers={"Authorization": f"Bearer {TOKEN}"})[0] != 200:
            assert time.monotonic() < deadline and self.child.poll() is None, "the service did not get ready"
            time.sleep(0.2)

    def request(self, method, path, body=None, headers=None):
        """(status, headers, body) of one request on a fresh connection; (None, {}, b"") when refused."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        except ConnectionRefusedError:
            return None, {}, b""
        finally:
            connection.close()

    def score(self, parts, fields=(), query="", headers=None):
        body, content_type = multipart(parts, fields)
        status, answer_headers, answer = self.request(
            "POST", f"/v1/score{query}", body, {"Content-Type": content_type, **(headers or {})}
        )
        return status, answer_headers, json.loads(answer)

    def errors(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.child.poll() is None:
            self.child.send_signal(signal.SIGTERM)
        out, _ = self.child.communicate(timeout=120)
        return self.child.returncode, out, self.errors()


def multipart(parts, fields=()):
    """A multipart/form-data body: ``parts`` [(file name, bytes)] as field image, ``fields`` [(name, text)]."""
    boundary = uuid.uuid4().hex
    chunks = []
    for name, value in fields:
        chunks.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for filename, data in parts:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        chunks.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def png_bytes(image, **options):
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format=options.pop("format", "PNG"), **options)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def parts(tmp_path_factory, mvtec_root):
    """Images of several sizes, modes and formats, as files."""
    folder = tmp_path_factory.mktemp("parts")
    for name, kind in (("good", "good"), ("broken", "broken")):
        (folder / f"{name}.png").write_bytes((mvtec_root / "bottle" / "test" / kind / "000.png").read_bytes())
    part_image(7, (131, 67), anomalous=True).convert("RGBA").save(folder / "wide rgba.png")
    sixteen_bit = np.asarray(part_image(8, (80, 96)).convert("L"), np.uint16) * 250 + 100
    Image.fromarray(sixteen_bit.astype(np.uint16)).save(folder / "grey16.png")
    part_image(9, (120, 90)).save(folder / "photo.jpg", quality=90)
    return sorted(folder.iterdir())


@pytest.fixture(scope="module")
def service(tiny_deployment, tmp_path_factory):
    running = Service(tiny_deployment, *LIMITS, "--no-access-log", cwd=tmp_path_factory.mktemp("service-cwd"))
    yield running
    running.stop()


def script_scores(deploy_dir, files, maps):
    """predict_onnx.py's own answer: {file name: (score, decision)}, and each map in ``maps``."""
    child = subprocess.run(
        [sys.executable, str(deploy_dir / "predict_onnx.py"), *map(str, files), "--category", "bottle", "--maps", maps],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stdout + child.stderr
    scores = {}
    for line in child.stdout.splitlines()[1:-1]:
        name, score, decision = line.rsplit(maxsplit=2)
        scores[os.path.basename(name.strip())] = (float(score), decision.lower())
    return scores


def test_service_answers_like_the_standalone_script(service, parts, tiny_deployment, tmp_path):
    status, headers, body = service.score(
        [(p.name, p.read_bytes()) for p in parts[:4]], [("category", "bottle"), ("map", "grid")]
    )
    assert status == 200, body
    status, _, rest = service.score([(p.name, p.read_bytes()) for p in parts[4:]], [("category", "bottle")])
    assert status == 200, rest
    results = {r["name"]: r for r in body["results"] + rest["results"]}
    expected = script_scores(tiny_deployment, parts, tmp_path / "maps")
    assert set(results) == set(expected) == {p.name for p in parts}
    deploy = json.loads((tiny_deployment / "deploy.json").read_text())
    threshold = deploy["thresholds"]["bottle"]
    for name, (score, decision) in expected.items():
        result = results[name]
        assert abs(result["score"] - score) <= SCORE_TOLERANCE, name  # the script prints 6 decimals
        assert (result["threshold"], result["category"]) == (threshold, "bottle")
        assert result["threshold_source"].startswith("exported: F1-max")
        if abs(result["score"] - threshold) > SCORE_TOLERANCE:
            assert result["decision"] == decision, name
        assert set(result["timings_ms"]) >= {"decode", "crops", "queue", "model", "batch_images"}
    for path in parts[:4]:  # the raw grid rebuilds the script's map at the image's resolution
        grid = np.asarray(results[path.name]["grid"])
        theirs = np.load(tmp_path / "maps" / f"{path.stem}_map.npy")
        assert grid.shape == (8, 8) and theirs.shape == (results[path.name]["height"], results[path.name]["width"])
        assert np.abs(map_at(grid, *theirs.shape) - theirs).max() <= SCORE_TOLERANCE, path.name
    # raw bytes with a content type, category in the query: the same score
    status, _, raw = service.request(
        "POST", "/v1/score?category=bottle&map=overlay", parts[0].read_bytes(), {"Content-Type": "image/png"}
    )
    raw = json.loads(raw)["results"][0]
    assert status == 200 and abs(raw["score"] - results[parts[0].name]["score"]) <= SCORE_TOLERANCE
    from base64 import b64decode
    from io import BytesIO

    overlay = Image.open(BytesIO(b64decode(raw["overlay_png_base64"])))
    assert overlay.format == "PNG" and overlay.size == (raw["width"], raw["height"])


def test_concurrent_requests_share_encoder_calls(service, parts):
    before = json.loads(service.request("GET", "/health")[2])
    image = parts[0].read_bytes()
    answers, start = [], threading.Barrier(8)

    def client():
        start.wait()
        answers.append(service.score([("same.png", image)], [("category", "bottle")]))

    threads = [threading.Thread(target=client) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    after = json.loads(service.request("GET", "/health")[2])
    assert [status for status, _, _ in answers] == [200] * 8
    scores = [body["results"][0]["score"] for _, _, body in answers]
    assert max(scores) - min(scores) <= SCORE_TOLERANCE  # batched or not, the same image scores the same
    assert after["images_scored"] - before["images_scored"] == 8
    assert after["model_calls"] - before["model_calls"] < 8  # some shared a call
    assert max(body["results"][0]["timings_ms"]["batch_images"] for _, _, body in answers) > 1


def bad_requests(parts):
    """(what, method, path, body, headers, status, code) of requests the service must refuse."""
    good = parts[0].read_bytes()

    def form(images, fields=(("category", "bottle"),)):
        body, content_type = multipart(images, fields)
        return body, {"Content-Type": content_type}

    big = png_bytes(Image.new("L", (1200, 1000)))  # 1.2 M pixels, a 2 kB file
    bomb = png_bytes(Image.new("1", (20000, 20000)))  # 400 M pixels in ~60 kB: PIL's own limit refuses it too
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nshowpage\n"
    return [
        ("not an image", "POST", "/v1/score", *form([("a.png", b"hello, not an image")]), 400, "not_an_image"),
        ("EPS is never decoded", "POST", "/v1/score", *form([("a.eps", eps)]), 400, "not_an_image"),
        ("truncated file", "POST", "/v1/score", *form([("cut.png", good[: len(good) // 2])]), 400, "truncated_image"),
        (
            "too small",
            "POST",
            "/v1/score",
            *form([("s.png", png_bytes(Image.new("RGB", (8, 8))))]),
            400,
            "image_too_small",
        ),
        (
            "unknown category",
            "POST",
            "/v1/score",
            *form([("a.png", good)], [("category", "screw")]),
            400,
            "unknown_category",
        ),
        ("missing category", "POST", "/v1/score", *form([("a.png", good)], []), 400, "missing_category"),
        ("missing image", "POST", "/v1/score", *form([]), 400, "missing_image"),
        (
            "misspelt field",
            "POST",
            "/v1/score",
            *form([("a.png", good)], [("categroy", "bottle")]),
            400,
            "unexpected_field",
        ),
        (
            "bad map",
            "POST",
            "/v1/score",
            *form([("a.png", good)], [("category", "bottle"), ("map", "heat")]),
            400,
            "bad_map",
        ),
        ("too many images", "POST", "/v1/score", *form([("a.png", good)] * 5), 400, "bad_form"),
        ("no boundary", "POST", "/v1/score", b"xx", {"Content-Type": "multipart/form-data"}, 400, "bad_form"),
        ("empty body", "POST", "/v1/score?category=bottle", b"", {"Content-Type": "image/png"}, 400, "missing_image"),
        (
            "text/plain",
            "POST",
            "/v1/score?category=bottle",
            b"hi",
            {"Content-Type": "text/plain"},
            415,
            "unsupported_content_type",
        ),
        ("too many pixels", "POST", "/v1/score", *form([("big.png", big)]), 413, "too_many_pixels"),
        ("decompression bomb", "POST", "/v1/score", *form([("bomb.png", bomb)]), 413, "too_many_pixels"),
        # refused from its Content-Length, before the body is read (none is sent)
        (
            "too large",
            "POST",
            "/v1/score?category=bottle",
            b"",
            {"Content-Type": "image/png", "Content-Length": str(2 * 2**20)},
            413,
            "upload_too_large",
        ),
        ("wrong method", "GET", "/v1/score", None, {}, 405, "method_not_allowed"),
        ("unknown path", "GET", "/v2/score", None, {}, 404, "not_found"),
    ]


def test_every_bad_request_gets_its_4xx_and_the_service_goes_on(service, parts):
    good = parts[0].read_bytes()
    for what, method, path, body, headers, status, code in bad_requests(parts):
        got, answer_headers, answer = service.request(method, path, body, headers)
        answer = json.loads(answer)
        assert (got, answer["error"]["code"]) == (status, code), (what, answer)
        assert answer["random_weights"] is True and answer_headers["raml-random-weights"] == "true", what
        status_after, _, after = service.score([("good.png", good)], [("category", "bottle")])
        assert status_after == 200 and after["results"][0]["score"] > 0, what
    # a body announced small but sent in chunks past the limit is cut off as it streams in
    connection = socket.create_connection(("127.0.0.1", service.port))
    head = b"POST /v1/score?category=bottle HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    connection.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"0" * 2**16
    for _ in range(16):  # 1 MiB, the limit
        connection.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
    # one byte more: the service has read all that was sent when it answers (unread bytes would make
    # its close a reset, and the answer could be lost on the way)
    connection.sendall(b"1\r\n0\r\n")
    connection.settimeout(60)
    reply = b""
    while chunk := connection.recv(65536):  # the service closes the connection after its answer
        reply += chunk
    connection.close()
    assert reply.startswith(b"HTTP/1.1 413") and b"upload_too_large" in reply, reply
    assert service.score([("good.png", good)], [("category", "bottle")])[0] == 200


def test_responses_say_random_weights_and_carry_safe_headers(service):
    for path in ("/", "/page/page.js", "/health", "/v1/info", "/page/nothing"):
        status, headers, body = service.request("GET", path)
        assert headers["raml-random-weights"] == "true", path
        assert (
            headers["x-content-type-options"] == "nosniff"
            and "frame-ancestors 'none'" in headers["content-security-policy"]
        )
        if headers["content-type"].startswith("application/json"):
            answer = json.loads(body)
            assert answer["random_weights"] is True and "meaningless" in answer["warning"], path
    info = json.loads(service.request("GET", "/v1/info")[2])
    assert info["categories"] == ["bottle", "metal_nut"] and info["precision"] == "fp32"
    assert (info["backbone"], info["weights"]) == ("raml-tiny-test", "random(seed=0)")
    assert info["thresholds"]["bottle"]["source"].startswith("exported")
    assert info["limits"]["max_pixels"] == 1_000_000 and info["limits"]["max_images_per_request"] == 4


def test_host_header_and_other_origins_are_refused_on_the_loopback(service, parts):
    status, _, body = service.request("GET", "/v1/info", headers={"Host": "attacker.example:8000"})
    assert status == 421 and json.loads(body)["error"]["code"] == "bad_host"  # DNS rebinding
    status, _, body = service.score(
        [("a.png", parts[0].read_bytes())], [("category", "bottle")], headers={"Origin": "http://attacker.example"}
    )
    assert status == 403 and body["error"]["code"] == "cross_origin"
    same = {"Origin": f"http://127.0.0.1:{service.port}"}
    assert service.score([("a.png", parts[0].read_bytes())], [("category", "bottle")], headers=same)[0] == 200


def test_client_file_names_are_only_echoed(service, parts):
    name = f"../../evil-{uuid.uuid4().hex}.png"
    status, _, body = service.score([(name, parts[0].read_bytes())], [("category", "bottle")])
    assert status == 200 and body["results"][0]["name"] == name
    assert list(service.cwd.iterdir()) == [] and not (service.cwd / name).resolve().exists()


def test_listening_beyond_the_loopback_needs_a_token(tiny_deployment):
    assert is_loopback("127.0.0.1") and is_loopback("127.8.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not any(map(is_loopback, ("0.0.0.0", "::", "192.168.1.20", "example.com", "")))
    result = CliRunner().invoke(cli, ["serve", str(tiny_deployment), "--host", "0.0.0.0"], env={"RAML_SERVE_TOKEN": ""})
    assert (
        result.exit_code == 1 and "listens beyond this machine" in result.output and "RAML_SERVE_TOKEN" in result.output
    )
    result = CliRunner().invoke(cli, ["serve", str(tiny_deployment), "--host", "0.0.0.0", "--token", "short"])
    assert result.exit_code == 2 and "at least 16 characters" in result.output


def test_the_token_is_enforced(tiny_deployment, parts):
    service = Service(tiny_deployment, host="0.0.0.0", env={"RAML_SERVE_TOKEN": TOKEN})
    try:
        image = [("a.png", parts[0].read_bytes())]
        fields = [("category", "bottle")]
        status, headers, body = service.score(image, fields)
        assert (
            status == 401
            and body["error"]["code"] == "unauthorized"
            and headers["www-authenticate"].startswith("Bearer")
        )
        assert service.score(image, fields, headers={"Authorization": "Bearer wrong-token-wrong-token"})[0] == 401
        assert service.request("GET", "/v1/info")[0] == 401
        assert service.score(image, fields, headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert service.request("GET", "/v1/info", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert service.request("GET", "/health")[0] == 200  # probes need no token; they learn nothing
    finally:
        service.stop()


def test_sigterm_finishes_the_request_in_flight_then_exits(tiny_deployment, parts):
    service = Service(tiny_deployment)
    body, content_type = multipart([("good.png", parts[0].read_bytes())], [("category", "bottle")])
    connection = socket.create_connection(("127.0.0.1", service.port))
    head = f"POST /v1/score HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n"
    connection.sendall(head.encode() + body[:100])  # in flight: half sent
    time.sleep(0.5)
    service.child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    while service.request("GET", "/health")[0] is not None:  # it stops accepting connections
        assert time.monotonic() < deadline
        time.sleep(0.1)
    connection.sendall(body[100:])
    reply = b""
    while chunk := connection.recv(65536):
        reply += chunk
    connection.close()
    assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
    answer = json.loads(reply.split(b"\r\n\r\n", 1)[1])
    assert answer["results"][0]["name"] == "good.png" and answer["results"][0]["score"] > 0
    status, out, err = service.stop()
    assert status == 0 and "stopped (SIGTERM); 1 images scored" in out, err


def test_the_service_imports_no_torch():
    code = "import sys, raml.evaluate.deploy.serve_run, raml.evaluate.deploy.calibrate; " + (
        "assert not {'torch', 'open_clip', 'sklearn'} & set(sys.modules), sorted(sys.modules)"
    )
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert child.returncode == 0, child.stderr[-2000:]


# --- the page, in a real browser -------------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1100,1400",
]
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C WebDriver key of an element reference


class Browser:
    """Headless Chromium through chromedriver, spoken to in W3C WebDriver's JSON over HTTP (the few
    commands this test needs), on 127.0.0.1 only."""

    def __init__(self, profile):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", "--allowed-ips=127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                self.call("GET", "/status")
                break
            except OSError:
                assert time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.2)
        options = {"binary": CHROMIUM, "args": [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]}
        capabilities = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        self.session = self.call("POST", "/session", capabilities)["sessionId"]

    def call(self, method, path, payload=None):
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            body = None if payload is None else json.dumps(payload)
            connection.request(method, path, body, {"Content-Type": "application/json"})
            answer = json.loads(connection.getresponse().read())["value"]
        finally:
            connection.close()
        if isinstance(answer, dict) and "error" in answer:
            raise AssertionError(f"WebDriver {method} {path}: {answer['error']}: {answer.get('message', '')[:500]}")
        return answer

    def command(self, method, path, payload=None):
        return self.call(method, f"/session/{self.session}{path}", payload)

    def find(self, css):
        return self.command("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def run(self, script, *args):
        return self.command("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script, timeout=120):
        deadline = time.monotonic() + timeout
        while not (value := self.run(script)):
            assert time.monotonic() < deadline, f"timed out waiting for: {script}"
            time.sleep(0.2)
        return value

    def close(self):
        try:
            self.command("DELETE", "")
        finally:
            self.driver.terminate()
            self.driver.wait(timeout=30)


@pytest.mark.browser
@pytest.mark.skipif(
    not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)",
)
def test_the_page_scores_a_dropped_image_in_a_real_browser(service, parts, tmp_path):
    browser = Browser(tmp_path / "profile")
    try:
        browser.command("POST", "/url", {"url": f"http://127.0.0.1:{service.port}/"})
        browser.wait_for("return document.getElementById('category').options.length === 2")
        assert browser.run("return document.getElementById('random-warning').hidden") is False
        assert "RANDOM WEIGHTS" in browser.run("return document.getElementById('random-warning').textContent")
        browser.run("document.getElementById('category').value = 'bottle'")
        image = next(p for p in parts if p.name == "broken.png")
        browser.command("POST", f"/element/{browser.find('#file')}/value", {"text": str(image)})
        browser.wait_for("return !document.getElementById('result').hidden")
        browser.wait_for("const img = document.getElementById('overlay'); return img.complete && img.naturalWidth > 0")
        shown = browser.run(
            "const $ = (id) => document.getElementById(id);"
            "return {decision: $('decision').textContent, score: $('score').textContent,"
            " threshold: $('threshold').textContent, size: $('size').textContent,"
            " overlay: [$('overlay').naturalWidth, $('overlay').naturalHeight], status: $('status').textContent}"
        )
        screenshot = tmp_path / "serve-page.png"
        from base64 import b64decode

        screenshot.write_bytes(b64decode(browser.command("GET", "/screenshot")))
        print(f"screenshot: {screenshot}")
    finally:
        browser.close()
    expected = service.score([("broken.png", image.read_bytes())], [("category", "bottle")])[2]["results"][0]
    assert shown["score"] == f"score {expected['score']:.4f}"
    assert shown["decision"] == expected["decision"].upper()
    assert shown["threshold"].startswith(f"{expected['threshold']:.4f} (exported")
    assert shown["size"] == "broken.png: 97 × 83 px, bottle" and shown["overlay"] == [97, 83]
    assert "RANDOM WEIGHTS" in shown["status"]
    assert Image.open(screenshot).size[0] > 500
