"""The HTTP service against real servers: ``textgen serve`` subprocesses on 127.0.0.1 (a free port,
read from uvicorn's log), driven with httpx; the small model trained once per session
(``small_onnx``). Also the batching engine in-process (its rows equal ``Generator.generate``
with mixed per-row parameters, arrivals and chunk sizes) and the service's settings.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from serve import GeneratorError
from serve.generator import Generator

REPO = Path(__file__).resolve().parents[1]
TRAINING_STACK = ("tensorflow", "keras", "tf2onnx", "ray")
TEXTGEN_BOTTOM = ("textgen", "textgen.contract", "textgen.errors", "textgen.text")  # stdlib + numpy


# ---------------------------------------------------------------------------------------------
# Servers


@dataclass
class Server:
    proc: subprocess.Popen
    base: str
    log: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base + path

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(model: Path, *flags: str, env: dict[str, str] | None = None, timeout: float = 60) -> Server:
    """``textgen serve MODEL --port 0 FLAGS`` in a subprocess; returns once uvicorn listens."""
    argv = [sys.executable, "-m", "textgen.cli", "serve", str(model), "--port", "0", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    log: list[str] = []
    port: list[int] = []
    listening = threading.Event()

    def drain() -> None:  # keep reading: a full pipe would block the server
        for line in proc.stderr:
            log.append(line)
            m = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", line)
            if m:
                port.append(int(m.group(1)))
                listening.set()
        listening.set()

    threading.Thread(target=drain, daemon=True).start()
    if not listening.wait(timeout) or not port:
        proc.kill()
        pytest.fail(f"textgen serve did not start:\n{''.join(log)}")
    return Server(proc, f"http://127.0.0.1:{port[0]}", log)


@pytest.fixture(scope="module")
def server(small_onnx):
    """Caps small enough to test: max_chars 2,000, 16 rows, n <= 4, prompts <= 300 (from the env);
    /docs and /redoc served."""
    s = start_server(small_onnx, "--max-chars-cap", "2000", "--max-rows", "16", "--max-n", "4",
                     "--stream-interval-ms", "10", "--docs", env={"TEXTGEN_MAX_PROMPT_CHARS": "300"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tiny(small_onnx):
    """Two rows in flight, and generations long enough (a million characters) to interrupt."""
    s = start_server(small_onnx, "--max-rows", "2", "--max-chars-cap", "1000000", "--retry-after-s", "3")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def gen(small_onnx) -> Generator:
    return Generator.load(small_onnx)


@pytest.fixture
def client():
    with httpx.Client(timeout=30) as c:
        yield c


def post(client: httpx.Client, server: Server, **body) -> httpx.Response:
    return client.post(server.url("/v1/generate"), json=body)


def sse_events(response: httpx.Response):
    """(event, data) of a Server-Sent Events response, as they arrive."""
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if event is not None or data:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def stream(client: httpx.Client, server: Server, **body) -> tuple[list[str], list[tuple[str, dict]]]:
    """The texts of a streamed request (joined deltas, per sample) and all its events."""
    events = []
    with client.stream("POST", server.url("/v1/generate"), json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r))
    texts = [""] * body.get("n", 1)
    for event, data in events:
        if event == "delta":
            texts[data["index"]] += data["text"]
    return texts, events


def stats(client: httpx.Client, server: Server) -> dict:
    return client.get(server.url("/v1/stats")).json()


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------
# Routes


def test_health_ready_model_stats_and_openapi(server, client, small_onnx, gen):
    assert client.get(server.url("/healthz")).json() == {"status": "ok"}
    ready = client.get(server.url("/readyz"))
    assert ready.status_code == 200 and ready.json()["ready"] is True and ready.json()["max_rows"] == 16
    model = client.get(server.url("/v1/model")).json()
    info = gen.model.info
    assert model["file"] == small_onnx.name and len(model["sha256"]) == 64
    assert model["vocab_size"] == 45 and model["vocab"] == list(info.vocab) and model["lowercase"] is True
    assert model["model_config"]["seq_len"] == 32 and model["metrics"]["val_loss"] == info.metrics["val_loss"]
    assert model["limits"] == {"max_chars_cap": 2000, "max_prompt_chars": 300, "max_n": 4, "max_rows": 16,
                               "max_body_bytes": 1 << 20}
    s = stats(client, server)
    assert {"rows_in_flight", "rows_decoding", "steps", "chars_generated", "requests_cancelled"} <= s.keys()
    schema = client.get(server.url("/openapi.json")).json()
    assert {"/v1/generate", "/healthz", "/readyz", "/v1/model", "/v1/stats"} <= schema["paths"].keys()
    request = schema["components"]["schemas"]["GenerateRequest"]
    assert request["additionalProperties"] is False
    assert request["properties"]["max_chars"]["maximum"] == 2000 and request["properties"]["n"]["maximum"] == 4
    assert request["properties"]["top_p"]["exclusiveMinimum"] == 0 and request["properties"]["prompt"]["description"]
    assert "429" in schema["paths"]["/v1/generate"]["post"]["responses"]
    assert client.get(server.url("/docs")).status_code == 200
    assert client.get(server.url("/redoc")).status_code == 200


def test_generate_equals_the_generator_for_the_same_seed(server, client, gen):
    cases = [
        dict(prompt="alice was ", max_chars=300, seed=1),
        dict(prompt="The Queen ", max_chars=200, seed=7, temperature=1.2, top_k=10),
        dict(prompt="", max_chars=150, seed=3, top_p=0.8, stop=["\n"]),
        dict(prompt="alice", max_chars=100, temperature=0),
        dict(prompt="she said ", max_chars=400, seed=11, stop=["the", "."], temperature=0.9, top_k=30, top_p=0.95),
    ]
    for body in cases:
        r = post(client, server, **body)
        assert r.status_code == 200, r.text
        out = r.json()
        (choice,) = out["choices"]
        kwargs = {k: v for k, v in body.items() if k != "prompt"}
        expected = gen.generate(body["prompt"], **kwargs)
        assert choice["text"] == expected, body
        assert choice["chars"] == len(expected)
        assert choice["finish_reason"] == ("length" if len(expected) == body["max_chars"] else "stop")
        assert out["usage"] == {"prompt_chars": max(1, len(body["prompt"])), "generated_chars": len(expected)}
        assert out["seed"] == body.get("seed") and out["id"].startswith("gen-")
    first, again = (post(client, server, prompt="alice", max_chars=50, seed=5).json() for _ in range(2))
    assert first["choices"] == again["choices"] and first["id"] != again["id"]


def test_n_samples_are_seed_plus_i(server, client, gen):
    body = dict(prompt="alice ", max_chars=120, seed=20, n=3, temperature=0.9, stop=["!"])
    out = post(client, server, **body).json()
    texts = [c["text"] for c in out["choices"]]
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    assert texts == [gen.generate("alice ", max_chars=120, seed=20 + i, temperature=0.9, stop=["!"]) for i in range(3)]
    assert len(set(texts)) == 3
    assert out["usage"]["generated_chars"] == sum(map(len, texts))


def test_without_a_seed_the_server_picks_and_returns_one(server, client, gen):
    out = post(client, server, prompt="alice ", max_chars=80).json()
    seed = out["seed"]
    assert isinstance(seed, int) and seed >= 0
    assert out["choices"][0]["text"] == gen.generate("alice ", max_chars=80, seed=seed)
    assert post(client, server, prompt="alice", max_chars=10, temperature=0).json()["seed"] is None


def test_stream_sends_the_same_text_as_it_is_made(server, client, gen):
    body = dict(prompt="alice was ", max_chars=600, seed=4, n=2, stop=["queen"])
    texts, events = stream(client, server, **body)
    assert texts == [gen.generate("alice was ", max_chars=600, seed=4 + i, stop=["queen"]) for i in range(2)]
    kinds = [e for e, _ in events]
    assert kinds[-1] == "done" and kinds.count("finish") == 2 and set(kinds) == {"delta", "finish", "done"}
    assert kinds.count("delta") > 2  # in pieces, not all at the end
    for index in range(2):  # a sample's finish comes after its last delta
        last_delta = max(i for i, (e, d) in enumerate(events) if e == "delta" and d["index"] == index)
        finish = next(i for i, (e, d) in enumerate(events) if e == "finish" and d["index"] == index)
        assert last_delta < finish and events[finish][1]["chars"] == len(texts[index])
    done = events[-1][1]
    assert done["seed"] == 4 and done["usage"]["generated_chars"] == sum(map(len, texts))
    assert all("text" not in c for c in done["choices"])
    # Nothing that may start a stop string is sent early: no delta ever ends inside "queen".
    greedy, _ = stream(client, server, prompt="the ", max_chars=300, temperature=0, stop=["the"])
    assert greedy == [gen.generate("the ", max_chars=300, temperature=0, stop=["the"])]


def test_unknown_character_policies(server, client, gen):
    r = post(client, server, prompt="alicé costs 5€", max_chars=10)
    assert r.status_code == 422
    assert r.json()["fields"] == ["prompt"]
    assert "unknown characters in prompt: '5', 'é', '€'" in r.json()["error"] and '"skip"' in r.json()["error"]
    skip = post(client, server, prompt="alicé€", max_chars=40, seed=1, unknown="skip").json()
    assert skip["choices"][0]["text"] == gen.generate("alic", max_chars=40, seed=1)
    replace = post(client, server, prompt="alicé", max_chars=40, seed=1, unknown="replace", replacement="e").json()
    assert replace["choices"][0]["text"] == gen.generate("alice", max_chars=40, seed=1)
    bad = post(client, server, prompt="é", unknown="replace", replacement="#")
    assert bad.status_code == 422 and bad.json()["fields"] == ["replacement"]


# ---------------------------------------------------------------------------------------------
# Refused requests


def test_bad_json_and_bodies_that_are_not_json_objects(server, client):
    url = server.url("/v1/generate")
    bad = client.post(url, content=b'{"prompt": "a",', headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    for content in (b"[1, 2]", b'"alice"', b""):
        r = client.post(url, content=content, headers={"content-type": "application/json"})
        assert r.status_code == 422 and "one JSON object" in r.json()["error"], content
    form = client.post(url, content=b'{"prompt": "a"}', headers={"content-type": "text/plain"})
    assert form.status_code == 415 and "application/json" in form.json()["error"]


@pytest.mark.parametrize(
    "body, field, needle",
    [
        ({"max_chars": "5"}, "max_chars", "valid integer"),
        ({"max_chars": 2.5}, "max_chars", "valid integer"),
        ({"temperature": "hot"}, "temperature", "valid number"),
        ({"top_k": True}, "top_k", "valid integer"),
        ({"seed": "1"}, "seed", "valid integer"),
        ({"n": None}, "n", "valid integer"),
        ({"stream": "yes"}, "stream", "valid boolean"),
        ({"prompt": 5}, "prompt", "valid string"),
        ({"stop": 5}, "stop", "a string or a list"),
        ({"unknown": "ignore"}, "unknown", "'error', 'skip' or 'replace'"),
        ({"max_chars": 0}, "max_chars", "greater than or equal to 1"),
        ({"max_chars": 2001}, "max_chars", "less than or equal to 2000, got 2001 (this server's cap is max_chars_cap)"),
        ({"temperature": -0.5}, "temperature", "greater than or equal to 0"),
        ({"temperature": 1000}, "temperature", "less than or equal to 100"),
        ({"top_k": -1}, "top_k", "greater than or equal to 0"),
        ({"top_p": 0}, "top_p", "greater than 0"),
        ({"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ({"seed": -1}, "seed", "greater than or equal to 0"),
        ({"n": 0}, "n", "greater than or equal to 1"),
        ({"n": 5}, "n", "less than or equal to 4"),
        ({"stop": ["a", ""]}, "stop", "each of 1 to 64 characters"),
        ({"stop": ["x"] * 9}, "stop", "at most 8 strings"),
        ({"stop": "y" * 65}, "stop", "each of 1 to 64 characters"),
        ({"replacement": "ab"}, "replacement", "at most 1 character"),
        ({"prompt": "a" * 301}, "prompt", "at most 300 characters, got \"aaa"),
        ({"prompt": "a" * 301}, "prompt", "(this server's limit is max_prompt_chars)"),
        ({"max_char": 100}, "max_char", "unknown field (known: max_chars, n, prompt"),
    ],
)
def test_each_bad_field_is_named(server, client, body, field, needle):
    r = post(client, server, **body)
    assert r.status_code == 422, r.text
    out = r.json()
    assert out["fields"] == [field] and out["error"].startswith(f"{field}") and needle in out["error"], out


def test_several_bad_fields_are_all_named(server, client):
    out = post(client, server, temperature=-1, top_p=2, n=0).json()
    assert out["fields"] == ["temperature", "top_p", "n"]
    assert all(f"{f}:" in out["error"] for f in out["fields"])


def test_a_body_over_the_limit_gets_413(server, client):
    big = json.dumps({"prompt": "a" * ((1 << 20) + 10)}).encode()
    url = server.url("/v1/generate")
    r = client.post(url, content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "1,048,576 bytes" in r.json()["error"]

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 65536):
            yield big[i : i + 65536]

    r = client.post(url, content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]
    assert client.get(server.url("/healthz")).status_code == 200


# ---------------------------------------------------------------------------------------------
# Limits, cancellation, liveness under load


def open_stream(client: httpx.Client, server: Server, **body):
    """A streaming request left open: (response context, its event iterator) after the first delta."""
    context = client.stream("POST", server.url("/v1/generate"), json={**body, "stream": True})
    response = context.__enter__()
    assert response.status_code == 200, response.read()
    events = sse_events(response)
    assert next(events)[0] == "delta"
    return context, events


def test_in_flight_limit_answers_429_with_retry_after_then_frees(tiny, client):
    context, _ = open_stream(client, tiny, prompt="alice", max_chars=1_000_000, n=2, seed=1)
    try:
        assert stats(client, tiny)["rows_in_flight"] == 2
        busy = post(client, tiny, prompt="alice", max_chars=10)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "3"
        assert "2 of its 2 rows are in flight" in busy.json()["error"]
        assert client.get(tiny.url("/healthz")).status_code == 200
    finally:
        context.__exit__(None, None, None)  # the client goes away
    assert wait_for(lambda: stats(client, tiny)["rows_in_flight"] == 0)
    assert post(client, tiny, prompt="alice", max_chars=10).status_code == 200
    too_many = post(client, tiny, prompt="alice", max_chars=10, n=3)  # more rows than the server has
    assert too_many.status_code == 422 and too_many.json()["fields"] == ["n"]


def test_a_client_that_disconnects_mid_stream_stops_its_generation(tiny, client):
    before = stats(client, tiny)
    context, events = open_stream(client, tiny, prompt="alice", max_chars=1_000_000, seed=2)
    for _ in range(3):
        next(events)
    during = stats(client, tiny)
    assert during["rows_decoding"] == 1 and during["steps"] > before["steps"]
    context.__exit__(None, None, None)
    t0 = time.monotonic()
    assert wait_for(lambda: stats(client, tiny)["rows_decoding"] == 0, timeout=2.0), stats(client, tiny)
    assert time.monotonic() - t0 < 2.0
    after = stats(client, tiny)
    assert after["rows_in_flight"] == 0 and after["requests_cancelled"] == before["requests_cancelled"] + 1
    time.sleep(0.2)
    assert stats(client, tiny)["steps"] == after["steps"]  # nothing runs any more


def test_a_client_that_disconnects_while_waiting_for_json_stops_its_generation(tiny, client):
    before = stats(client, tiny)
    with pytest.raises(httpx.ReadTimeout):
        client.post(tiny.url("/v1/generate"), json={"prompt": "alice", "max_chars": 1_000_000}, timeout=0.5)
    assert wait_for(lambda: stats(client, tiny)["rows_in_flight"] == 0, timeout=3.0), stats(client, tiny)
    assert stats(client, tiny)["requests_cancelled"] == before["requests_cancelled"] + 1


def test_health_answers_quickly_while_a_long_generation_runs(tiny, client):
    context, events = open_stream(client, tiny, prompt="alice", max_chars=1_000_000, seed=3)
    try:
        latencies = []
        with httpx.Client(timeout=5) as probe:
            for _ in range(20):
                next(events)  # the generation is running
                t0 = time.perf_counter()
                assert probe.get(tiny.url("/healthz")).status_code == 200
                latencies.append(time.perf_counter() - t0)
                assert probe.get(tiny.url("/readyz")).status_code == 200
        assert max(latencies) < 0.25, latencies
    finally:
        context.__exit__(None, None, None)
    assert wait_for(lambda: stats(client, tiny)["rows_in_flight"] == 0)


def test_shutdown_ends_streams_cleanly_and_exits(small_onnx, client):
    s = start_server(small_onnx, "--max-chars-cap", "1000000", "--drain-seconds", "0")  # no drain: tests/test_openai.py
    try:
        context, events = open_stream(client, s, prompt="alice", max_chars=1_000_000, seed=4)
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        rest = list(events)  # ends: the response is complete, not cut
        context.__exit__(None, None, None)
        assert rest[-1][0] == "error" and "shutting down" in rest[-1][1]["error"]
        assert s.proc.wait(15) in (0, -signal.SIGTERM)
        assert time.monotonic() - t0 < 10
        log = "".join(s.log)
        assert "Application shutdown complete" in log and "Traceback" not in log
    finally:
        s.stop()


def test_several_worker_processes(small_onnx, client, gen):
    s = start_server(small_onnx, "--workers", "2", env={"TEXTGEN_MAX_CHARS_CAP": "77"})
    try:
        def ready():
            try:
                return client.get(s.url("/readyz")).status_code == 200
            except httpx.TransportError:
                return False

        assert wait_for(ready, timeout=30)
        assert post(client, s, prompt="alice", max_chars=50, seed=1).json()["choices"][0]["text"] == gen.generate(
            "alice", max_chars=50, seed=1)
        assert post(client, s, max_chars=78).json()["fields"] == ["max_chars"]  # the env reached the workers
    finally:
        s.stop()


def test_serve_refuses_a_bad_model_or_setting(tmp_path):
    from tests.conftest import run_cli

    code, _, err = run_cli(["serve", str(tmp_path / "missing.onnx")])
    assert code == 2 and "does not exist" in err
    code, _, err = run_cli(["serve", str(tmp_path / "missing.onnx"), "--max-rows", "0"])
    assert code == 2 and "max_rows (--max-rows, TEXTGEN_MAX_ROWS) must be an integer >= 1" in err
    code, _, err = run_cli(["serve", str(tmp_path / "missing.onnx"), "--stream-interval-ms", "nan"])
    assert code == 2 and "stream_interval_ms (--stream-interval-ms, TEXTGEN_STREAM_INTERVAL_MS) must be a number" in err


# ---------------------------------------------------------------------------------------------
# The engine in-process, the per-row sampler, the settings


@pytest.mark.parametrize("chunk_size, stagger_s", [(16, 0.0), (3, 0.002), (40, 0.001)])
def test_engine_rows_equal_the_generator_whatever_shares_the_batch(gen, chunk_size, stagger_s):
    """Requests with different parameters, a long prompt (consumed in chunks), one-character
    prompts, greedy rows and a stop string made by the last allowed character run concurrently,
    arriving together or one after another, with several chunk sizes; every row is exactly its
    ``Generator.generate``."""
    from serve.engine import PREFILL_CHUNK, Delta, End, Engine, Finish
    from serve.settings import ServeSettings

    full = gen.generate("the ", max_chars=200, seed=12)
    n = next(n for n in range(40, 200) if full[n - 2 : n] not in full[: n - 1])

    long_prompt = ("alice was beginning to get very tired of sitting by her sister on the bank, " * 6)[:PREFILL_CHUNK * 3 + 5]
    cases = [
        ("alice was ", dict(max_chars=300, seed=1), True),
        ("", dict(max_chars=200, seed=2, temperature=1.0, top_k=5), False),
        ("the queen " * 3, dict(max_chars=250, seed=3, top_p=0.9, stop=["the", "\n"]), True),
        ("alice", dict(max_chars=100, temperature=0), True),
        ("alice", dict(max_chars=120, seed=7, n=3, temperature=0.9, top_k=20, stop=[".", "!"]), False),
        (long_prompt, dict(max_chars=150, seed=9, temperature=1.3, top_p=0.5), True),
        ("she ", dict(max_chars=5, seed=10, stop="e"), True),
        ("a", dict(max_chars=70, seed=11, n=2), True),
        ("the ", dict(max_chars=n, seed=12, stop=[full[n - 2 : n]]), False),
    ]

    async def run(engine, i, prompt, kwargs, streaming):
        await asyncio.sleep(i * stagger_s)
        request = engine.prepare(prompt, engine.params(**kwargs), stream=streaming)
        ticket = engine.submit(request)
        texts, reasons = [""] * request.n, [None] * request.n
        while True:
            event = await ticket.next()
            if isinstance(event, Delta):
                texts[event.index] += event.text
            elif isinstance(event, Finish):
                reasons[event.index] = event.reason
                if event.text is not None:
                    texts[event.index] = event.text
            else:
                assert isinstance(event, End) and event.error is None
                return request, texts, reasons

    async def main():
        engine = Engine(gen, ServeSettings(stream_interval_ms=1, chunk_size=chunk_size)).start()
        try:
            return await asyncio.gather(*(run(engine, i, *case) for i, case in enumerate(cases))), engine.stats()
        finally:
            engine.close()

    results, final = asyncio.run(main())
    for (prompt, kwargs, _), (request, texts, reasons) in zip(cases, results):
        others = {k: v for k, v in kwargs.items() if k not in ("n", "seed")}
        for i, text in enumerate(texts):
            seed = None if request.seed is None else request.seed + i
            expected = gen.generate(prompt, seed=seed, **others)
            assert text == expected, (prompt[:20], kwargs, i)
            assert reasons[i] == ("length" if len(expected) == kwargs["max_chars"] else "stop")
    assert final["rows_in_flight"] == 0 and final["requests_completed"] == len(cases)
    assert results[-1][1] == [full[: n - 2]]  # the stop string is removed


def test_an_engine_failure_ends_its_requests_and_refuses_new_ones(gen):
    from serve.engine import End, Engine, EngineClosed

    class BrokenModel:
        def __getattr__(self, name):
            return getattr(gen.model, name)

        def chunk(self, *args):
            raise RuntimeError("boom")

    async def main():
        engine = Engine(gen).start()
        engine._batch.model = BrokenModel()  # fails at the first chunk call
        try:
            ticket = engine.submit(engine.prepare("alice", engine.params(max_chars=10, seed=1)))
            event = await asyncio.wait_for(ticket.next(), 10)
            assert isinstance(event, End) and event.error == "the generation engine failed: RuntimeError: boom"
            assert not engine.alive and engine.stats()["error"] == event.error
            assert engine.stats()["rows_in_flight"] == 0
            with pytest.raises(EngineClosed, match="boom"):
                engine.submit(engine.prepare("alice", engine.params(max_chars=10)))
        finally:
            engine.close()

    asyncio.run(main())


def test_settings_from_flags_env_and_defaults():
    from serve.settings import ServeSettings

    assert ServeSettings.from_env({}) == ServeSettings()
    s = ServeSettings.from_env({"TEXTGEN_MAX_ROWS": "8", "TEXTGEN_STREAM_INTERVAL_MS": "5.5"}, max_n=2)
    assert (s.max_rows, s.stream_interval_ms, s.max_n) == (8, 5.5, 2)
    assert ServeSettings(max_rows=3, max_n=16).n_cap == 3
    with pytest.raises(GeneratorError, match="TEXTGEN_MAX_ROWS='many' is not an integer"):
        ServeSettings.from_env({"TEXTGEN_MAX_ROWS": "many"})
    with pytest.raises(GeneratorError, match=r"max_body_bytes \(--max-body-bytes, TEXTGEN_MAX_BODY_BYTES\)"):
        ServeSettings(max_body_bytes=10)


def test_serving_modules_import_no_training_stack_and_the_generator_no_web_stack(small_onnx, tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        import serve.engine
        web = sorted(m for m in ("fastapi", "starlette", "uvicorn", "sse_starlette") if m in sys.modules)
        import serve.http
        app = serve.http.create_app({str(small_onnx)!r})
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({TRAINING_STACK!r}))
        loaded += sorted(m for m in sys.modules if m.startswith("textgen.") and m not in {TEXTGEN_BOTTOM!r})
        print(json.dumps({{"web": web, "training": loaded}}))
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"web": [], "training": []}
