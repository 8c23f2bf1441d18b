"""The service's settings, declared once: ``ServeSettings`` (pydantic-settings, ``TEXTGEN_*``
environment variables). ``textgen serve``'s flags and the Ray Serve app's arguments are made from
its fields; the engine, the app and the server read it. Nothing here imports the web stack.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any, Mapping

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from serve.params import Limits
from textgen.errors import TextgenError


class SettingsError(TextgenError):
    pass


class ServeSettings(BaseSettings):
    """Limits and tuning of one serving process, declared once: each field is a flag of ``textgen
    serve`` (``--max-rows``), an environment variable (``TEXTGEN_MAX_ROWS``, which the flag wins
    over) and an argument of the Ray Serve app. Bad values raise ``SettingsError``."""

    model_config = SettingsConfigDict(env_prefix="TEXTGEN_", env_ignore_empty=True, frozen=True, extra="forbid")

    # Why each default (figures: bench/RESULTS.md). A few seconds of one stream in a busy batch:
    max_chars_cap: int = Field(10_000, ge=1, description="most characters a request may ask for per sample")
    # Consuming a prompt costs model time per character: the cap bounds what one request can take.
    max_prompt_chars: int = Field(10_000, ge=1, description="longest prompt accepted, in characters")
    max_n: int = Field(16, ge=1, description="most samples per request (n); each is a row of the batch")
    # A request that would pass it is refused at once: no queue, and a step of the batch stays short.
    max_rows: int = Field(64, ge=1, description="in-flight limit: rows (the sum of n) being served; more gets 429")
    max_body_bytes: int = Field(1 << 20, ge=1024, description="largest request body in bytes; larger gets 413")
    # 1 leaves the other core to the event loop.
    threads: int = Field(1, ge=0, description="onnxruntime intra-op threads of the engine (0 = one per core)")
    # An event costs server and client several characters' worth of CPU (bench/http_load.py).
    stream_interval_ms: float = Field(50.0, ge=0, allow_inf_nan=False, description="streamed characters are sent "
                                      "in chunks at most this old, in ms (a row's first ones at once)")
    # About the time a typical request takes.
    retry_after_s: int = Field(1, ge=0, description="the Retry-After (seconds) of a request refused as busy")
    # Larger: fewer calls; smaller: a newcomer waits less for its first characters (about two calls).
    chunk_size: int = Field(16, ge=1, description="characters per row per model call (lower: sooner first "
                                                  "characters; higher: more throughput)")
    # Prompt characters cost model time before a request's first character: a bound on the backlog.
    max_queued_prefill_chars: int = Field(100_000, ge=1, description="prompt characters admitted but not consumed "
                                          "yet; a request that would pass it gets 429")
    # The connection limits below are uvicorn's (``textgen serve``); behind Ray Serve, its proxy's.
    max_header_bytes: int = Field(64 * 1024, ge=1024, description="largest request head (request line and "
                                  "headers) in bytes; larger gets 400 and the connection is closed")
    max_connections: int = Field(256, ge=2, description="open connections (or requests running) at which "
                                 "uvicorn answers 503")
    header_timeout_s: float = Field(10.0, ge=0.1, allow_inf_nan=False, description="seconds a connection has "
                                    "to send a request head; later: 408 and the connection is closed")
    body_timeout_s: float = Field(30.0, ge=0.1, allow_inf_nan=False, description="seconds a request has to send "
                                  "its body once its head is in; later: 408")
    docs: bool = Field(False, description="serve /docs and /redoc (they load JavaScript from a CDN); "
                                          "/openapi.json is always served")
    # Below Kubernetes' default terminationGracePeriodSeconds (30), with room for a preStop sleep.
    drain_seconds: float = Field(20.0, ge=0, allow_inf_nan=False, description="on SIGTERM: seconds running "
                                 "generations get to finish (readiness and new requests 503 meanwhile); 0 = none")
    model_name: str | None = Field(None, min_length=1, description="the model id of /v1/models and /v1/completions; "
                                   "unset: the model file's name without .onnx")
    api_key: SecretStr | None = Field(None, description="API key(s), comma-separated: requests must send "
                                      "Authorization: Bearer <key>; unset: no authentication (prefer the variable or the file to a flag, "
                                      "which ps shows)")
    api_key_file: str | None = Field(None, min_length=1, description="a file of API keys, one per line (e.g. a "
                                     "mounted Kubernetes Secret); with --api-key, both are accepted")
    open_paths: str = Field("/healthz,/readyz,/metrics", description="comma-separated paths served without an API "
                            "key (probes, Prometheus)")

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as e:
            raise _settings_error(e, set(values) - (_FROM_MAPPING.get() or set())) from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # type: ignore[override]
        # Arguments, then os.environ; only the arguments while from_env reads another mapping.
        return (init_settings,) if _FROM_MAPPING.get() is not None else (init_settings, env_settings)

    def api_keys(self) -> tuple[str, ...]:
        """Every accepted API key: of ``api_key`` (comma-separated) and ``api_key_file`` (one per
        line; blank lines and ``#`` comments skipped). Empty: no authentication."""
        keys = [k.strip() for k in (self.api_key.get_secret_value() if self.api_key else "").split(",")]
        if self.api_key_file:
            try:
                text = open(self.api_key_file, encoding="utf-8").read()
            except OSError as e:
                raise SettingsError(f"cannot read the API key file {self.api_key_file} (--api-key-file, "
                                    f"{self.env_name('api_key_file')}): {e.strerror}") from None
            keys += [line.strip() for line in text.splitlines() if not line.strip().startswith("#")]
        return tuple(k for k in keys if k)

    def open_path_set(self) -> frozenset[str]:
        return frozenset(p.strip() for p in self.open_paths.split(",") if p.strip())

    @property
    def n_cap(self) -> int:
        """The most samples a request may ask for: max_n, and no more than max_rows."""
        return min(self.max_n, self.max_rows)

    def limits(self) -> Limits:
        """The caps every request is checked against."""
        return Limits.server(self.max_chars_cap, self.max_prompt_chars, self.n_cap)

    @classmethod
    def env_name(cls, name: str) -> str:
        return f"{cls.model_config['env_prefix']}{name.upper()}"

    @staticmethod
    def flag(name: str) -> str:
        return f"--{name.replace('_', '-')}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        """Defaults, then ``TEXTGEN_*`` variables (of ``os.environ``, or of ``environ``), then
        ``overrides`` (None values are ignored)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        if environ is None:
            return cls(**given)
        env = {name: raw for name in cls.model_fields if (raw := environ.get(cls.env_name(name), "").strip())}
        token = _FROM_MAPPING.set(set(env) - set(given))
        try:
            return cls(**{**env, **given})
        finally:
            _FROM_MAPPING.reset(token)


# While ``from_env`` reads a mapping instead of os.environ: the settings that came from it.
_FROM_MAPPING: ContextVar[set[str] | None] = ContextVar("textgen_settings_from_mapping", default=None)


def _settings_error(e: ValidationError, given: set[str]) -> SettingsError:
    """Pydantic's errors -> one message naming the flag and the variable of every bad setting."""
    problems = []
    for err in e.errors():
        name, value = str(err["loc"][0]) if err["loc"] else "", err.get("input")
        field, env = ServeSettings.model_fields.get(name), ServeSettings.env_name(name)
        kind = {float: "a number", bool: "true or false", int: "an integer"}.get(
            field.annotation if field else None, "a string")
        floor = next((f" >= {m.ge}" for m in field.metadata if hasattr(m, "ge")), "") if field else ""
        if field is None:
            problems.append(f"unknown setting {name!r} (known: {', '.join(ServeSettings.model_fields)})")
        elif name not in given and isinstance(value, str) and err["type"].endswith("_parsing"):
            problems.append(f"{env}={value!r} is not {kind}")
        else:
            problems.append(f"setting {name} ({ServeSettings.flag(name)}, {env}) must be {kind}{floor}, got {value!r}")
    return SettingsError("; ".join(problems))
