"""The HTTP service: FastAPI routes over the batching engine (``serve/engine.py``), run by uvicorn
(``textgen serve``) or by Ray Serve (``serve/ray_serve.py``) from the same factory, ``create_app``.

Routes
    POST /v1/generate   JSON request (``GenerateRequest``) -> JSON response, or a stream of
                        Server-Sent Events when the request says ``"stream": true``
    GET  /healthz       liveness: the process answers and its engine thread runs
    GET  /readyz        readiness: the model is loaded and the engine accepts requests (503 when
                        not, e.g. while shutting down); the body holds the engine's counters
    GET  /v1/model      the model's metadata (vocabulary, settings, training metrics) and limits
    GET  /v1/stats      the engine's counters (rows in flight, steps, characters, ...)
    POST /v1/completions, GET /v1/models   OpenAI-compatible (``serve/openai_api.py``)
    GET  /metrics       Prometheus' text format (``serve/metrics.py``)
    GET  /openapi.json  the OpenAPI schema (``/docs`` and ``/redoc``, its browsers, only with the
                        ``docs`` setting: they load JavaScript from a CDN)

Streaming format: Server-Sent Events (``text/event-stream``, sse-starlette), every ``data`` one
JSON object:
    event: delta    {"index": 0, "text": "ali"}    new characters of sample ``index``, in order
    event: finish   {"index": 0, "finish_reason": "length" | "stop", "chars": 500}
    event: done     the non-streaming response without the texts (id, seed, choices, usage)
    event: error    {"error": "..."}                the server could not finish (e.g. shutdown)
Characters are sent in chunks: a sample's first character at once, then whatever accumulated
every ``stream_interval_ms`` (50 ms by default). ``: ping`` comments keep idle connections open.

Responses to /v1/generate carry ``X-Textgen-Id`` and ``X-Textgen-Seed`` (the seed used) headers.
Errors are JSON ``{"error": "<message naming the field>", "fields": [...]}``: 400 bad JSON, 408 a
body not complete within ``body_timeout_s`` of the request's head, 413 body over ``max_body_bytes``
(read and dropped first, up to ``DRAIN_FACTOR`` times that, so that the client reads the answer),
401 a missing or wrong API key (only when the server has keys: ``serve/auth.py``),
415 a body that is not JSON, 422 a field of the wrong type (the request
model: JSON shape and types only) or out of range (``serve.params``, once) or unknown prompt
characters, 429 (+ ``Retry-After``) the in-flight limit (``max_rows``) or the queued prompt
characters' (``max_queued_prefill_chars``) is reached, 503 (+ ``Retry-After``) shutting down (from
SIGTERM on, while running generations drain: ``serve.server.DrainingServer``). The OpenAI routes
answer errors in OpenAI's shape instead (``serve.openai_api``). A client that disconnects (mid-stream or
while waiting for a JSON response) cancels its generation: its rows leave the batch (the access
log shows 499, nginx's "client closed request", for a JSON request abandoned that way).
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations at runtime, and
# the request model is made per app (``request_model``), a local name.
import asyncio
import hashlib
import json
import logging
import os
import time
from contextlib import asynccontextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, create_model
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.auth import ApiKeys
from serve.engine import Delta, End, Engine, EngineBusy, EngineClosed, Finish, Request, Ticket
from serve.generator import Generator
from serve.metrics import Instrumented, Metrics
from serve.openai_api import CompletionRequest, add_openai_routes, is_openai_path, openai_error
from serve.page import add_page_route
from serve.params import (
    DEFAULT_MAX_CHARS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    MAX_SEED,
    MAX_STOP_CHARS,
    MAX_STOPS,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    UNKNOWN_POLICIES,
    ParamError,
    shown,
)
from serve.settings import ServeSettings
from serve.streaming import SHUTDOWN_GRACE_S, Farewell, disconnected

log = logging.getLogger("uvicorn.error")  # uvicorn's server log: where operators look

# An oversized body up to this many times max_body_bytes is read and dropped before the 413: a
# client still sending when the connection closes would see a reset instead of the answer.
DRAIN_FACTOR = 8
CLOSE = {"Connection": "close"}


# ---------------------------------------------------------------------------------------------
# Request and response bodies (the OpenAPI schema is made from these)


def _bounds(**schema: Any) -> dict[str, Any]:
    """JSON Schema bounds for the documentation: ``serve.params`` checks the values (once)."""
    return {"json_schema_extra": schema}


class GenerateRequestBase(BaseModel):
    """The JSON shape of a request: types only (strict, unknown fields refused). The values are
    checked by ``serve.params.SamplingParams`` against this server's limits; the bounds below are
    the same constants, for the schema."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"prompt": "alice was ", "max_chars": 200, "temperature": 0.8, "seed": 1},
        {"prompt": "the queen ", "max_chars": 500, "top_p": 0.95, "n": 2, "stop": ["\n\n"], "stream": True},
    ]})

    temperature: float = Field(
        DEFAULT_TEMPERATURE, **_bounds(minimum=0, maximum=MAX_TEMPERATURE),
        description="0 = greedy (always the most likely character, no randomness); below 1 safer, above 1 wilder.",
    )
    top_k: int = Field(DEFAULT_TOP_K, **_bounds(minimum=0, maximum=MAX_TOP_K),
                       description="Sample among the k most likely characters only (0 = off).")
    top_p: float = Field(
        DEFAULT_TOP_P, **_bounds(exclusiveMinimum=0, maximum=1),
        description="Sample among the most likely characters holding this much probability (1 = off).",
    )
    seed: int | None = Field(
        None, **_bounds(minimum=0, maximum=MAX_SEED),
        description="Fixes the text: sample i uses seed + i. Omitted: the server picks one and returns it.",
    )
    stop: str | list[str] | None = Field(
        None, **_bounds(maxItems=MAX_STOPS),
        description=f"A string or up to {MAX_STOPS} strings of 1-{MAX_STOP_CHARS} characters: a sample ends when its "
                    "text ends with one; the stop string is not included.",
    )
    stream: bool = Field(False, description="Send characters as they are made (Server-Sent Events).")
    unknown: str = Field(
        "error", **_bounds(enum=list(UNKNOWN_POLICIES)), description="Prompt characters outside the model's vocabulary: fail (422), drop them, or "
                             "replace them with `replacement`.",
    )
    replacement: str = Field(" ", **_bounds(minLength=1, maxLength=1),
                             description='The character that replaces unknown ones with "unknown": "replace".')


