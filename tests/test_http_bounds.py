"""What one client can hold of a real ``textgen serve`` (127.0.0.1, started and stopped here): the
request head's size and deadline, the body's deadline, the 413 a plain client reads, the open
connections, the queued prompt characters and a short prompt's wait behind long ones, the docs
pages. Every loop is bounded in count and time."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import httpx
import pytest

from serve.generator import Generator
from tests.test_http import Server, start_server, stats, wait_for


@pytest.fixture(scope="module")
def gen(small_onnx) -> Generator:
    return Generator.load(small_onnx)


@pytest.fixture(scope="module")
def bounded(small_onnx):
    """Short deadlines, few connections, the default head and body limits, no docs."""
    s = start_server(small_onnx, "--max-connections", "8", "--header-timeout-s", "1", "--body-timeout-s", "1")
    yield s
    s.stop()


def address(server: Server) -> tuple[str, int]:
    u = urlsplit(server.base)
    return u.hostname, u.port


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What the server sends until it closes (or resets) the connection, or ``timeout`` passes."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, socket.timeout):
        pass
    return b"".join(chunks)


def send(sock: socket.socket, data: bytes) -> bool:
    try:
        sock.sendall(data)
        return True
    except (BrokenPipeError, ConnectionResetError):
        return False


def status_of(response: bytes) -> int | None:
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.1 ") else None


def json_body(response: bytes) -> dict:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])


# ---------------------------------------------------------------------------------------------
# The request head


def test_a_head_over_max_header_bytes_is_refused(bounded):
    get = b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
    with socket.create_connection(address(bounded), timeout=5) as sock:
        send(sock, get + b"X-Big: " + b"a" * (32 * 1024) + b"\r\n\r\n")  # under the 64 KiB default
        assert status_of(read_all(sock)) == 200
    with socket.create_connection(address(bounded), timeout=5) as sock:
        send(sock, get + b"X-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        assert status_of(read_all(sock)) in (400, None)  # refused; a reset may hide the 400
    assert httpx.get(bounded.url("/healthz"), timeout=5).status_code == 200


def test_a_head_sent_slowly_gets_408_and_is_closed(bounded):
    with socket.create_connection(address(bounded), timeout=5) as sock:
        t0 = time.monotonic()
        assert send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n")
        for _ in range(20):  # a header line every 0.2 s: never complete
            if time.monotonic() - t0 > 4 or not send(sock, b"X-Slow: 1\r\n"):
                break
            time.sleep(0.2)
        response = read_all(sock, timeout=3)
        elapsed = time.monotonic() - t0
    assert status_of(response) == 408 and "header_timeout_s" in json_body(response)["error"]
    assert 0.9 < elapsed < 4


def test_an_idle_connection_and_a_slow_second_head_are_closed(bounded):
    with socket.create_connection(address(bounded), timeout=5) as sock:
        t0 = time.monotonic()
        assert status_of(read_all(sock, timeout=4)) == 408 and time.monotonic() - t0 < 3
    with socket.create_connection(address(bounded), timeout=5) as sock:
        assert send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")  # kept alive
        sock.settimeout(3)
        first = b""
        for _ in range(10):  # head and body may come apart
            first += sock.recv(65536)
            if first.endswith(b'{"status":"ok"}'):
                break
        assert status_of(first) == 200
        time.sleep(0.7)  # idle, under the keep-alive timeout
        t0 = time.monotonic()
        assert send(sock, b"GET /healthz HTTP/1.1\r\nHost: t\r\n")  # the next head, never finished
        response = read_all(sock, timeout=4)
    assert status_of(response) == 408 and 0.9 < time.monotonic() - t0 < 3


# ---------------------------------------------------------------------------------------------
# The body


def test_a_body_sent_slowly_gets_408(bounded):
    head = (b"POST /v1/generate HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    with socket.create_connection(address(bounded), timeout=5) as sock:
        t0 = time.monotonic()
        assert send(sock, head + b'{"prompt"')
        for _ in range(20):  # a byte every 0.2 s
            if time.monotonic() - t0 > 4 or not send(sock, b" "):
                break
            time.sleep(0.2)
        response = read_all(sock, timeout=3)
        elapsed = time.monotonic() - t0
    assert status_of(response) == 408, response[:300]
    out = json_body(response)
    assert "body_timeout_s" in out["error"] and out["fields"] == []
    assert 0.9 < elapsed < 4


def test_a_plain_client_reads_the_413_of_a_4_mib_body(bounded):
    body = json.dumps({"prompt": "a" * (4 << 20)}).encode()
    request = urllib.request.Request(bounded.url("/v1/generate"), data=body,
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code == 413
    assert "1,048,576 bytes (max_body_bytes)" in json.loads(caught.value.read())["error"]

    def chunks():  # chunked, no Content-Length: refused while it is read
        for i in range(0, len(body), 1 << 16):
            yield body[i : i + (1 << 16)]

    chunked = urllib.request.Request(bounded.url("/v1/generate"), data=chunks(),
                                     headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(chunked, timeout=10)
    assert caught.value.code == 413 and "max_body_bytes" in json.loads(caught.value.read())["error"]


# ---------------------------------------------------------------------------------------------
# Connections, docs


def test_open_connections_are_capped(bounded):
    socks = [socket.create_connection(address(bounded), timeout=5) for _ in range(7)]
    try:
        r = httpx.get(bounded.url("/healthz"), timeout=5)  # the 8th connection
        assert r.status_code == 503
        with socket.create_connection(address(bounded), timeout=5) as sock:
            socks.append(sock)
            with socket.create_connection(address(bounded), timeout=5) as extra:  # past the cap: closed at once
                t0 = time.monotonic()
                response = read_all(extra, timeout=3)
                assert status_of(response) == 503 and time.monotonic() - t0 < 0.9
                assert "max_connections" in json_body(response)["error"]
    finally:
        for sock in socks:
            sock.close()
    assert wait_for(lambda: httpx.get(bounded.url("/healthz"), timeout=5).status_code == 200, timeout=5)


def test_docs_pages_only_when_asked(bounded):  # served with --docs: tests/test_http.py
    for path in ("/docs", "/redoc"):
        assert httpx.get(bounded.url(path), timeout=5).status_code == 404
    assert "/v1/generate" in httpx.get(bounded.url("/openapi.json"), timeout=5).json()["paths"]


# ---------------------------------------------------------------------------------------------
# Queued prompt characters


def test_queued_prompt_characters_are_bounded(gen):
    from serve.engine import Engine, EngineBusy
    from serve.settings import ServeSettings

    async def main():
        engine = Engine(gen, ServeSettings(max_queued_prefill_chars=15_000))  # not started: nothing is consumed
        try:
            long = engine.prepare("alice " * 1600, engine.params(max_chars=5, seed=1))
            engine.submit(long)
            with pytest.raises(EngineBusy, match="max_queued_prefill_chars") as busy:
                engine.submit(long)
            assert busy.value.retry_after_s == 1 and "9,599 prompt characters are waiting" in str(busy.value)
            engine.submit(engine.prepare("alice was ", engine.params(max_chars=5, seed=1)))
            s = engine.stats()
            assert s["prefill_chars_queued"] == 9_599 + 9 and s["requests_rejected"] == 1
        finally:
            engine.close()

    asyncio.run(main())


@pytest.fixture(scope="module")
def hol(small_onnx):
    """Long prompts allowed, and all of 40 of them admitted at once."""
    s = start_server(small_onnx, "--max-prompt-chars", "100000", "--max-queued-prefill-chars", "4000000",
                     "--stream-interval-ms", "10")
    yield s
    s.stop()


async def first_delta(client: httpx.AsyncClient, server: Server, body: dict) -> tuple[float | None, str]:
    """(seconds to the first delta, the whole text) of a streamed request."""
    t0, first, raw = time.monotonic(), None, ""
    async with client.stream("POST", server.url("/v1/generate"), json={**body, "stream": True}) as r:
        assert r.status_code == 200, await r.aread()
        async for chunk in r.aiter_text():
            raw += chunk
            if first is None and "event: delta" in raw:
                first = time.monotonic() - t0
    text = ""
    for block in raw.replace("\r\n", "\n").split("\n\n"):
        lines = block.split("\n")
        if "event: delta" in lines:
            text += json.loads(next(x for x in lines if x.startswith("data:"))[5:])["text"]
    return first, text


async def short_behind_long(server: Server, prompt: str, admitted: int) -> tuple[float | None, str, dict]:
    """A short stream sent once 40 streams with 100,000-character prompts are admitted (the
    counter ``requests_total`` reaches ``admitted``); the long ones are cancelled after it."""
    long_prompt = ("alice was beginning to get very tired of sitting by her sister on the bank, " * 1400)[:100_000]
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=50)) as client:
        longs = [asyncio.ensure_future(client.post(server.url("/v1/generate"), json={
            "prompt": long_prompt, "max_chars": 5, "seed": i, "stream": True})) for i in range(40)]
        try:
            for _ in range(500):  # up to about 10 s for all of them to be admitted
                during = (await client.get(server.url("/v1/stats"))).json()
                if during["requests_total"] >= admitted:
                    break
                await asyncio.sleep(0.02)
            wait, text = await first_delta(client, server, {"prompt": prompt, "max_chars": 40, "seed": 5})
        finally:
            for t in longs:
                t.cancel()
            await asyncio.gather(*longs, return_exceptions=True)
    return wait, text, during


def test_a_short_prompt_is_not_stuck_behind_long_ones(hol, gen):
    prompt = "the queen said to al"
    with httpx.Client(timeout=30) as c:
        assert c.post(hol.url("/v1/generate"), json={"prompt": "alice", "max_chars": 5}).status_code == 200  # warm
        before = stats(c, hol)["requests_total"]
    wait, text, during = asyncio.run(asyncio.wait_for(short_behind_long(hol, prompt, before + 40), 60))
    assert during["requests_total"] >= before + 40 and during["rows_in_flight"] >= 30, during
    assert wait is not None and wait < 2.0, wait
    assert text == gen.generate(prompt, max_chars=40, seed=5)
    with httpx.Client(timeout=30) as c:
        assert wait_for(lambda: stats(c, hol)["rows_in_flight"] == 0, timeout=20), stats(c, hol)


# ---------------------------------------------------------------------------------------------
# The settings


def test_the_bounds_are_settings(tmp_path):
    from serve.server import uvicorn_options
    from serve.settings import ServeSettings
    from tests.conftest import run_cli

    s = ServeSettings.from_env({"TEXTGEN_DOCS": "true", "TEXTGEN_HEADER_TIMEOUT_S": "2.5"}, max_connections=50)
    assert (s.docs, s.header_timeout_s, s.max_connections) == (True, 2.5, 50)
    assert ServeSettings.from_env({}).docs is False
    options = uvicorn_options(s)
    assert options["limit_concurrency"] == 50 and options["h11_max_incomplete_event_size"] == 64 * 1024
    assert options["http"].keywords == {"header_timeout_s": 2.5}
    code, _, err = run_cli(["serve", str(tmp_path / "missing.onnx"), "--header-timeout-s", "0"])
    assert code == 2 and "header_timeout_s (--header-timeout-s, TEXTGEN_HEADER_TIMEOUT_S) must be a number >= 0.1" in err
    with pytest.raises(Exception, match="TEXTGEN_DOCS='maybe' is not true or false"):
        ServeSettings.from_env({"TEXTGEN_DOCS": "maybe"})
