"""HTTP load benchmark: concurrent streaming clients against a real ``textgen serve``, one JSON line
per result.

    python -m bench.http_load --model runs/default/model.onnx
    python -m bench.http_load --model M --phases 8,32,32 --requests 20 --max-chars 500 --time-limit 120
    python -m bench.http_load --model M --client httpx --skip-batch --server-arg=--stream-interval-ms=20
    python -m bench.http_load --model M --hol      # head-of-line: a short stream behind 40 long prompts
    python -m bench.http_load --model M --route completions --scrape-metrics 1
    python -m bench.http_load --model M --compare --skip-batch   # /v1/generate vs /v1/completions vs + /metrics

The server runs as a subprocess on 127.0.0.1 (a free port); the clients are streams of one
``aiohttp.ClientSession`` (or ``httpx.AsyncClient`` with ``--client httpx``) in this process, each
sending its requests one after another (``stream: true``, parsing the Server-Sent Events). Printed:

  batch_in_process  ``Generator.generate_batch`` of 64 streams, one thread (bench/generation.py's
                    figure), measured here first, while nothing else runs: the reference
  server            the command line, its RSS once loaded
  phase             per number of concurrent clients: requests, errors and HTTP statuses, time to
                    first character (request sent -> first ``delta`` event) p50/p99, request time
                    p50/p99, characters/s over the phase, CPU per character of the server process
                    and of the clients (this process), the server's RSS after it
  summary           the goals: TTFC p99 <= 100 ms at 8 streams; throughput with the most clients
                    (the mean of those phases) >= 50% of batch_in_process; zero errors and zero 5xx
                    (every phase stays within the server's in-flight limit); the server's RSS once
                    loaded and after each phase, and its growth between the last two equal phases

``--route completions`` sends the same load through the OpenAI-compatible route (``max_tokens``,
``data:`` chunks, ``[DONE]``); ``--scrape-metrics S`` GETs /metrics every S seconds during each
phase (a ``scrapes`` count and their p99 in the phase line). ``--compare`` runs the phases on one
server for each variant (``generate``, ``completions``, ``completions`` with /metrics scraped every
second), ``--compare-rounds`` times in turn, and prints a ``compare_summary``: completions' chars/s
within 10% of generate's, completions' first character p99 <= 100 ms at 8 streams, zero 5xx, and
the scrape's cost to the request-time and first-character p99 (goal <= 2%, the medians of the
rounds).

``--hol`` measures head-of-line blocking instead: ``--hol-long`` streams (40) with prompts of
``--hol-prompt-chars`` (10,000) characters are admitted, then, while their prompts are still being
consumed (the server's ``--max-queued-prefill-chars`` raised to admit them all, unless given with
``--server-arg``), ``--hol-short`` (3) short streams (20-character prompts) are sent one after another; one
``hol`` line per short stream (its time to first character, the long ones still queued), one
``hol_idle`` line (the same request on the idle server, first) and a ``hol_summary`` with the goal
(first character within 0.5 s).

The machine is shared by the server, the clients and whatever else runs: the clients' own CPU
(SSE parsing in Python) is part of what is measured, as it would be on one box.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench import generation

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "runs" / "default" / "model.onnx"
GOALS = {"ttfc_p99_ms_at_8": 100.0, "throughput_vs_batch": 0.5}
COMPARE_GOALS = {"completions_vs_generate_chars_per_s": 0.9, "ttfc_p99_ms_at_8": 100.0, "scrape_p99_cost": 0.02}
VARIANTS = {"generate": ("generate", None), "completions": ("completions", None),
            "completions_scraped": ("completions", 1.0)}
HOL_GOAL_MS = 500.0  # a short stream's first character with long prompts queued
SAMPLING = generation.SAMPLING  # the in-process reference's settings


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


EVENT_END = re.compile(rb"\r?\n\r?\n")


def parse_event(block: bytes) -> tuple[str | None, str]:
    """One Server-Sent Event (its lines without the blank line) -> (event name, data)."""
    event, data = None, []
    for line in block.decode().splitlines():
        if line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    return event, "\n".join(data)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# The reference: in-process batch


def batch_in_process(model: Path, streams: int, chars: int) -> dict:
    from serve import Generator

    gen = Generator.load(model, num_threads=1)
    return {**generation.batch(gen, streams, chars, threads=1), "bench": "batch_in_process"}


# ---------------------------------------------------------------------------------------------
# Server


def start_server(model: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    argv = [str(Path(sys.executable).parent / "textgen"), "serve", str(model), "--port", str(port),
            "--max-rows", str(args.max_rows), "--log-level", "warning", *args.server_arg]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.argv = argv  # type: ignore[attr-defined]
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def wait_ready(client, base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{proc.stderr.read()[-3000:]}")
        try:
            if (await client.get(f"{base}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"server not ready after {timeout} s")


# ---------------------------------------------------------------------------------------------
# Clients


def request_body(route: str, prompt: str, chars: int, seed: int, sampling: dict) -> dict:
    """A streaming request of ``chars`` characters in the route's words."""
    size = {"max_chars": chars} if route == "generate" else {"max_tokens": chars}
    return {"prompt": prompt, **size, "stream": True, "seed": seed, **sampling}