def request_model(settings: ServeSettings) -> type[BaseModel]:
    """``GenerateRequest`` with this server's caps in its schema."""
    return create_model(
        "GenerateRequest",
        __base__=GenerateRequestBase,
        __doc__="A generation request. Every field is optional; unknown fields are refused.",
        prompt=(str, Field("", **_bounds(maxLength=settings.max_prompt_chars),
                           description="Text to continue (not repeated in the output). Empty: start a new "
                                       "paragraph. Lowercased if the model was trained lowercased.")),
        max_chars=(int, Field(DEFAULT_MAX_CHARS, **_bounds(minimum=1, maximum=settings.max_chars_cap),
                              description="Characters to generate per sample (this server's cap: "
                                          f"{settings.max_chars_cap:,}).")),
        n=(int, Field(1, **_bounds(minimum=1, maximum=settings.n_cap),
                      description=f"Samples of the prompt (at most {settings.n_cap}); each is a row of the batch.")),
    )


class Choice(BaseModel):
    index: int = Field(description="The sample's number, 0 to n - 1.")
    text: str | None = Field(None, description="The generated text (absent from the stream's done event).")
    chars: int = Field(description="Characters generated (the stop string not counted).")
    finish_reason: Literal["length", "stop"] = Field(description="max_chars reached, or a stop string made.")


class Usage(BaseModel):
    prompt_chars: int = Field(description="Prompt characters fed to the model (after the unknown-character "
                                          "policy; 1 for an empty prompt: the start character).")
    generated_chars: int


