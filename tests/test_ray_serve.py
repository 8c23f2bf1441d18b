"""The Ray Serve application (serve/ray_serve.py) on a real local Ray: the same routes as
``textgen serve`` (/v1/generate, the OpenAI routes, /metrics), reached over HTTP through Ray
Serve's proxy on a free port."""

from __future__ import annotations

import json
import os
import socket

import httpx
import pytest

from serve import GeneratorError
from serve.generator import Generator

pytestmark = pytest.mark.slow

RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve_url(small_onnx):
    """The app of ``app_builder`` deployed on a local Ray; Serve and Ray are shut down even when
    deployment or a test fails."""
    saved = {k: os.environ.get(k) for k in RAY_ENV}
    os.environ.update(RAY_ENV)
    import ray
    from ray import serve

    from serve.ray_serve import app_builder

    ray.init(include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = app_builder({"model_path": str(small_onnx), "max_replicas": "1", "max_chars_cap": "3000"})
        serve.run(app, name="textgen", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_ray_serve_app_serves_the_same_routes(ray_serve_url, small_onnx):
    gen = Generator.load(small_onnx)
    with httpx.Client(base_url=ray_serve_url, timeout=60) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json()["ready"] is True
        model = client.get("/v1/model").json()
        assert model["vocab_size"] == 45 and model["limits"]["max_chars_cap"] == 3000

        out = client.post("/v1/generate", json={"prompt": "alice was ", "max_chars": 200, "seed": 3, "n": 2}).json()
        assert [c["text"] for c in out["choices"]] == [
            gen.generate("alice was ", max_chars=200, seed=3 + i) for i in range(2)]

        events = []
        with client.stream("POST", "/v1/generate",
                           json={"prompt": "alice", "max_chars": 300, "seed": 5, "stream": True}) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    events.append((event, json.loads(line[5:])))
        text = "".join(d["text"] for e, d in events if e == "delta")
        assert text == gen.generate("alice", max_chars=300, seed=5)
        assert events[-1][0] == "done" and events[-1][1]["usage"]["generated_chars"] == 300

        bad = client.post("/v1/generate", json={"max_chars": 3001})
        assert bad.status_code == 422 and bad.json()["fields"] == ["max_chars"]


def test_ray_serve_app_serves_the_openai_routes_and_metrics(ray_serve_url, small_onnx):
    import openai

    gen = Generator.load(small_onnx)
    client = openai.OpenAI(base_url=f"{ray_serve_url}/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list().data] == [small_onnx.stem]
    out = client.completions.create(model=small_onnx.stem, prompt=["alice", "the "], n=2, max_tokens=100, seed=4)
    assert [c.text for c in out.choices] == [gen.generate(p, max_chars=100, temperature=1.0, seed=4 + k)
                                             for k, p in enumerate(["alice", "alice", "the ", "the "])]
    chunks = client.completions.create(model=small_onnx.stem, prompt="alice", max_tokens=200, seed=6, stream=True)
    assert "".join(ch.choices[0].text for ch in chunks) == gen.generate("alice", max_chars=200, temperature=1.0, seed=6)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=small_onnx.stem, prompt="a", logprobs=1)
    metrics = httpx.get(f"{ray_serve_url}/metrics", timeout=30)
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    assert 'textgen_http_requests_total{route="/v1/completions",status="200"}' in metrics.text
    assert "textgen_chars_generated_total" in metrics.text


def test_app_builder_checks_its_arguments(small_onnx):
    from serve.ray_serve import app_builder

    with pytest.raises(GeneratorError, match="model_path"):
        app_builder({})
    with pytest.raises(GeneratorError, match="unknown argument.*max_row"):
        app_builder({"model_path": str(small_onnx), "max_row": 3})
    with pytest.raises(GeneratorError, match="min_replicas .* is above max_replicas"):
        app_builder({"model_path": str(small_onnx), "min_replicas": 3, "max_replicas": 2})
    with pytest.raises(GeneratorError, match="max_rows"):
        app_builder({"model_path": str(small_onnx), "max_rows": 0})
