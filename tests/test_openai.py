"""The service in its ecosystem, against real ``textgen serve`` subprocesses on 127.0.0.1: the
OpenAI-compatible routes driven by the official ``openai`` client, API keys, Prometheus metrics,
and the graceful drain on SIGTERM."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.generator import Generator
from tests.test_http import Server, sse_events, start_server, wait_for

KEYS = ("key-one", "key-two")
FILE_KEY = "key-from-a-file"
MODEL = "alice-small"


@pytest.fixture(scope="module")
def gen(small_onnx) -> Generator:
    return Generator.load(small_onnx)


@pytest.fixture(scope="module")
def keyed(small_onnx, tmp_path_factory):
    """Two keys from the flag, one from a file; 8 rows, n <= 4, max_tokens <= 1,000,000."""
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text(f"# the Secret's file\n{FILE_KEY}\n\n")
    s = start_server(small_onnx, "--api-key", ",".join(KEYS), "--api-key-file", str(key_file), "--max-rows", "8",
                     "--max-n", "4", "--max-chars-cap", "1000000", "--stream-interval-ms", "10", "--model-name", MODEL)
    yield s
    s.stop()


def sdk(server: Server, key: str = KEYS[0]) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key=key, max_retries=0, timeout=60)


def auth(key: str = KEYS[1]) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_models_and_a_plain_completion_equal_generate(keyed, gen):
    client = sdk(keyed)
    (model,) = client.models.list().data
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "textgen")
    assert client.models.retrieve(MODEL).id == MODEL
    out = client.completions.create(model=MODEL, prompt="alice was ", max_tokens=200, temperature=0.8, seed=3)
    assert out.object == "text_completion" and out.model == MODEL and out.id.startswith("cmpl-")
    (c,) = out.choices
    assert (c.index, c.finish_reason, c.logprobs) == (0, "length", None)
    assert c.text == gen.generate("alice was ", max_chars=200, temperature=0.8, seed=3)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (10, 200, 210)
    native = httpx.post(keyed.url("/v1/generate"), headers=auth(), timeout=30,
                        json={"prompt": "alice was ", "max_chars": 200, "temperature": 0.8, "seed": 3})
    assert native.json()["choices"][0]["text"] == c.text
    again = client.completions.create(model=MODEL, prompt="alice was ", max_tokens=200, temperature=0.8, seed=3)
    assert again.choices[0].text == c.text  # same seed, same text


def test_without_a_seed_the_server_says_which_it_used(keyed, gen):
    raw = sdk(keyed).completions.with_raw_response.create(model=MODEL, prompt="alice", max_tokens=50)
    seed = int(raw.headers["x-textgen-seed"])
    assert raw.parse().choices[0].text == gen.generate("alice", max_chars=50, temperature=1.0, seed=seed)


def test_stream_in_openai_chunks(keyed, gen):
    chunks = list(sdk(keyed).completions.create(model=MODEL, prompt="the queen ", max_tokens=300, seed=7,
                                                temperature=0.7, extra_body={"top_k": 20}, stream=True,
                                                stream_options={"include_usage": True}))
    texts = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert texts == gen.generate("the queen ", max_chars=300, seed=7, temperature=0.7, top_k=20)
    assert len(chunks) > 3 and all(ch.object == "text_completion" and ch.model == MODEL for ch in chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 300
    with httpx.stream("POST", keyed.url("/v1/completions"), headers=auth(), timeout=30,
                      json={"prompt": "alice", "max_tokens": 20, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and json.loads(lines[0][5:])["choices"][0]["index"] == 0


def test_n_and_a_list_prompt_index_and_seed_choices(keyed, gen):
    prompts = ["alice ", "the hatter "]
    for stream in (False, True):
        out = sdk(keyed).completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=120, seed=11,
                                            temperature=0.9, stream=stream)
        texts = [""] * 4
        for ch in (out if stream else [out]):
            for c in ch.choices:
                texts[c.index] += c.text
        # choice k = i * n + j: sample j of prompt i, seed 11 + k
        assert texts == [gen.generate(prompts[k // 2], max_chars=120, temperature=0.9, seed=11 + k)
                         for k in range(4)]
    native = httpx.post(keyed.url("/v1/generate"), headers=auth(), timeout=30, json={
        "prompt": prompts[1], "n": 2, "max_chars": 120, "temperature": 0.9, "seed": 11 + 2}).json()
    assert [c["text"] for c in native["choices"]] == texts[2:]


def test_stop_strings_end_choices(keyed, gen):
    out = sdk(keyed).completions.create(model=MODEL, prompt="alice", max_tokens=400, seed=2, stop=["e", "\n"])
    (c,) = out.choices
    assert c.finish_reason == "stop" and c.text == gen.generate("alice", max_chars=400, seed=2, temperature=1.0,
                                                                  stop=["e", "\n"])


@pytest.mark.parametrize("fields, param", [
    ({"logprobs": 1}, "logprobs"), ({"echo": True}, "echo"), ({"best_of": 3}, "best_of"),
    ({"suffix": "x"}, "suffix"), ({"logit_bias": {"5": 1}}, "logit_bias"), ({"presence_penalty": 0.5},
                                                                            "presence_penalty"),
    ({"frequency_penalty": -1}, "frequency_penalty"), ({"max_tokens": 1_000_001}, "max_tokens"),
    ({"temperature": -1}, "temperature"), ({"n": 5}, "n"), ({"prompt": ["a", "b", "c"], "n": 2}, "n"),
    ({"prompt": "ä€"}, "prompt"), ({"prompt": []}, "prompt"), ({"stop": ["x"] * 9}, "stop"),
])
def test_what_the_model_cannot_do_is_refused_by_name(keyed, fields, param):
    body = {"model": MODEL, "prompt": "alice", **fields}
    with pytest.raises(openai.BadRequestError) as e:
        sdk(keyed).completions.create(**body)
    assert e.value.status_code == 400 and e.value.body["param"] == param and param in e.value.message
    assert e.value.body["type"] == "invalid_request_error"


def test_other_errors_in_openai_shape(keyed):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        sdk(keyed).completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="unknown field"):
        sdk(keyed).completions.create(model=MODEL, prompt="a", extra_body={"temprature": 1})
    r = httpx.post(keyed.url("/v1/completions"), headers={**auth(), "Content-Type": "application/json"},
                   content=b"{not json", timeout=10)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_api_keys(keyed):
    for key in (*KEYS, FILE_KEY):
        assert sdk(keyed, key).models.list().data[0].id == MODEL
    for bad in ("nope", KEYS[0] + "x", KEYS[0][:-1]):
        with pytest.raises(openai.AuthenticationError, match="a valid API key is required") as e:
            sdk(keyed, bad).completions.create(model=MODEL, prompt="a")
        assert e.value.body["code"] == "invalid_api_key"
    answers = [httpx.post(keyed.url("/v1/generate"), json={}, headers=h, timeout=10)
               for h in ({}, {"Authorization": KEYS[0]}, {"Authorization": f"Basic {KEYS[0]}"}, auth("nope"))]
    assert {r.status_code for r in answers} == {401} and len({r.text for r in answers}) == 1
    assert answers[0].headers["www-authenticate"] == "Bearer" and answers[0].json()["fields"] == []
    for path in ("/healthz", "/readyz", "/metrics"):  # probes and Prometheus need no key
        assert httpx.get(keyed.url(path), timeout=10).status_code == 200
    for path in ("/v1/stats", "/v1/model", "/openapi.json", "/v1/models"):
        assert httpx.get(keyed.url(path), timeout=10).status_code == 401


def test_a_full_server_is_a_rate_limit_error(keyed):
    with httpx.Client(timeout=30, headers=auth()) as client:
        with client.stream("POST", keyed.url("/v1/completions"),
                           json={"prompt": "alice", "max_tokens": 1_000_000, "n": 4, "stream": True}) as a, \
                client.stream("POST", keyed.url("/v1/generate"),
                              json={"prompt": "alice", "max_chars": 1_000_000, "n": 4, "stream": True}) as b:
            assert a.status_code == b.status_code == 200
            lines, events = a.iter_lines(), sse_events(b)  # kept: a dropped iterator closes its response
            next(lines), next(events)
            with pytest.raises(openai.RateLimitError, match="8 of its 8 rows are in flight") as e:
                sdk(keyed).completions.create(model=MODEL, prompt="a")
            assert e.value.response.headers["retry-after"] == "1" and e.value.body["code"] == "rate_limit_exceeded"
    assert wait_for(lambda: client_stats(keyed)["rows_in_flight"] == 0)
    rejected = scrape(keyed)["textgen_rejections"]
    assert value(rejected, "textgen_rejections_total", status="429", reason="rows") >= 1


def client_stats(server: Server) -> dict:
    return httpx.get(server.url("/v1/stats"), headers=auth(), timeout=10).json()


def scrape(server: Server) -> dict[str, list]:
    text = httpx.get(server.url("/metrics"), timeout=10).text
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def test_metrics_in_prometheus_text_format(keyed):
    sdk(keyed).completions.create(model=MODEL, prompt="alice", max_tokens=50, seed=1, stream=True).close()
    list(sdk(keyed).completions.create(model=MODEL, prompt="alice", max_tokens=50, seed=1, stream=True))
    with pytest.raises(openai.AuthenticationError):
        sdk(keyed, "nope").models.list()
    m, stats = scrape(keyed), client_stats(keyed)
    requests = m["textgen_http_requests"]
    assert value(requests, "textgen_http_requests_total", route="/v1/completions", status="200") >= 2
    assert value(requests, "textgen_http_requests_total", route="/v1/models", status="401") >= 1
    assert value(m["textgen_http_request_duration_seconds"], "textgen_http_request_duration_seconds_count",
                 route="/v1/completions") >= 2
    assert value(m["textgen_time_to_first_char_seconds"], "textgen_time_to_first_char_seconds_count",
                 route="/v1/completions") >= 1
    assert value(m["textgen_chars_generated"], "textgen_chars_generated_total") >= stats["chars_generated"] > 0
    assert value(m["textgen_engine_steps"], "textgen_engine_steps_total") >= stats["steps"]
    assert value(m["textgen_engine_row_steps"], "textgen_engine_row_steps_total") >= stats["steps"]
    assert value(m["textgen_max_rows"], "textgen_max_rows") == 8
    assert {"textgen_rows_in_flight", "textgen_rows_decoding", "textgen_prefill_chars_queued",
            "textgen_engine_requests", "textgen_rejections"} <= m.keys()


# ---------------------------------------------------------------------------------------------
# Graceful drain


def read_stream(server: Server, route: str, body: dict, out: dict) -> None:
    """One stream read to its end into ``out``: its status, text, data lines and end time."""
    out["data"], text = [], ""
    try:
        with httpx.stream("POST", server.url(route), json={**body, "stream": True}, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data:"):
                    out["data"].append(data := line[5:].strip())
                    out["started"] = True
                    event = {} if data == "[DONE]" else json.loads(data)
                    text += event.get("text", "") + "".join(c["text"] for c in event.get("choices", [])
                                                            if "text" in c)
    except httpx.HTTPError as e:
        out["data"].append(f"{type(e).__name__}: {e}")
    out.update(text=text, ended=time.monotonic())


def run_streams(server: Server, streams: list[tuple[str, dict]]) -> tuple[list[dict], list[threading.Thread]]:
    """Threads reading ``streams`` ((route, body)), once every one has sent its first event."""
    outs: list[dict] = [{} for _ in streams]
    threads = [threading.Thread(target=read_stream, args=(server, route, body, out), daemon=True)
               for (route, body), out in zip(streams, outs)]
    for t in threads:
        t.start()
    assert wait_for(lambda: all(o.get("started") for o in outs), timeout=20)
    return outs, threads


def chars_per_s_at_8(server: Server) -> float:
    t0 = time.monotonic()
    httpx.post(server.url("/v1/generate"), json={"prompt": "alice", "max_chars": 500, "n": 8, "seed": 1}, timeout=60)
    return 500 / (time.monotonic() - t0)


def test_sigterm_drains_running_streams_then_exits_0(small_onnx, gen):
    s = start_server(small_onnx, "--max-chars-cap", "1000000", "--drain-seconds", "20", "--stream-interval-ms", "20")
    try:
        chars = int(chars_per_s_at_8(s) * 3)  # about 3 s each: they outlast the SIGTERM
        streams = [("/v1/generate", {"prompt": "alice", "max_chars": chars, "seed": i}) if i % 2 else
                   ("/v1/completions", {"prompt": "alice", "max_tokens": chars, "seed": i, "temperature": 0.8})
                   for i in range(8)]
        outs, threads = run_streams(s, streams)
        sigterm = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(s.url("/readyz"), timeout=5).status_code == 503, timeout=3)
        refused = httpx.post(s.url("/v1/generate"), json={"prompt": "a", "max_chars": 5}, timeout=5)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]
        with pytest.raises(openai.InternalServerError, match="shutting down"):
            sdk(s, "no keys here").completions.create(model="small", prompt="a")
        for t in threads:
            t.join(30)
        assert s.proc.wait(30) == 0
        for (route, body), out in zip(streams, outs):
            assert out["status"] == 200, out
            assert out["text"] == gen.generate("alice", max_chars=chars, seed=body["seed"], temperature=0.8)
            last = out["data"][-1]
            assert last == "[DONE]" if route == "/v1/completions" else json.loads(last)["usage"]["generated_chars"]
        assert min(o["ended"] for o in outs) > sigterm + 0.5  # they were running when the signal came
        assert time.monotonic() - sigterm < 20
        log = "".join(s.log)
        assert "draining" in log and "Traceback" not in log
    finally:
        s.stop()


def test_the_drain_deadline_ends_streams_with_a_last_event(small_onnx):
    s = start_server(small_onnx, "--max-chars-cap", "1000000", "--drain-seconds", "1")
    try:
        outs, threads = run_streams(s, [("/v1/generate", {"prompt": "alice", "max_chars": 1_000_000}),
                                        ("/v1/completions", {"prompt": "alice", "max_tokens": 1_000_000})])
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(15)
        assert s.proc.wait(15) == 0 and time.monotonic() - t0 < 8
        assert "drain deadline (1 s) passed" in json.loads(outs[0]["data"][-1])["error"]
        *_, error, done = outs[1]["data"]
        assert done == "[DONE]" and "drain deadline (1 s) passed" in json.loads(error)["error"]["message"]
    finally:
        s.stop()


def test_api_key_settings_and_the_open_port_warning(tmp_path, capsys):
    from serve.auth import key_matches
    from serve.cli import _warn_if_open
    from serve.settings import ServeSettings
    from textgen.errors import TextgenError

    (tmp_path / "k").write_text("a\n# comment\n b \n")
    assert ServeSettings(api_key=" x, y ,", api_key_file=str(tmp_path / "k")).api_keys() == ("x", "y", "a", "b")
    assert ServeSettings().api_keys() == () and "s3cret" not in repr(ServeSettings(api_key="s3cret"))
    with pytest.raises(TextgenError, match="cannot read the API key file .*missing"):
        ServeSettings(api_key_file=str(tmp_path / "missing")).api_keys()
    assert key_matches(b"b", [b"a", b"b"]) and not key_matches(b"c", [b"a", b"b"]) and not key_matches(b"a", [])
    _warn_if_open("127.0.0.1", ())
    _warn_if_open("0.0.0.0", ("k",))
    assert capsys.readouterr().err == ""
    _warn_if_open("0.0.0.0", ())
    assert "without API keys" in capsys.readouterr().err
