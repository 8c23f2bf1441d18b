"""OpenAI-compatible routes over the same engine and checks as ``/v1/generate``:

    POST /v1/completions   OpenAI's legacy completions: JSON, or with ``"stream": true`` ``data:
                           {chunk}`` Server-Sent Events ended by ``data: [DONE]``
    GET  /v1/models        the served model (OpenAI's list shape); ``/v1/models/{id}`` one model

A token here is a character: ``max_tokens`` counts characters per choice and ``usage`` counts
characters (``prompt_tokens``: the characters fed to the model, as ``/v1/generate``'s
``prompt_chars``). ``top_k`` is accepted as llama.cpp and vLLM accept it (0 or -1 = off).
A list prompt makes one engine request per prompt, ``n`` rows each; choice ``i * n + j`` is sample
j of prompt i, and with ``seed`` s it uses seed s + i * n + j: prompt i's choices equal
``/v1/generate`` with seed s + i * n. Without a seed (and temperature > 0) the server picks one and
returns it in ``X-Textgen-Seed``. Fields the model cannot honour (``logprobs``, ``echo``,
``best_of`` other than n, ``suffix``, ``logit_bias``, non-zero penalties) get a 400 naming them.
Errors on these routes are OpenAI's ``{"error": {"message", "type", "param", "code"}}``; bad
parameters are 400 (as OpenAI answers them), the rest keep ``/v1/generate``'s statuses.
"""

# No `from __future__ import annotations`: FastAPI reads the route's annotations at runtime.
import asyncio
import json
import secrets
import time
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from serve.engine import Delta, End, Engine, EngineClosed, Finish, Request, Ticket
from serve.params import MAX_SEED, MAX_STOPS, MAX_TEMPERATURE, MAX_TOP_K, ParamError, Problem
from serve.settings import ServeSettings
from serve.streaming import SHUTDOWN_GRACE_S, Farewell, disconnected, merged

OPENAI_PATHS = ("/v1/completions", "/v1/models")
DEFAULT_MAX_TOKENS = 16  # OpenAI's
ERROR_TYPES = {401: "invalid_request_error", 404: "invalid_request_error", 429: "rate_limit_error"}
ERROR_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded", 503: "unavailable"}
RENAMED = {"max_chars": "max_tokens"}  # SamplingParams' names -> this route's


def is_openai_path(path: str) -> bool:
    return path in OPENAI_PATHS or path.startswith("/v1/models/")


