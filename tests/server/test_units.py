"""In-process units: the micro-batcher with a fake model, the loading phase of /healthz, remote-URL safety."""

from __future__ import annotations

import asyncio
import http.server
import selectors
import threading
import time
from pathlib import Path

import pytest
from starlette.testclient import TestClient

from blip2.pipeline import Generation, GenerationOptions
from blip2.server import ServerSettings, create_app
from blip2.server import batcher as batcher_module
from blip2.server import images as img
from blip2.server.batcher import MicroBatcher, QueueFull
from blip2.server.schema import ApiError


class FakeModel:
    """Answers `prompt@image`; records each call's batch size; optionally slow (in virtual time) or failing on one
    prompt."""

    def __init__(self, delay: float = 0.0, fail_on: str | None = None) -> None:
        self.calls: list[int] = []
        self.delay = delay
        self.fail_on = fail_on

    def __call__(self, images, prompts, options: GenerationOptions) -> list[Generation]:
        self.calls.append(len(prompts))
        if self.fail_on in prompts:
            raise ValueError(f"bad prompt {self.fail_on}")
        n = options.num_return_sequences
        return [Generation(f"{p}@{i}#{k}", [1], 0.0) for i, p in zip(images, prompts) for k in range(n)]


class _JumpingSelector(selectors.DefaultSelector):
    """Never blocks on a timeout: it moves the loop's virtual clock to the next timer instead."""

    def __init__(self, loop_clock: list[float]) -> None:
        super().__init__()
        self.loop_clock = loop_clock

    def select(self, timeout: float | None = None):
        if timeout is not None and timeout > 0:
            self.loop_clock[0] += timeout
            timeout = 0
        return super().select(timeout)


class VirtualTimeLoop(asyncio.SelectorEventLoop):
    """An event loop whose time moves only when every task waits: to the next timer, at once. `asyncio.sleep`,
    `wait_for` and the batcher's waits take no real time, and the order of events depends on nothing but the test's
    numbers (no scheduler, no machine load)."""

    def __init__(self) -> None:
        self.clock = [0.0]
        super().__init__(_JumpingSelector(self.clock))

    def time(self) -> float:
        return self.clock[0]


def run(coro):
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


async def with_batcher(fake: FakeModel, body, **limits):
    """Run `body(batcher)` against a batcher on the virtual clock whose model calls take `fake.delay` seconds of it
    (the event loop keeps serving requests meanwhile, as with the real worker thread)."""
    loop = asyncio.get_running_loop()

    async def run_model(call):
        await asyncio.sleep(fake.delay)
        return call()

    batcher = MicroBatcher(fake, **limits, clock=loop.time, run_model=run_model)
    batcher.start()
    try:
        return await body(batcher)
    finally:
        await batcher.stop()


def test_virtual_time_loop_jumps_to_timers() -> None:
    """The tests below rest on this: sleeps take their exact virtual time and no real time."""

    async def body():
        loop = asyncio.get_running_loop()
        await asyncio.gather(asyncio.sleep(0.3), asyncio.sleep(0.2))
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.Event().wait(), 0.05)
        return loop.time()

    started = time.monotonic()
    assert run(body()) == pytest.approx(0.35, abs=1e-9)
    assert time.monotonic() - started < 0.2


def test_batcher_model_calls_run_in_the_worker_thread() -> None:
    """The default `run_model`: the model runs off the event loop (which keeps accepting requests meanwhile)."""
    threads: list[str] = []

    def generate(images, prompts, options):
        threads.append(threading.current_thread().name)
        return [Generation(p, [1], 0.0) for p in prompts]

    async def body():
        b = MicroBatcher(generate, max_batch_size=2, max_wait_ms=0)
        b.start()
        try:
            return await asyncio.gather(*[b.submit("i", f"p{k}", GenerationOptions()) for k in range(2)])
        finally:
            await b.stop()

    assert [r[0].text for r in asyncio.run(body())] == ["p0", "p1"]
    assert threads and all(name.startswith("blip2-generate") for name in threads)


def test_batcher_groups_by_options_and_respects_size() -> None:
    fake = FakeModel(delay=0.05)
    greedy, beams = GenerationOptions(max_new_tokens=5), GenerationOptions(max_new_tokens=5, num_beams=2)

    async def body(b: MicroBatcher):
        jobs = [b.submit(f"img{i}", f"p{i}", greedy if i % 2 == 0 else beams) for i in range(10)]
        return await asyncio.gather(*jobs)

    results = run(with_batcher(fake, body, max_batch_size=3, max_wait_ms=50))
    assert [r[0].text for r in results] == [f"p{i}@img{i}#0" for i in range(10)]
    assert max(fake.calls) == 3 and sum(fake.calls) == 10 and len(fake.calls) == 4  # 5 greedy: 3+2, 5 beams: 3+2