def chars_of(event: str | None, data: str, result: dict) -> int:
    """Characters of one event of either route's stream (errors into ``result``)."""
    if event == "delta":
        return len(json.loads(data)["text"])
    if event == "error":
        result["errors"].append(data)
    elif event is None and data and data != "[DONE]":
        chunk = json.loads(data)
        if "error" in chunk:
            result["errors"].append(data)
        return sum(len(c["text"]) for c in chunk.get("choices", ()))
    return 0


async def one_request(client: Client, body: dict, result: dict) -> None:
    """One streaming request; records status, TTFC, chars and the request time into ``result``."""
    t0 = time.perf_counter()
    first = None
    chars = 0
    async with client.post(body) as (status, chunks):
        result["statuses"][status] = result["statuses"].get(status, 0) + 1
        if status != 200:
            text = b"".join([c async for c in chunks]).decode(errors="replace")
            result["errors"].append(f"HTTP {status}: {text[:200]}")
            return
        buffer = b""
        async for chunk in chunks:  # events split by hand: a line iterator costs more
            buffer += chunk
            *events, buffer = EVENT_END.split(buffer)
            for block in events:
                made = chars_of(*parse_event(block), result)
                if made and first is None:
                    first = time.perf_counter() - t0
                chars += made
    elapsed = time.perf_counter() - t0
    if first is not None:
        result["ttfc"].append(first)
    result["latency"].append(elapsed)
    result["chars"] += chars
    wanted = body.get("max_chars", body.get("max_tokens"))
    if chars != wanted:
        result["errors"].append(f"short stream: {chars} of {wanted} characters")


class Client:
    """POST /v1/generate (or /v1/completions) with aiohttp (a C HTTP parser: little client CPU per
    character) or httpx (pure-Python h11: several times more, which on a small box takes CPU from
    the server it measures; bench/RESULTS.md)."""

    def __init__(self, kind: str, base: str, connections: int, route: str = "generate") -> None:
        self.kind, self.url = kind, f"{base}/v1/{route}"
        if kind == "aiohttp":
            import aiohttp

            self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections),
                                                 timeout=aiohttp.ClientTimeout(total=120))
        else:
            import httpx

            self.session = httpx.AsyncClient(limits=httpx.Limits(max_connections=connections,
                                                                 max_keepalive_connections=connections),
                                             timeout=httpx.Timeout(120.0))

    @contextlib.asynccontextmanager
    async def post(self, body: dict):
        """-> (status, async iterator of body chunks)"""
        if self.kind == "aiohttp":
            async with self.session.post(self.url, json=body) as response:
                yield response.status, response.content.iter_any()
        else:
            async with self.session.stream("POST", self.url, json=body) as response:
                yield response.status_code, response.aiter_raw()

    async def close(self) -> None:
        await (self.session.close() if self.kind == "aiohttp" else self.session.aclose())