class GenerateResponse(BaseModel):
    id: str
    seed: int | None = Field(description="The seed used (null for greedy decoding): send it again to repeat.")
    choices: list[Choice]
    usage: Usage
    elapsed_s: float


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, naming the field, and what to do.")
    fields: list[str] = Field(default_factory=list, description="The request fields at fault, if any.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "The body is not valid JSON."},
    408: {"model": ErrorResponse, "description": "The body did not arrive within the server's body_timeout_s."},
    413: {"model": ErrorResponse, "description": "The body is larger than the server's max_body_bytes."},
    415: {"model": ErrorResponse, "description": "The body is not JSON (send Content-Type: application/json)."},
    422: {"model": ErrorResponse, "description": "A field of the wrong type or out of range, an unknown field, "
                                                 "or unknown characters in the prompt."},
    429: {"model": ErrorResponse, "description": "The in-flight limit or the queued prompt characters' limit is "
                                                 "reached; see Retry-After."},
    503: {"model": ErrorResponse, "description": "The server is shutting down; see Retry-After."},
}


# ---------------------------------------------------------------------------------------------
# Errors


def error_response(status: int, message: str, fields: list[str] | None = None,
                   headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """The error body of the route at ``path``: ``{"error", "fields"}``, or OpenAI's shape."""
    if is_openai_path(path):
        return openai_error(status, message, fields[0] if fields else None, headers)
    return JSONResponse({"error": message, "fields": fields or []}, status_code=status, headers=headers)


def unauthorized(path: str, message: str) -> JSONResponse:
    return error_response(401, message, headers={"WWW-Authenticate": "Bearer"}, path=path)


def validation_response(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
    """Pydantic's errors (the body's JSON shape and types) -> one message naming every field at
    fault. The values are checked once, by ``serve.params`` (a ``ParamError``: 422 too)."""
    errors, path = exc.errors(), request.url.path
    if any(e.get("type") == "json_invalid" for e in errors):
        reason = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return error_response(400, f"the body is not valid JSON ({reason}); send one JSON object", path=path)
    if any(tuple(e.get("loc", ())) == ("body",) for e in errors):
        if isinstance(exc.body, (bytes, bytearray)):  # FastAPI parses JSON only for a JSON Content-Type
            content_type = request.headers.get("content-type") or "no Content-Type"
            return error_response(415, f"the body must be JSON with Content-Type: application/json, got {content_type}",
                                  path=path)
        return error_response(422, 'the body must be one JSON object, e.g. {"prompt": "alice was ", "max_chars": 200}',
                              path=path)
    known = request.app.state.fields_of.get(path, request.app.state.request_fields)
    messages, fields = [], []
    for e in errors:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        field = loc[0] if loc else "body"
        if field == "stop":
            message = f"stop: {request.app.state.limits.stop_rule()}"
        elif e.get("type") == "extra_forbidden":
            message = f"{field}: unknown field (known: {', '.join(known)})"
        else:
            message = f"{'.'.join(loc) or 'body'}: {e.get('msg')}"
            if e.get("type") != "missing" and "input" in e:
                message += f", got {shown(e['input'])}"
        if message not in messages:
            messages.append(message)
        if field not in fields:
            fields.append(field)
    return error_response(422, "; ".join(messages), fields, path=path)


# ---------------------------------------------------------------------------------------------
# Middleware: the body's limit and deadline


class BodyTimeout(HTTPException):
    """The body did not arrive in time: 408, and the connection is closed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(408, f"the request body did not arrive within {timeout_s:g} s of its head (body_timeout_s); "
                              "send it faster", headers=CLOSE)


class BodyDeadline:
    """``BodyTimeout`` (408) when a request's body is not complete within ``timeout_s`` of the
    request's head; reads after the body are not timed (e.g. waiting for a disconnect)."""

    def __init__(self, app: ASGIApp, timeout_s: float) -> None:
        self.app, self.timeout_s = app, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline, complete = loop.time() + self.timeout_s, False

        async def timed() -> Message:
            nonlocal complete
            if complete:
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout_s) from None
            complete = msg["type"] != "http.request" or not msg.get("more_body", False)
            return msg

        await self.app(scope, timed, send)


class BodyLimit:
    """413 for a body over ``max_bytes``: from Content-Length before the route runs, or while a
    chunked body is read (the route never sees more than ``max_bytes``). The rest of the body is
    read and dropped first (``_drain``), up to ``DRAIN_FACTOR`` x ``max_bytes`` and the body's
    deadline; past either the 413 closes the connection (the client may see a reset)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.message = f"the request body is larger than this server's limit of {max_bytes:,} bytes (max_body_bytes)"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw = dict(scope.get("headers", ())).get(b"content-length")
        if raw is not None:
            if not raw.isdigit():
                await error_response(400, "the Content-Length header is not a number", path=scope["path"])(
                    scope, receive, send)
                return
            if int(raw) > self.max_bytes:
                drained = int(raw) <= DRAIN_FACTOR * self.max_bytes and await _drain(receive, int(raw))
                await error_response(413, self.message, headers=None if drained else CLOSE, path=scope["path"])(
                    scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    rest = (DRAIN_FACTOR - 1) * self.max_bytes
                    drained = not msg.get("more_body", False) or await _drain(receive, rest)
                    raise HTTPException(413, self.message, headers=None if drained else CLOSE)
            return msg

        await self.app(scope, limited, send)


async def _drain(receive: Receive, limit: int) -> bool:
    """Read and drop the rest of a request body, up to about ``limit`` bytes: True if it ended."""
    dropped = 0
    while dropped <= limit:
        try:
            msg = await receive()
        except BodyTimeout:
            return False
        if msg["type"] != "http.request":
            return False
        dropped += len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return True
    return False


# ---------------------------------------------------------------------------------------------
# The app


class _State:
    """What the routes share: filled at startup (the lifespan), emptied at shutdown."""

    def __init__(self, settings: ServeSettings) -> None:
        self.engine: Engine | None = None
        self.model_info: dict[str, Any] = {}
        self.model_id = settings.model_name or ""  # set at startup: the file's stem by default
        self.model_created = 0
        self.metrics = Metrics(lambda: self.engine)

    def live_engine(self) -> Engine:
        if self.engine is None:
            raise EngineClosed("the model is not loaded")
        return self.engine


def create_app(
    model_path: str | Path | None = None,
    settings: ServeSettings | None = None,
    generator: Generator | None = None,
) -> FastAPI:
    """The service for one model. Give ``model_path`` (loaded at startup, with ``settings.threads``
    and the caps), or an already loaded ``generator``. The engine thread starts with the app's
    lifespan and stops with it (uvicorn and Ray Serve both run the lifespan)."""
    if (model_path is None) == (generator is None):
        raise ValueError("give model_path or generator (one of them)")
    settings = settings or ServeSettings()
    state = _State(settings)
    docs = settings.docs  # the browsers load JavaScript from a CDN: only when asked
    app = FastAPI(
        title="textgen",
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        version=_version(),
        summary="Character-level LSTM text generation (one ONNX file, onnxruntime, continuous batching).",
        lifespan=_lifespan(state, settings, model_path, generator),
    )
    GenerateRequest = request_model(settings)
    app.state.request_fields = sorted(GenerateRequest.model_fields)
    app.state.fields_of = {"/v1/completions": sorted(CompletionRequest.model_fields)}
    app.state.limits = settings.limits()
    app.state.textgen = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(BodyDeadline, timeout_s=settings.body_timeout_s)  # outside BodyLimit: its drain is timed
    keys = settings.api_keys()
    if keys:  # before the body is read; the open paths (probes, metrics) without a key
        app.add_middleware(ApiKeys, keys=keys, open_paths=settings.open_path_set(), refuse=unauthorized)
    app.add_middleware(Instrumented, metrics=state.metrics)  # outermost: 401s and 413s counted too
    _add_exception_handlers(app, state, settings)
    _add_probe_routes(app, state)
    _add_generate_route(app, state, GenerateRequest)
    add_openai_routes(app, state, settings)
    add_page_route(app)
    return app


def _version() -> str:
    try:
        return metadata.version("textgen")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _lifespan(state: _State, settings: ServeSettings, model_path: str | Path | None, generator: Generator | None):
    """Load the model (unless given) and run the engine while the app runs."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        gen = generator or Generator.load(model_path, num_threads=settings.threads,
                                          max_chars_cap=settings.max_chars_cap,
                                          max_prompt_chars=settings.max_prompt_chars)
        state.model_info = model_metadata(gen, settings)
        state.model_id = state.model_id or Path(gen.model.path).stem
        state.model_created = _created(gen)
        state.engine = Engine(gen, settings).start()
        log.info("textgen: serving %s (vocabulary %d, sha256 %s...); %s", gen.model.path, len(gen.vocab),
                 (state.model_info["sha256"] or "?")[:12], settings)
        try:
            yield
        finally:
            engine, state.engine = state.engine, None
            engine.close()

    return lifespan