def closed_loop_batches(
    delay: float, others_at: float, resend: float, rounds: int = 4, spread: float = 0.0, **limits
) -> list[int]:
    """The batch sizes a model taking `delay` s per call sees from 8 clients that each send again `resend` s after
    their answer (reading it, building the next request), client k `k * spread` s later still (a server answers them
    one after the other); client 0 starts alone, the 7 others at `others_at` s. All in virtual time: exact."""
    fake = FakeModel(delay=delay)

    async def client(b: MicroBatcher, k: int):
        await asyncio.sleep(0 if k == 0 else others_at)
        for r in range(rounds):
            await b.submit(f"img{k}", f"p{k}.{r}", GenerationOptions())
            await asyncio.sleep(resend + k * spread)

    async def body(b: MicroBatcher):
        await asyncio.gather(*[client(b, k) for k in range(8)])

    run(with_batcher(fake, body, max_batch_size=8, **limits))
    return fake.calls


def test_batcher_keeps_closed_loop_clients_together() -> None:
    """8 clients that each send again as soon as they are answered must share full batches. If the wait counted
    from arrival only, a request that queued during a batch would leave alone right after it, and the server would
    alternate batches of 1 and 7 for ever (bench/serve_load.py shows it as a mean batch near 4 of 8)."""
    # client 0's batch leaves at 0.2 s and runs 0.3 s; the others arrive while it runs
    assert closed_loop_batches(0.3, others_at=0.25, resend=0.005, max_wait_ms=200) == [1, 8, 8, 8, 7]


@pytest.mark.parametrize("max_wait_ms", [None, 10.0])
def test_batcher_auto_wait_lets_slow_clients_rejoin(monkeypatch, max_wait_ms) -> None:
    """Clients that need 30 ms to send again (HTTP, JSON, image decoding under load) miss a fixed 10 ms wait and
    the batches stay split; the default wait, a share of the last batch's time, lets them rejoin. If this fails
    with None, a full-size server's batches split the same way (bench/serve_load.py --full)."""
    monkeypatch.setattr(batcher_module, "AUTO_WAIT_SHARE", 0.5)  # 0.2 s batches -> 100 ms (the server: 2%)
    # client 0's batch leaves at 25 ms (the floor: no batch before it) and runs 0.2 s; the others arrive meanwhile
    calls = closed_loop_batches(0.2, others_at=0.05, resend=0.03, max_wait_ms=max_wait_ms)
    assert calls == [1, 8, 8, 8, 7] if max_wait_ms is None else calls[:4] == [1, 7, 1, 7]


def test_batcher_default_wait_covers_a_clients_turnaround_between_fast_batches() -> None:
    """With batches of a few tens of ms (the tiny model, or a GPU) the share of the batch's time is below the floor,
    so the floor must cover the time over which the clients of a batch send again (here 5 to 19 ms after their
    answers). If this fails, fast batches split (bench/serve_load.py on the tiny model shows it)."""
    assert closed_loop_batches(0.03, others_at=0.05, resend=0.005, spread=0.002, max_wait_ms=None) == [1, 8, 8, 8, 7]


def test_batcher_n_and_seeded_sampling_alone() -> None:
    fake = FakeModel()
    sampled = GenerationOptions(do_sample=True, seed=1, num_return_sequences=2)

    async def body(b: MicroBatcher):
        return await asyncio.gather(*[b.submit(f"i{k}", f"p{k}", sampled) for k in range(3)])

    results = run(with_batcher(fake, body, max_batch_size=8, max_wait_ms=20))
    assert [[g.text for g in r] for r in results] == [[f"p{k}@i{k}#0", f"p{k}@i{k}#1"] for k in range(3)]
    assert fake.calls == [1, 1, 1]  # a seeded sample depends on its batch, so it runs alone


def test_batcher_isolates_a_failing_request() -> None:
    fake = FakeModel(fail_on="bad")

    async def body(b: MicroBatcher):
        return await asyncio.gather(
            *[b.submit("i", p, GenerationOptions()) for p in ("ok1", "bad", "ok2")], return_exceptions=True
        )

    results = run(with_batcher(fake, body, max_batch_size=8, max_wait_ms=20))
    assert results[0][0].text == "ok1@i#0" and results[2][0].text == "ok2@i#0"
    assert isinstance(results[1], ValueError)