def openai_error(status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> JSONResponse:
    """OpenAI's error body; a 422 (a field's type or value) is OpenAI's 400."""
    status = 400 if status == 422 else status
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    body = {"message": message, "type": kind, "param": param, "code": ERROR_CODES.get(status)}
    return JSONResponse({"error": body}, status_code=status, headers=headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="A last chunk with usage and no choices, before [DONE].")


class CompletionRequest(BaseModel):
    """OpenAI's completion request; a token is a character. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
        {"model": "model", "prompt": "alice was ", "max_tokens": 100, "temperature": 0.8, "seed": 1},
    ]})

    model: str | None = Field(None, description="The served model's id (GET /v1/models); omitted: that one.")
    prompt: str | list[str] = Field("", description="Text to continue, or a list of texts (one set of n choices "
                                                    "each). Token-id prompts are not accepted.")
    max_tokens: int | None = Field(DEFAULT_MAX_TOKENS, description="CHARACTERS to generate per choice (a token "
                                   "of this model is a character).")
    temperature: float | None = Field(1.0, json_schema_extra={"minimum": 0, "maximum": MAX_TEMPERATURE},
                                      description="0 = greedy.")
    top_p: float | None = Field(1.0, json_schema_extra={"exclusiveMinimum": 0, "maximum": 1})
    top_k: int | None = Field(0, json_schema_extra={"minimum": -1, "maximum": MAX_TOP_K},
                              description="Extension (as llama.cpp, vLLM): the k most likely characters; 0 or -1 = off.")
    n: int | None = Field(1, description="Choices per prompt.")
    stop: str | list[str] | None = Field(None, json_schema_extra={"maxItems": MAX_STOPS},
                                         description="Strings that end a choice (not included).")
    seed: int | None = Field(None, json_schema_extra={"minimum": 0, "maximum": MAX_SEED},
                             description="Choice k (prompt i, sample j: k = i * n + j) uses seed + k.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="Accepted and ignored.")
    logprobs: int | None = Field(None, description="Not supported (must be null).")
    echo: bool | None = Field(False, description="Not supported (must be false).")
    best_of: int | None = Field(None, description="Not supported beyond n.")
    suffix: str | None = Field(None, description="Not supported (must be null).")
    logit_bias: dict[str, float] | None = Field(None, description="Not supported (must be empty).")
    presence_penalty: float | None = Field(0.0, description="Not supported (must be 0).")
    frequency_penalty: float | None = Field(0.0, description="Not supported (must be 0).")


def unsupported(body: CompletionRequest) -> list[str]:
    """The fields set to something this model cannot do."""
    refused = [name for name in ("logprobs", "suffix") if getattr(body, name) is not None]
    refused += [name for name in ("echo",) if body.echo]
    refused += ["best_of"] if body.best_of not in (None, 1, body.n or 1) else []
    refused += ["logit_bias"] if body.logit_bias else []
    refused += [name for name in ("presence_penalty", "frequency_penalty") if getattr(body, name)]
    return refused


def refuse_unsupported(fields: list[str]) -> ParamError:
    why = ("this character model samples inside its ONNX graph, which returns characters, not "
           "log-probabilities or penalised scores")
    return ParamError([Problem(f, f"{f} is not supported", f"not supported ({why}); omit it") for f in fields])


def _renamed(e: ParamError, suffix: str = "") -> ParamError:
    return ParamError([Problem(RENAMED.get(p.field, p.field), p.message, p.detail + suffix) for p in e.problems])


def _sampling(body: CompletionRequest) -> dict[str, Any]:
    """``SamplingParams`` keywords of the request (OpenAI's nulls are the defaults)."""
    top_k = 0 if body.top_k in (None, -1) else body.top_k
    return dict(max_chars=DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p, top_k=top_k, stop=body.stop,
                n=1 if body.n is None else body.n)


def prepare(engine: Engine, body: CompletionRequest, settings: ServeSettings) -> list[Request]:
    """One checked engine request per prompt (``ParamError`` naming this route's fields)."""
    if refused := unsupported(body):
        raise refuse_unsupported(refused)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if not prompts:
        raise ParamError.of("prompt", "prompt is an empty list", "an empty list; send a string or strings")
    values = _sampling(body)
    try:
        params = engine.params(**values, seed=body.seed)
    except ParamError as e:
        raise _renamed(e) from None
    if len(prompts) * params.n > settings.n_cap:
        raise ParamError.of("n", "too many choices", f"{len(prompts)} prompts x n = {params.n} is over this "
                            f"server's {settings.n_cap} choices per request (max_n)")
    seed = body.seed if body.seed is not None or params.greedy else secrets.randbelow(2**31)
    jobs = []
    for i, prompt in enumerate(prompts):
        try:
            row_seed = None if seed is None else seed + i * params.n
            jobs.append(engine.prepare(prompt, engine.params(**values, seed=row_seed), bool(body.stream)))
        except ParamError as e:
            raise _renamed(e, f" (prompt {i})" if len(prompts) > 1 else "") from None
    return jobs


def submit_all(engine: Engine, jobs: Sequence[Request]) -> list[Ticket]:
    """Admit every job, or none (``EngineBusy`` / ``EngineClosed`` after cancelling the others)."""
    tickets: list[Ticket] = []
    try:
        for job in jobs:
            tickets.append(engine.submit(job))
    except Exception:
        for ticket in tickets:
            engine.cancel(ticket)
        raise
    return tickets


class Completion:
    """One /v1/completions request's identity and its OpenAI shapes."""

    def __init__(self, model: str, tickets: Sequence[Ticket]) -> None:
        self.model, self.tickets = model, tickets
        self.id, self.created = f"cmpl-{tickets[0].id}", int(time.time())
        self.n = tickets[0].request.n

    def index(self, ticket: int, sample: int) -> int:
        return ticket * self.n + sample

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def usage(self, completion_chars: int) -> dict[str, int]:
        prompt = sum(len(t.request.prompt_ids) for t in self.tickets)
        return {"prompt_tokens": prompt, "completion_tokens": completion_chars,
                "total_tokens": prompt + completion_chars}

    def headers(self) -> dict[str, str]:
        seed = self.tickets[0].request.seed
        return {"X-Textgen-Id": self.id, **({} if seed is None else {"X-Textgen-Seed": str(seed)})}


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


async def collect(engine: Engine, c: Completion, request: HTTPRequest) -> dict[str, Any] | None:
    """The whole response; None when the client went away (its rows leave the batch)."""
    choices: dict[int, dict[str, Any]] = {}
    gone = asyncio.ensure_future(disconnected(request))
    events = merged(c.tickets)
    try:
        ended = 0
        while ended < len(c.tickets):
            step = asyncio.ensure_future(events.__anext__())
            await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                step.cancel()
                return None
            i, event = step.result()
            if isinstance(event, Finish):
                choices[c.index(i, event.index)] = choice(c.index(i, event.index), event.text or "", event.reason)
            elif isinstance(event, End):
                if event.error:
                    raise EngineClosed(event.error)
                ended += 1
        chars = sum(len(ch["text"]) for ch in choices.values())
        return c.envelope([choices[k] for k in sorted(choices)], usage=c.usage(chars))
    finally:
        gone.cancel()
        await events.aclose()
        cancel_unfinished(engine, c.tickets)


def cancel_unfinished(engine: Engine, tickets: Sequence[Ticket]) -> None:
    for ticket in tickets:
        if not ticket.finished:
            engine.cancel(ticket)


def _data(obj: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(obj))


async def chunks(engine: Engine, c: Completion, include_usage: bool, metrics: Any) -> AsyncIterator[ServerSentEvent]:
    """The stream: a chunk per delta and per finished choice, usage if asked, then [DONE]. An
    interrupted request ends with an error chunk (OpenAI's error shape) and [DONE]."""
    chars, first, ended = 0, True, 0
    try:
        async for i, event in merged(c.tickets):
            if isinstance(event, Delta):
                if first:
                    first = False
                    metrics.first_chars("/v1/completions", c.tickets[0].started)
                chars += len(event.text)
                yield _data(c.envelope([choice(c.index(i, event.index), event.text, None)]))
            elif isinstance(event, Finish):
                yield _data(c.envelope([choice(c.index(i, event.index), "", event.reason)]))
            elif event.error:
                yield _data({"error": {"message": event.error, "type": "server_error", "param": None,
                                       "code": "unavailable"}})
                break
            elif (ended := ended + 1) == len(c.tickets):
                if include_usage:
                    yield _data(c.envelope([], usage=c.usage(chars)))
                break
        yield ServerSentEvent("[DONE]")
    finally:
        cancel_unfinished(engine, c.tickets)


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "textgen"}


def add_openai_routes(app: FastAPI, state: Any, settings: ServeSettings) -> None:
    """The routes; ``state`` is the app's (``live_engine()``, ``model_id``, ``model_created``,
    ``metrics``)."""

    @app.get("/v1/models", summary="The served model (OpenAI's list shape)")
    async def models() -> dict[str, Any]:
        state.live_engine()
        return {"object": "list", "data": [model_card(state.model_id, state.model_created)]}

    @app.get("/v1/models/{model_id}", summary="One model (OpenAI's shape)")
    async def model(model_id: str) -> Response:
        state.live_engine()
        if model_id != state.model_id:
            return openai_error(404, f"the model {model_id!r} does not exist; this server serves {state.model_id!r}",
                                "model")
        return JSONResponse(model_card(state.model_id, state.model_created))

    @app.post("/v1/completions", summary="OpenAI-compatible completions (a token is a character)")
    async def completions(body: CompletionRequest, request: HTTPRequest):
        e = state.live_engine()
        if body.model not in (None, state.model_id):
            return openai_error(404, f"the model {body.model!r} does not exist; this server serves "
                                f"{state.model_id!r} (GET /v1/models)", "model")
        c = Completion(state.model_id, submit_all(e, prepare(e, body, settings)))
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(chunks(e, c, usage, state.metrics), headers=c.headers(),
                                       shutdown_event=Farewell(c.tickets), shutdown_grace_period=SHUTDOWN_GRACE_S)
        result = await collect(e, c, request)
        if result is None:  # nobody is listening (499: nginx's "client closed request", for the log)
            return Response(status_code=499)
        return JSONResponse(result, headers=c.headers())