def _add_exception_handlers(app: FastAPI, state: _State, settings: ServeSettings) -> None:
    """Every refusal as ``{"error", "fields"}`` JSON with its status (see the module docstring), or
    in OpenAI's shape on its routes; load and shutdown refusals counted in the metrics."""

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        return validation_response(request, exc)

    @app.exception_handler(HTTPException)
    async def _http(request: HTTPRequest, exc: HTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers, path=request.url.path)

    @app.exception_handler(ParamError)
    async def _param(request: HTTPRequest, exc: ParamError) -> JSONResponse:
        return error_response(422, exc.detail(), exc.fields, path=request.url.path)

    @app.exception_handler(EngineBusy)
    async def _busy(request: HTTPRequest, exc: EngineBusy) -> JSONResponse:
        state.metrics.rejected(429, exc.reason)
        return error_response(429, str(exc), headers={"Retry-After": str(exc.retry_after_s)}, path=request.url.path)

    @app.exception_handler(EngineClosed)
    async def _closed(request: HTTPRequest, exc: EngineClosed) -> JSONResponse:
        e = state.engine
        state.metrics.rejected(503, "not_loaded" if e is None else "shutting_down" if e.alive else "engine_failed")
        return error_response(503, f"not accepting requests: {exc}", path=request.url.path,
                              headers={"Retry-After": str(settings.retry_after_s)})


