"""The two browser pages in headless Chromium (Playwright's Python client driving the system
browser, /usr/bin/chromium; never ``playwright install``): ``textgen serve``'s page at ``/``
(streams from the HTTP API) and ``js/index.html`` (the model in the browser, onnxruntime-web wasm).

    python -m bench.pages --model M [--screenshot docs/screenshot.png]

Prints one JSON line per page: load -> first character and -> the whole text (ms), the text's
length. tests/test_pages.py uses the helpers (servers, browser, ``run_page``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from bench.http_load import free_port

REPO = Path(__file__).resolve().parents[1]
JS = REPO / "js"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def _wait_for(url: str, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=2):
                return
        time.sleep(0.1)
    raise TimeoutError(url)


@contextlib.contextmanager
def _running(argv: list[str], ready_url: str, **popen) -> Iterator[None]:
    """A server subprocess until the block ends, once ``ready_url`` answers."""
    proc = subprocess.Popen(argv, **popen)
    try:
        _wait_for(ready_url, proc)
        yield
    finally:
        proc.terminate()
        proc.wait(30)


@contextlib.contextmanager
def textgen_server(model: Path) -> Iterator[str]:
    """``textgen serve MODEL`` on a free port; yields its base URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "textgen", "serve", str(model), "--port", str(port), "--log-level", "warning"]
    with _running(argv, f"{url}/readyz", cwd=REPO, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}):
        yield url


@contextlib.contextmanager
def static_server(model: Path, root: Path) -> Iterator[str]:
    """``python -m http.server`` over ``root`` holding js/index.html, js/textgen.js, onnxruntime-web's
    dist/ and the model (symbolic links); yields the page's URL."""
    dist = root / "node_modules" / "onnxruntime-web"
    dist.mkdir(parents=True, exist_ok=True)
    for link, target in ((root / "index.html", JS / "index.html"), (root / "textgen.js", JS / "textgen.js"),
                         (dist / "dist", JS / "node_modules" / "onnxruntime-web" / "dist"),
                         (root / "model.onnx", model.resolve())):
        if not link.exists():
            link.symlink_to(target)
    port = free_port()
    page = f"http://127.0.0.1:{port}/index.html"
    argv = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    with _running(argv, page, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL):
        yield page


@contextlib.contextmanager
def browser() -> Iterator:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


def run_page(b, url: str, fields: dict, screenshot: Path | None = None) -> dict:
    """Open ``url``, fill the form, generate: the text (``#out``) and, as the page measured them,
    ms from navigation to a usable form, from the click to the first character, and their sum
    (what a visitor waits for a first character when the form is sent at once)."""
    page = b.new_page()
    try:
        page.goto(url)
        page.wait_for_selector("body[data-ready-ms]", timeout=60_000)
        for name, value in fields.items():
            page.fill(f"#{name}", "" if value is None else str(value))
        page.click("#go")
        page.wait_for_selector("#out[data-done]", timeout=120_000)
        if screenshot is not None:
            page.screenshot(path=str(screenshot), full_page=True)
        text = page.eval_on_selector("#out", "e => e.textContent")
        ready = float(page.eval_on_selector("body", "e => e.dataset.readyMs"))
        first = float(page.eval_on_selector("#out", "e => e.dataset.firstMs || 'NaN'"))
        return {"text": text, "ready_ms": ready, "click_to_first_char_ms": first, "load_to_first_char_ms": ready + first}
    finally:
        page.close()


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--screenshot", type=Path, help="a screenshot of the server's page after generating")
    p.add_argument("--max-chars", type=int, default=300)
    args = p.parse_args(argv)
    fields = {"prompt": "alice was ", "temperature": 0.8, "top_p": 0.95, "seed": 1, "max_chars": args.max_chars}
    with browser() as b, tempfile.TemporaryDirectory() as tmp:
        with textgen_server(args.model) as base:
            result = run_page(b, base + "/", fields, args.screenshot)
            print(json.dumps({"bench": "page", "page": "textgen serve /", **result, "text": len(result["text"])}))
        with static_server(args.model, Path(tmp)) as url:
            result = run_page(b, url, fields)
            print(json.dumps({"bench": "page", "page": "js/index.html (wasm)", **result, "text": len(result["text"])}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