async def client_loop(client: Client, index: int, args: argparse.Namespace, deadline: float,
                      result: dict) -> None:
    for i in range(args.requests):
        if time.monotonic() > deadline:
            result["cut_by_time_limit"] = True
            return
        body = request_body(args.route, args.prompt, args.max_chars, index * 100_000 + i, SAMPLING)
        try:
            await one_request(client, body, result)
        except Exception as e:  # noqa: BLE001 - every failure is counted, none stops the bench
            result["errors"].append(f"{type(e).__name__}: {e}")


async def phase(base: str, proc: subprocess.Popen, clients: int, args: argparse.Namespace) -> dict:
    import httpx

    result = {"statuses": {}, "errors": [], "ttfc": [], "latency": [], "chars": 0, "cut_by_time_limit": False}
    client = Client(args.client, base, clients + 4, args.route)
    scrapes: list[float] = []
    stop = asyncio.Event()
    scraping = asyncio.ensure_future(scraper(base, args.scrape_metrics, stop, scrapes))
    try:
        t0 = time.perf_counter()
        server_cpu0, client_cpu0 = cpu_s(proc.pid), own_cpu_s()
        deadline = time.monotonic() + args.time_limit
        await asyncio.gather(*(client_loop(client, c, args, deadline, result) for c in range(clients)))
        wall = time.perf_counter() - t0
        server_cpu, client_cpu = cpu_s(proc.pid) - server_cpu0, own_cpu_s() - client_cpu0
    finally:
        stop.set()
        await scraping
        await client.close()
    async with httpx.AsyncClient(timeout=10) as http:
        stats = (await http.get(f"{base}/v1/stats")).json()
    ms = lambda v: None if v is None else round(1000 * v, 2)  # noqa: E731
    fives = sum(n for status, n in result["statuses"].items() if status >= 500)
    return {
        "bench": "phase", "client": args.client, "route": args.route, "scrape_metrics_s": args.scrape_metrics,
        "scrapes": len(scrapes), "scrape_ms_p99": ms(percentile(scrapes, 99)),
        "clients": clients, "requests": sum(result["statuses"].values()),
        "statuses": {str(k): v for k, v in sorted(result["statuses"].items())}, "errors": len(result["errors"]),
        "first_errors": result["errors"][:5], "http_5xx": fives, "cut_by_time_limit": result["cut_by_time_limit"],
        "ttfc_ms_p50": ms(percentile(result["ttfc"], 50)), "ttfc_ms_p99": ms(percentile(result["ttfc"], 99)),
        "ttfc_ms_max": ms(max(result["ttfc"], default=None)),
        "request_s_p50": percentile(result["latency"], 50), "request_s_p99": percentile(result["latency"], 99),
        "chars": result["chars"], "wall_s": round(wall, 3), "chars_per_s": round(result["chars"] / wall, 1),
        "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
        "server_cpu_us_per_char": round(1e6 * server_cpu / max(result["chars"], 1), 1),
        "client_cpu_us_per_char": round(1e6 * client_cpu / max(result["chars"], 1), 1),
        "server_rss_mb": round(rss_mb(proc.pid), 1), "server_rows_in_flight_after": stats["rows_in_flight"],
    }


async def scraper(base: str, interval: float | None, stop: asyncio.Event, seconds: list[float]) -> None:
    """GET /metrics every ``interval`` seconds until ``stop`` (nothing without an interval)."""
    import httpx

    if not interval:
        return
    async with httpx.AsyncClient(timeout=10) as http:
        while not stop.is_set():
            t0 = time.perf_counter()
            r = await http.get(f"{base}/metrics")
            r.raise_for_status()
            seconds.append(time.perf_counter() - t0)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)