def _add_probe_routes(app: FastAPI, state: _State) -> None:
    """Liveness, readiness, counters and the model's metadata."""

    @app.get("/healthz", summary="Liveness", responses={503: {"description": "The engine thread died."}})
    async def healthz() -> JSONResponse:
        e = state.engine
        if e is not None and not e.alive:
            return JSONResponse({"status": "failed", "error": e.stats()["error"]}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/readyz", summary="Readiness: the model is loaded and requests are accepted",
             responses={503: {"description": "Not ready (loading, shutting down or failed)."}})
    async def readyz() -> JSONResponse:
        e = state.engine
        if e is None:
            return JSONResponse({"ready": False}, status_code=503)
        stats = e.stats()
        return JSONResponse(stats, status_code=200 if stats["ready"] else 503)

    @app.get("/v1/stats", summary="Engine counters")
    async def stats() -> dict[str, Any]:
        return state.live_engine().stats()

    @app.get("/v1/model", summary="Model metadata and this server's limits")
    async def model() -> dict[str, Any]:
        state.live_engine()
        return state.model_info

    @app.get("/metrics", summary="Prometheus metrics (text format)", response_class=Response)
    async def metrics() -> Response:
        body, content_type = state.metrics.exposition()
        return Response(body, media_type=content_type)


STREAM_RESPONSE = {"content": {"text/event-stream": {"schema": {
    "type": "string",
    "description": "With stream=true: events delta {index, text}, finish {index, finish_reason, chars}, "
                   "done {the response without texts}, error {error}.",
}}}}


def _add_generate_route(app: FastAPI, state: _State, GenerateRequest: type[BaseModel]) -> None:
    @app.post("/v1/generate", summary="Generate text", response_model=GenerateResponse,
              responses={200: STREAM_RESPONSE, **ERROR_RESPONSES})
    async def generate(body: GenerateRequest, request: HTTPRequest):  # type: ignore[valid-type]
        e = state.live_engine()
        fields = body.model_dump(exclude={"prompt", "stream"})  # type: ignore[attr-defined]
        job = e.prepare(body.prompt, e.params(**fields), body.stream)  # type: ignore[attr-defined]
        ticket = e.submit(job)
        headers = {"X-Textgen-Id": f"gen-{ticket.id}"}  # not X-Request-Id: Ray Serve sets that one
        if job.seed is not None:
            headers["X-Textgen-Seed"] = str(job.seed)
        if job.stream:
            return EventSourceResponse(_events(e, ticket, state.metrics), headers=headers,
                                       shutdown_event=Farewell([ticket]), shutdown_grace_period=SHUTDOWN_GRACE_S)
        result = await _collect(e, ticket, request)
        if result is None:  # nobody is listening; 499 is nginx's "client closed request" (for the log)
            return Response(status_code=499)
        return JSONResponse(result, headers=headers)


