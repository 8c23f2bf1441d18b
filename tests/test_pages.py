"""The browser pages in headless Chromium (Playwright, the system browser): ``textgen serve``'s
page at ``/`` streams from the HTTP API, ``js/index.html`` runs the model in the browser with the JS
generator; both show exactly what the Python generator makes for the same settings and seed."""

from __future__ import annotations

import shutil
import urllib.request
from pathlib import Path

import pytest

from bench.pages import CHROMIUM, JS, browser, run_page, static_server, textgen_server
from serve.generator import Generator

pytest.importorskip("playwright")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists() or not shutil.which("node"),
                                reason=f"needs {CHROMIUM} (make browser) and node")


@pytest.fixture(scope="module")
def chromium():
    with browser() as b:
        yield b


def test_the_server_page_streams_what_the_generator_makes(small_onnx, chromium):
    fields = {"prompt": "the queen ", "temperature": 0.9, "top_p": 0.9, "seed": 4, "stop": "!", "max_chars": 250}
    expected = Generator.load(small_onnx).generate("the queen ", max_chars=250, temperature=0.9, top_p=0.9,
                                                   seed=4, stop=["!"])
    with textgen_server(small_onnx) as base:
        with urllib.request.urlopen(base + "/") as r:
            assert r.headers["Content-Type"].startswith("text/html")
        result = run_page(chromium, base + "/", fields)
    assert result["text"] == expected and len(expected) > 0


@pytest.mark.skipif(not (JS / "node_modules" / "onnxruntime-web").is_dir(), reason="js/node_modules: make js")
def test_the_static_page_runs_the_model_in_the_browser(small_onnx, chromium, tmp_path):
    fields = {"prompt": "alice was ", "temperature": 0.8, "top_k": 20, "top_p": 0.95, "seed": 9, "max_chars": 200}
    expected = Generator.load(small_onnx).generate("alice was ", max_chars=200, temperature=0.8, top_k=20,
                                                   top_p=0.95, seed=9)
    with static_server(small_onnx, tmp_path) as url:
        result = run_page(chromium, url, fields)
        greedy = run_page(chromium, url, {"prompt": "", "temperature": 0, "seed": "", "max_chars": 120})
    assert result["text"] == expected
    assert greedy["text"] == Generator.load(small_onnx).generate("", max_chars=120, temperature=0)