async def warm_up(base: str, args: argparse.Namespace) -> None:
    """The first requests pay for lazy allocations: a few short ones on each route."""
    for route in ("generate", "completions"):
        client = Client(args.client, base, 8, route)
        try:
            warm = {"statuses": {}, "errors": [], "ttfc": [], "latency": [], "chars": 0}
            await asyncio.gather(*(one_request(client, request_body(route, args.prompt, 50, i, {}), warm)
                                   for i in range(4)))
        finally:
            await client.close()


async def run_load(model: Path, args: argparse.Namespace) -> tuple[dict, list[dict]]:
    import httpx

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, args)
    phases = []
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await wait_ready(http, base, proc)
        await warm_up(base, args)
        server = {"bench": "server", "argv": proc.argv[1:], "port": port,  # type: ignore[attr-defined]
                  "rss_mb_loaded": round(rss_mb(proc.pid), 1)}
        emit(server)
        for variant in plan(args):
            for clients in args.phases:
                if clients > args.max_rows:
                    raise SystemExit(f"--phases {clients} is above the server's --max-rows {args.max_rows}: "
                                     "requests would be refused (429); raise --max-rows")
                p = {**await phase(base, proc, clients, args), **({"variant": variant} if variant else {})}
                emit(p)
                phases.append(p)
    finally:
        stop_server(proc)
    return server, phases


def plan(args: argparse.Namespace):
    """The variants to run in turn (``--compare``: each ``--compare-rounds`` times), setting
    ``args.route`` and ``args.scrape_metrics`` for each; [None]: the options as given."""
    if not args.compare:
        yield None
        return
    for _ in range(args.compare_rounds):
        for name, (route, scrape) in VARIANTS.items():
            args.route, args.scrape_metrics = route, scrape
            yield name


def compare_summary(phases: list[dict]) -> dict:
    """The --compare goals from the phase lines (medians over rounds; chars/s: the mean)."""
    import statistics

    def of(variant: str, key: str, clients: int | None = None, agg=statistics.median) -> float | None:
        values = [p[key] for p in phases if p.get("variant") == variant and p[key] is not None
                  and (clients is None or p["clients"] == clients)]
        return agg(values) if values else None

    most = max(p["clients"] for p in phases)
    gen, comp = of("generate", "chars_per_s", most, statistics.mean), of("completions", "chars_per_s", most,
                                                                        statistics.mean)
    ratio = None if not gen or comp is None else round(comp / gen, 3)
    ttfc8 = of("completions", "ttfc_ms_p99", 8)
    cost = {key: None if not of("completions", key, most) else round(
        of("completions_scraped", key, most) / of("completions", key, most) - 1, 4)
        for key in ("request_s_p99", "ttfc_ms_p99")}
    fives = sum(p["http_5xx"] for p in phases)
    g = COMPARE_GOALS
    return {"bench": "compare_summary", "clients": most, "generate_chars_per_s": gen, "completions_chars_per_s": comp,
            "completions_vs_generate": ratio, "completions_ttfc_ms_p99_at_8": ttfc8,
            "generate_ttfc_ms_p99_at_8": of("generate", "ttfc_ms_p99", 8), "scrape_cost_request_s_p99":
            cost["request_s_p99"], "scrape_cost_ttfc_ms_p99": cost["ttfc_ms_p99"], "http_5xx": fives,
            "errors": sum(p["errors"] for p in phases), "goals": g,
            "meets_goal": {"chars_per_s": ratio is not None and ratio >= g["completions_vs_generate_chars_per_s"],
                           "ttfc_at_8": ttfc8 is not None and ttfc8 <= g["ttfc_p99_ms_at_8"], "zero_5xx": fives == 0,
                           "scrape_cost": cost["request_s_p99"] is not None
                           and cost["request_s_p99"] <= g["scrape_p99_cost"]}}


# ---------------------------------------------------------------------------------------------
# Head-of-line blocking


async def first_char_ms(client: Client, body: dict) -> tuple[int, float | None]:
    """(status, ms to the first ``delta``) of one streaming request, read to its end."""
    t0, first, buffer = time.perf_counter(), None, b""
    async with client.post({**body, "stream": True}) as (status, chunks):
        async for chunk in chunks:
            buffer += chunk
            if first is None and b"event: delta" in buffer:
                first = round(1000 * (time.perf_counter() - t0), 1)
    return status, first