def app_from_env() -> FastAPI:
    """The app for ``$TEXTGEN_MODEL`` with ``ServeSettings.from_env()``: the uvicorn factory that
    ``textgen serve --workers N`` runs in each worker (``uvicorn --factory serve.http:app_from_env``)."""
    path = os.environ.get("TEXTGEN_MODEL")
    if not path:
        raise RuntimeError("set TEXTGEN_MODEL to the .onnx file to serve")
    return create_app(path, ServeSettings.from_env())


def _created(gen: Generator) -> int:
    """The model's creation time for OpenAI's model card: the file's modification time."""
    try:
        return int(Path(gen.model.path).stat().st_mtime)
    except OSError:
        return 0


def model_metadata(gen: Generator, settings: ServeSettings) -> dict[str, Any]:
    info = gen.model.info
    path = Path(gen.model.path)
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
    return {
        "file": path.name,
        "sha256": sha256,
        "vocab_size": info.vocab_size,
        "vocab": list(info.vocab),
        "lowercase": info.lowercase,
        "state_sizes": list(info.state_sizes),
        "model_config": info.model_config,
        "train_config": info.train_config,
        "metrics": info.metrics,
        "exported_at": info.exported_at,
        "generation": info.generation,
        "limits": {
            "max_chars_cap": settings.max_chars_cap,
            "max_prompt_chars": settings.max_prompt_chars,
            "max_n": settings.n_cap,
            "max_rows": settings.max_rows,
            "max_body_bytes": settings.max_body_bytes,
        },
        "defaults": {"max_chars": DEFAULT_MAX_CHARS, "temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K,
                     "top_p": DEFAULT_TOP_P, "n": 1, "unknown": "error"},
    }


# ---------------------------------------------------------------------------------------------
# Running a request


def _summary(ticket: Ticket, finishes: list[Finish | None], texts: bool) -> dict[str, Any]:
    r: Request = ticket.request
    choices = []
    for f in finishes:
        assert f is not None
        choice = {"index": f.index, "text": f.text} if texts else {"index": f.index}
        choices.append({**choice, "chars": f.chars, "finish_reason": f.reason})
    return {
        "id": f"gen-{ticket.id}",
        "seed": r.seed,
        "choices": choices,
        "usage": {"prompt_chars": len(r.prompt_ids), "generated_chars": sum(c["chars"] for c in choices)},
        "elapsed_s": round(time.monotonic() - ticket.started, 6),
    }


async def _collect(engine: Engine, ticket: Ticket, request: HTTPRequest) -> dict[str, Any] | None:
    """Wait for every sample. A client that disconnects meanwhile cancels the generation (None)."""
    finishes: list[Finish | None] = [None] * ticket.request.n
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while True:
            step = asyncio.ensure_future(ticket.next())
            await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return None
            event = step.result()
            if isinstance(event, Finish):
                finishes[event.index] = event
            elif isinstance(event, End):
                if event.error:
                    raise EngineClosed(event.error)
                return _summary(ticket, finishes, texts=True)
    finally:
        gone.cancel()
        if not ticket.finished:
            engine.cancel(ticket)


async def _events(engine: Engine, ticket: Ticket, metrics: Metrics) -> AsyncIterator[ServerSentEvent]:
    """The SSE stream of one request. When the client goes away sse-starlette cancels this
    generator; ``finally`` then takes the request's rows out of the batch."""
    finishes: list[Finish | None] = [None] * ticket.request.n
    first = True
    try:
        while True:
            event = await ticket.next()
            if isinstance(event, Delta):
                if first:
                    first = False
                    metrics.first_chars("/v1/generate", ticket.started)
                yield ServerSentEvent(json.dumps({"index": event.index, "text": event.text}), event="delta")
            elif isinstance(event, Finish):
                finishes[event.index] = event
                yield ServerSentEvent(json.dumps({"index": event.index, "finish_reason": event.reason,
                                                  "chars": event.chars}), event="finish")
            elif isinstance(event, End):
                if event.error:
                    yield ServerSentEvent(json.dumps({"error": event.error}), event="error")
                else:
                    yield ServerSentEvent(json.dumps(_summary(ticket, finishes, texts=False)), event="done")
                return
    finally:
        if not ticket.finished:
            engine.cancel(ticket)
