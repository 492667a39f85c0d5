"""URL images: fetched concurrently from a local HTTP server (127.0.0.1 only), failures become counted skips.

The server serves good images, corrupt bytes, 404s, a flaky endpoint (503 then 200), a slow
endpoint that trickles bytes, a stalled one, oversized bodies and redirects. It answers at most
``MAX_REQUESTS`` requests and no handler runs longer than a few seconds.
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from m2ib_lightning import ImageTextDataModule, Preprocessor, load_attributions
from m2ib_lightning.data.fetch import FetchConfig, Fetcher, ordered_map
from m2ib_lightning.data.images import ImageError, read_image
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.run.cli import main

MAX_REQUESTS = 300
FAST = FetchConfig(timeout=0.5, retries=1, backoff=0.01, max_bytes=64 * 1024, concurrency=8)


def png(colour=(200, 30, 60), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Routes by path; every request is counted in ``server.hits``."""

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        server = self.server
        with server.lock:
            server.hits[self.path] += 1
            total, hits = sum(server.hits.values()), server.hits[self.path]
        if total > MAX_REQUESTS:
            return self.send(503, b"request budget of the test server used up")
        path = self.path
        if path.startswith("/good/"):
            n = int(path.rsplit("/", 1)[1].split(".")[0])
            return self.send(200, png((n * 20 % 256, 100, 50)), {"Content-Type": "image/png"})
        if path == "/corrupt.jpg":
            return self.send(200, b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10, {"Content-Type": "image/jpeg"})
        if path == "/flaky.png":  # fails on the first request, then works
            return self.send(503) if hits == 1 else self.send(200, png())
        if path == "/slow.png":  # headers at once, then one byte every 0.2 s for at most 3 s
            body = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            deadline = time.monotonic() + 3
            for i in range(len(body)):
                if time.monotonic() > deadline:
                    break
                try:
                    self.wfile.write(body[i : i + 1])
                    self.wfile.flush()
                except OSError:
                    break  # the client gave up, as it should
                time.sleep(0.2)
            return None
        if path == "/stall.png":  # headers, then silence for 2 s
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            time.sleep(2)
            return None
        if path == "/big-declared.png":
            self.send_response(200)
            self.send_header("Content-Length", str(10 * 2**20))
            self.end_headers()
            return None
        if path == "/big-chunked.png":  # no Content-Length: the cap must hold while reading
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            for _ in range(40):  # 160 KiB, more than FAST.max_bytes
                try:
                    self.wfile.write(b"\x00" * 4096)
                except OSError:
                    break
            return None
        if path == "/redirect-good":
            return self.send(302, headers={"Location": "/good/3.png"})
        if path == "/redirect-file":
            return self.send(302, headers={"Location": "file:///etc/hostname"})
        if path == "/redirect-ftp":
            return self.send(302, headers={"Location": "ftp://127.0.0.1/x.png"})
        return self.send(404, b"not found")