async def hol_load(base: str, args: argparse.Namespace) -> list[dict]:
    """The short streams' lines, sent while ``--hol-long`` long prompts are admitted and queued."""
    import httpx

    long_body = {"prompt": (args.prompt * args.hol_prompt_chars)[: args.hol_prompt_chars], "max_chars": 20, "seed": 1}
    short_body = {"prompt": (args.prompt * 20)[:20], "max_chars": 20, "seed": 2}
    client = Client(args.client, base, args.hol_long + 4)
    lines = []
    try:
        status, idle = await first_char_ms(client, short_body)
        lines.append({"bench": "hol_idle", "status": status, "first_char_ms": idle})
        longs = [asyncio.ensure_future(first_char_ms(client, {**long_body, "seed": i})) for i in range(args.hol_long)]
        async with httpx.AsyncClient(timeout=10) as http:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(t.done() for t in longs):
                stats = (await http.get(f"{base}/v1/stats")).json()
                if stats["requests_total"] >= args.hol_long + 1:
                    break
                await asyncio.sleep(0.005)
            for i in range(args.hol_short):
                queued = (await http.get(f"{base}/v1/stats")).json().get("prefill_chars_queued")
                status, ms = await first_char_ms(client, {**short_body, "seed": 10 + i})
                lines.append({"bench": "hol", "long_prompts": args.hol_long, "long_prompt_chars": args.hol_prompt_chars,
                              "short_prompt_chars": 20, "status": status, "first_char_ms": ms,
                              "prefill_chars_queued_before": queued})
        done = await asyncio.wait_for(asyncio.gather(*longs, return_exceptions=True), args.time_limit)
        statuses: dict[str, int] = {}
        for r in done:
            key = str(r[0]) if isinstance(r, tuple) else type(r).__name__
            statuses[key] = statuses.get(key, 0) + 1
        lines.append({"bench": "hol_long", "statuses": statuses})
    finally:
        await client.close()
    return lines


async def run_hol(model: Path, args: argparse.Namespace) -> list[dict]:
    import httpx

    port = args.port or free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_server(model, port, args)
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            await wait_ready(http, base, proc)
        return await hol_load(base, args)
    finally:
        stop_server(proc)