def test_batcher_bounded_queue() -> None:
    fake = FakeModel(delay=0.2)

    async def body(b: MicroBatcher):
        return await asyncio.gather(
            *[b.submit("i", f"p{k}", GenerationOptions()) for k in range(6)], return_exceptions=True
        )

    results = run(with_batcher(fake, body, max_batch_size=1, max_wait_ms=0, max_queue=2))
    assert any(isinstance(r, QueueFull) for r in results)
    assert any(isinstance(r, list) for r in results)


def test_healthz_loading_then_ok(tmp_path: Path) -> None:
    release = threading.Event()

    class Loaded:
        tokenizer = staticmethod(lambda text: None)
        model = type("M", (), {"language_model": None})()

    def loader():
        release.wait(10)
        return Loaded()

    app = create_app(ServerSettings(model="fake"), loader=loader)
    with TestClient(app) as client:
        r = client.get("/healthz")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        busy = client.post("/v1/caption", json={"image": "aGk="})
        assert busy.status_code == 503 and busy.headers["retry-after"] and "loading" in busy.json()["error"]["message"]
        release.set()
        for _ in range(100):
            if client.get("/healthz").status_code == 200:
                break
            time.sleep(0.02)
        assert client.get("/healthz").json()["status"] == "ok"


def test_healthz_reports_failed_load() -> None:
    seen: list[BaseException] = []

    def loader():
        raise RuntimeError("no such checkpoint")

    app = create_app(ServerSettings(model="fake"), loader=loader, on_load_error=seen.append)
    with TestClient(app) as client:
        for _ in range(100):
            if seen:
                break
            time.sleep(0.02)
        r = client.get("/healthz")
        assert r.status_code == 503 and "no such checkpoint" in r.json()["error"]
    assert isinstance(seen[0], RuntimeError)


# ---- remote URLs ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, public",
    [
        ("93.184.216.34", True),
        ("2606:2800:220:1:248:1893:25c8:1946", True),
        ("127.0.0.1", False),
        ("::1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),
        ("fe80::1", False),
        ("224.0.0.1", False),
        ("239.1.1.1", False),
        ("0.0.0.0", False),
        ("100.64.0.1", False),
        ("240.0.0.1", False),
        ("::ffff:127.0.0.1", False),
        ("fc00::1", False),
        ("not-an-ip", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert img.is_public(address) is public


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.jpg",
        "gopher://x",
        "http://",
        "http://127.0.0.1/a.jpg",
        "http://localhost:8000/a.jpg",
        "http://[::1]/a.jpg",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.5/a.jpg",
    ],
)
def test_check_url_refuses(url: str) -> None:
    with pytest.raises(ApiError) as e:
        img.check_url(url)
    assert e.value.status == 400


def test_check_url_refuses_a_name_with_any_private_address() -> None:
    with pytest.raises(ApiError, match="non-public"):
        img.check_url("http://mixed.example/a.jpg", resolver=lambda h, p: ["93.184.216.34", "10.0.0.1"])
    assert img.check_url("http://ok.example/a.jpg", resolver=lambda h, p: ["93.184.216.34"]).host == "ok.example"


@pytest.fixture
def local_http(images: dict[str, Path]):
    body = images["rgb"].read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://rebind.example:{httpd.server_address[1]}/cat.jpg", httpd.server_address[1]
    httpd.shutdown()


def test_fetch_checks_the_connected_address(local_http, monkeypatch) -> None:
    """DNS rebinding: the check sees a public address, the connection goes to loopback; refused."""
    url, port = local_http
    real = img.socket.getaddrinfo
    monkeypatch.setattr(
        img.socket,
        "getaddrinfo",
        lambda host, *a, **k: real("127.0.0.1", *a, **k) if host == "rebind.example" else real(host, *a, **k),
    )
    with pytest.raises(ApiError, match="connected to non-public address 127.0.0.1"):
        img.fetch(url, 1_000_000, 5.0, resolver=lambda h, p: ["93.184.216.34"])


def test_fetch_size_limit(local_http, monkeypatch) -> None:
    url, port = local_http
    monkeypatch.setattr(img, "is_public", lambda address: True)  # let loopback through to reach the size check
    real = img.socket.getaddrinfo
    monkeypatch.setattr(img.socket, "getaddrinfo", lambda host, *a, **k: real("127.0.0.1", *a, **k))
    assert img.fetch(url, 1_000_000, 5.0)[:2] == b"\xff\xd8"
    with pytest.raises(ApiError, match="more than the limit 100"):
        img.fetch(url, 100, 5.0)