@pytest.fixture(scope="module")
def server():
    """A threaded HTTP server on 127.0.0.1 (an OS-assigned port), shut down after the module."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    httpd.hits = Counter()
    httpd.lock = threading.Lock()
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield base, httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def fetch_error(fetcher: Fetcher, url: str) -> ImageError:
    with pytest.raises(ImageError) as info:
        fetcher(url)
    return info.value


def test_good_image_and_redirect(server):
    base, _ = server
    fetcher = Fetcher(FAST)
    assert fetcher(f"{base}/good/1.png") == png((20, 100, 50))
    image = read_image(f"{base}/redirect-good", fetch=fetcher).image
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (60, 100, 50)


def test_404_fails_at_once_and_is_not_retried(server):
    base, httpd = server
    err = fetch_error(Fetcher(FAST), f"{base}/missing-404.png")
    assert "HTTP 404" in str(err) and not err.transient
    assert httpd.hits["/missing-404.png"] == 1


def test_transient_503_is_retried(server):
    base, httpd = server
    slept = []
    data = Fetcher(FAST, sleep=slept.append)(f"{base}/flaky.png")
    assert data == png() and httpd.hits["/flaky.png"] == 2 and slept == [FAST.backoff]


@pytest.mark.parametrize("path", ["/slow.png", "/stall.png"])
def test_slow_endpoints_time_out_within_the_bound(server, path):
    base, httpd = server
    before = httpd.hits[path]
    start = time.monotonic()
    err = fetch_error(Fetcher(FAST), f"{base}{path}")
    elapsed = time.monotonic() - start
    assert "timed out" in str(err) and err.transient and "after 2 attempts" in str(err)
    assert httpd.hits[path] - before == FAST.retries + 1
    # Each attempt ends within 2 x timeout (module docstring of fetch); generous slack for a busy machine.
    assert elapsed < (FAST.retries + 1) * 2 * FAST.timeout + 2.0, elapsed


def test_size_cap_from_the_header_and_while_reading(server):
    base, _ = server
    fetcher = Fetcher(FAST)
    err = fetch_error(fetcher, f"{base}/big-declared.png")
    assert f"more than max_bytes={FAST.max_bytes}" in str(err) and not err.transient
    err = fetch_error(fetcher, f"{base}/big-chunked.png")
    assert f"exceeds max_bytes={FAST.max_bytes}" in str(err) and not err.transient


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/x.png", "data:image/png;base64,AAAA",
                                 "http:///no-host.png", "gopher://127.0.0.1/"])
def test_only_http_urls_with_a_host_are_fetched(url):
    err = fetch_error(Fetcher(FAST), url)
    assert "only http(s)" in str(err) and not err.transient


@pytest.mark.parametrize("url", ["file:///etc/hostname", "ftp://127.0.0.1/x.png", "s3://bucket/x.png"])
def test_url_values_with_other_schemes_are_refused_before_any_fetch(url):
    with pytest.raises(ImageError, match=r"not allowed \(only http and https are fetched\)"):
        read_image(url, fetch=lambda u: pytest.fail(f"fetched {u}"))


@pytest.mark.parametrize("path", ["/redirect-file", "/redirect-ftp"])
def test_redirects_to_other_schemes_are_refused(server, path):
    base, _ = server
    err = fetch_error(Fetcher(FAST), f"{base}{path}")
    # urllib itself refuses file:, our handler refuses what urllib would follow (ftp:)
    message = str(err).lower()
    assert "redirect" in message and ("refused" in message or "not allowed" in message) and not err.transient


def test_urls_are_escaped_like_a_browser_and_a_malformed_host_fails_at_once(server):
    base, httpd = server
    before = httpd.hits["/other/2%20copy%C3%A9.png"]
    with pytest.raises(ImageError, match="HTTP 404"):  # the server saw the escaped path
        Fetcher(FAST)(f"{base}/other/2 copyé.png")
    assert httpd.hits["/other/2%20copy%C3%A9.png"] == before + 1
    err = fetch_error(Fetcher(FAST), "http://bad..host/x.png")  # the host name cannot be encoded: no DNS query
    assert "fetch failed" in str(err) and not err.transient


def test_connection_refused_is_transient():
    # Port 9 on 127.0.0.1 (discard): nothing listens there on a test machine; no other address is used.
    err = fetch_error(Fetcher(FetchConfig(timeout=0.5, retries=0)), "http://127.0.0.1:9/x.png")
    assert err.transient and "fetch failed" in str(err)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout": 0}, "fetch.timeout must be a number > 0, got 0"),
        ({"retries": -1}, "fetch.retries must be an int >= 0, got -1"),
        ({"max_bytes": 0}, "fetch.max_bytes must be an int >= 1, got 0"),
        ({"concurrency": 0}, "fetch.concurrency must be an int >= 1, got 0"),
        ({"backoff": -1.0}, "fetch.backoff must be a number >= 0, got -1.0"),
    ],
)
def test_fetch_config_is_validated(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FetchConfig(**kwargs)


def test_ordered_map_keeps_order_bounds_the_window_and_overlaps_work():
    in_flight, peak, lock = 0, 0, threading.Lock()

    def work(i: int) -> int:
        nonlocal in_flight, peak
        with lock:
            in_flight += 1
            peak = max(peak, in_flight)
        time.sleep(0.05 if i % 3 else 0.15)  # later items often finish first
        with lock:
            in_flight -= 1
        return i * i

    assert list(ordered_map(work, range(24), threads=4, window=6)) == [i * i for i in range(24)]
    assert 2 <= peak <= 4
    assert list(ordered_map(work, range(5), threads=1)) == [i * i for i in range(5)]


def test_url_dataset_streams_pairs_and_counted_skips(server, backbone, tmp_path: Path):
    """A Conceptual Captions style table (caption, image_url): every row is a pair or a skip with its reason."""
    base, _ = server
    rows = [{"url": f"{base}/good/{i}.png", "caption": f"a photo number {i}"} for i in range(10)]
    bad = {
        "corrupt": f"{base}/corrupt.jpg",
        "missing": f"{base}/nothing-here.png",
        "slow": f"{base}/slow.png",
        "file": "file:///etc/hostname",
        "big": f"{base}/big-declared.png",
        "empty": "",
    }
    rows += [{"url": url, "caption": f"broken {name}"} for name, url in bad.items()]
    data = tmp_path / "cc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = ImageTextDataModule(path="json", data_files=str(data), image_column="url", id_column=None, batch_size=4,
                             fetch=FAST)
    dm.preprocessor = Preprocessor.from_backbone(backbone)
    batches = list(dm.train_dataloader())
    ids = [i for b in batches for i in b["ids"]]
    skipped = {s["id"]: s for b in batches for s in b["skipped"]}
    assert ids == [f"json-train-{i}" for i in range(10)]  # order kept despite concurrent fetches
    reasons = {name: skipped[f"json-train-{10 + k}"] for k, name in enumerate(bad)}
    assert len(skipped) == len(bad)
    assert "unreadable image" in reasons["corrupt"]["reason"]
    assert "HTTP 404" in reasons["missing"]["reason"]
    assert "timed out" in reasons["slow"]["reason"] and reasons["slow"]["transient"] is True
    assert "not allowed" in reasons["file"]["reason"]
    assert "max_bytes" in reasons["big"]["reason"]
    assert "no image" in reasons["empty"]["reason"]
    assert all("transient" not in s for k, s in reasons.items() if k != "slow")
    assert sum(len(b["ids"]) + len(b["skipped"]) for b in batches) == len(rows)


def test_cc3m_config_end_to_end_against_the_local_server(server, tiny_clip_dir, tmp_path):
    """configs/cc3m.yaml with its data pointed at a local table of URLs: pairs written, failures listed."""
    base, _ = server
    rows = [{"image_url": f"{base}/good/{i}.png", "caption": f"a coloured square {i}"} for i in range(5)]
    rows += [{"image_url": f"{base}/gone.jpg", "caption": "a dead link"},
             {"image_url": f"{base}/corrupt.jpg", "caption": "a broken file"}]
    data = tmp_path / "cc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = Path(__file__).resolve().parents[1] / "configs" / "cc3m.yaml"
    cli = main([
        "fit", "-c", str(config), "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1", "--model.init_args.steps", "2",
        "--model.init_args.copies", "2", "--trainer.accelerator", "cpu", "--trainer.precision", "32-true",
        "--trainer.default_root_dir", str(tmp_path), "--data.init_args.path", "json", "--data.init_args.name", "null",
        "--data.init_args.split", "train", "--data.init_args.data_files", str(data), "--data.init_args.limit", "null",
        "--data.init_args.num_workers", "1", "--data.init_args.batch_size", "4",
        "--data.init_args.fetch.timeout", "0.5", "--data.init_args.fetch.retries", "0",
    ])
    records = load_attributions(tmp_path / "attributions")
    assert sorted(records) == [f"json-train-{i}" for i in range(5)]
    assert "HTTP 404" in records.skipped["json-train-5"] and "unreadable image" in records.skipped["json-train-6"]
    assert cli.trainer.callback_metrics["skipped"] == 2