def hol_main(args: argparse.Namespace) -> int:
    if not any(a.startswith("--max-queued-prefill-chars") for a in args.server_arg):  # every long prompt admitted
        args.server_arg += [f"--max-queued-prefill-chars={args.hol_long * args.hol_prompt_chars}"]
    if not any(a.startswith("--max-prompt-chars") for a in args.server_arg):
        args.server_arg += [f"--max-prompt-chars={max(args.hol_prompt_chars, 20)}"]
    emit({"bench": "hol_server", "server_args": args.server_arg})
    lines = asyncio.run(run_hol(args.model, args))
    for line in lines:
        emit(line)
    short = [x["first_char_ms"] for x in lines if x["bench"] == "hol"]
    worst = None if None in short or not short else max(short)
    emit({"bench": "hol_summary", "first_char_ms_max": worst, "goal_ms": HOL_GOAL_MS,
          "meets_goal": worst is not None and worst <= HOL_GOAL_MS})
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="exported model (default: %(default)s)")
    p.add_argument("--phases", default="8,32,32",
                   help="concurrent streaming clients per phase, comma-separated; repeat the last to see whether "
                        "the server's RSS grows between equal phases (default: %(default)s)")
    p.add_argument("--requests", type=int, default=20, help="requests per client (default: %(default)s)")
    p.add_argument("--max-chars", type=int, default=500, help="characters per request (default: %(default)s)")
    p.add_argument("--prompt", default="alice was ", help="prompt of every request (default: %(default)r)")
    p.add_argument("--time-limit", type=float, default=120, help="seconds per phase; clients stop starting "
                                                                 "requests after it (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=64, help="the server's in-flight limit (default: %(default)s)")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--client", choices=("aiohttp", "httpx"), default="aiohttp",
                   help="HTTP client library of the load (default: %(default)s; see Client)")
    p.add_argument("--batch-streams", type=int, default=64, help="rows of the in-process reference (default: 64)")
    p.add_argument("--batch-chars", type=int, default=1000,
                   help="characters per row of the reference (default: %(default)s)")
    p.add_argument("--skip-batch", action="store_true", help="do not measure the in-process reference")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for `textgen serve` (repeat; e.g. --server-arg=--stream-interval-ms=10)")
    p.add_argument("--route", choices=("generate", "completions"), default="generate",
                   help="the route of the load: /v1/generate or the OpenAI-compatible /v1/completions "
                        "(default: %(default)s)")
    p.add_argument("--scrape-metrics", type=float, metavar="S",
                   help="GET /metrics every S seconds during each phase (default: no scraping)")
    p.add_argument("--compare", action="store_true",
                   help="run the phases for generate, completions and completions scraped every second, in turn "
                        "(see above); a compare_summary line at the end")
    p.add_argument("--compare-rounds", type=int, default=2, help="rounds of --compare (default: %(default)s)")
    p.add_argument("--hol", action="store_true", help="measure head-of-line blocking instead (see above)")
    p.add_argument("--hol-long", type=int, default=40, help="long-prompt streams of --hol (default: %(default)s)")
    p.add_argument("--hol-prompt-chars", type=int, default=10_000,
                   help="characters of each long prompt (default: %(default)s)")
    p.add_argument("--hol-short", type=int, default=3, help="short streams measured (default: %(default)s)")
    args = p.parse_args(argv)
    args.phases = [int(x) for x in args.phases.split(",") if x.strip()]
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}: train and export one, or pass --model")
    if args.client == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        raise SystemExit("aiohttp is not installed (pip install aiohttp, or use --client httpx)")
    if args.hol:
        return hol_main(args)

    reference = None
    if not args.skip_batch:
        reference = batch_in_process(args.model, args.batch_streams, args.batch_chars)
        emit(reference)
    server, phases = asyncio.run(run_load(args.model, args))
    if args.compare:
        emit(compare_summary(phases))
        return 0
    at8 = next((ph for ph in phases if ph["clients"] == 8), None)
    most = max(ph["clients"] for ph in phases)
    throughput = sum(ph["chars_per_s"] for ph in phases if ph["clients"] == most) / sum(
        ph["clients"] == most for ph in phases)  # the mean of the phases with the most clients
    ratio = None if reference is None else throughput / reference["chars_per_s"]
    same = [ph for ph in phases if ph["clients"] == phases[-1]["clients"]]
    summary = {
        "bench": "summary",
        "errors": sum(ph["errors"] for ph in phases), "http_5xx": sum(ph["http_5xx"] for ph in phases),
        "ttfc_ms_p99_at_8": at8 and at8["ttfc_ms_p99"],
        "throughput_chars_per_s": round(throughput, 1), "throughput_clients": most,
        "batch_in_process_chars_per_s": reference and round(reference["chars_per_s"], 1),
        "throughput_vs_batch": None if ratio is None else round(ratio, 3),
        "server_rss_mb_loaded": server["rss_mb_loaded"],
        "server_rss_mb_after_phases": [ph["server_rss_mb"] for ph in phases],
        "server_rss_growth_mb_between_equal_phases": (
            round(same[-1]["server_rss_mb"] - same[-2]["server_rss_mb"], 1) if len(same) > 1 else None),
        "goals": GOALS,
    }
    summary["meets_goal"] = (
        summary["errors"] == 0 and summary["http_5xx"] == 0
        and (at8 is None or at8["ttfc_ms_p99"] is not None and at8["ttfc_ms_p99"] <= GOALS["ttfc_p99_ms_at_8"])
        and (ratio is None or ratio >= GOALS["throughput_vs_batch"])
    )
    emit(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
