"""The HTTP service as a Ray Serve application: every replica runs the app of ``serve.http``
(``create_app``: the same routes, validation, limits and batching engine), built in the replica by
``serve.ingress`` and its ``__serve_build_asgi_app__`` hook; Ray Serve adds replicas as the
load grows.

    serve run serve.ray_serve:app_builder model_path=/models/model.onnx
    serve run serve.ray_serve:app_builder model_path=m.onnx max_replicas=8 max_rows=32

``app_builder(args)`` is what ``k8s/rayservice.generator.yaml`` imports (``import_path:
serve.ray_serve:app_builder``, ``args: {model_path: /models/model.onnx}``). Its arguments
(``RayServeArgs``; ``serve run`` passes strings, converted here):

    model_path               the .onnx file, readable on every node that runs a replica (required)
    min_replicas (1), max_replicas (4)   autoscaling bounds
    target_ongoing_requests (16)         requests per replica the autoscaler aims at
    max_ongoing_requests (64)            requests a replica takes at once; keep it <= max_rows
    max_queued_requests (64)             requests waiting for a replica beyond that; more get
                                         503 from Ray Serve (no unbounded queue)
    num_cpus (1)                         CPUs reserved per replica (its engine steps on one)
    any ``ServeSettings`` field          max_rows, max_chars_cap, threads, ... (default: the
                                         replica's TEXTGEN_* environment, else ServeSettings')

A replica whose engine thread died fails Ray Serve's health check and is replaced.

Every route of ``textgen serve`` is there: /v1/generate, the OpenAI-compatible /v1/completions and
/v1/models, /metrics. Behind the proxy /metrics answers for the replica that takes the request
(its own registry): with several replicas, scrape Ray Serve's metrics (serve_num_ongoing_requests,
...) or each replica. ``api_key`` (and ``api_key_file``, a path on the replicas' nodes) work as
for ``textgen serve``; SIGTERM's drain is Ray Serve's (``graceful_shutdown_timeout_s``).

The app's own bounds hold in every replica (body size and deadline, queued prompt characters,
rows in flight, docs pages off); the connection-level ones of ``textgen serve`` (head size and
deadline, open connections: ``serve.server``, uvicorn options) are the Ray Serve proxy's business
here, which terminates the clients' connections: set them in its HTTP options, or in front of it.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from ray.serve import Application

from serve.http import create_app
from serve.settings import ServeSettings
from textgen.errors import TextgenError as GeneratorError


class RayServeArgs(BaseModel):
    """The application's arguments, checked before anything is deployed."""

    model_config = ConfigDict(extra="allow")  # ServeSettings fields, checked by ServeSettings

    model_path: str = Field(min_length=1, description="The exported .onnx file, on every replica's node.")
    min_replicas: int = Field(1, ge=0, description="Autoscaling lower bound (0 allows scaling to zero).")
    max_replicas: int = Field(4, ge=1, description="Autoscaling upper bound.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica the autoscaler aims at.")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests a replica serves at once.")
    max_queued_requests: int = Field(64, ge=0, description="Requests queued for replicas; beyond: 503.")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per replica.")

    def settings(self) -> dict[str, Any]:
        """The ServeSettings overrides given, checked by ServeSettings now (not in the replicas)
        and converted (``serve run`` passes strings); unknown names refused."""
        extra = dict(self.model_extra or {})
        unknown = sorted(set(extra) - set(ServeSettings.model_fields))
        if unknown:
            known = sorted(set(RayServeArgs.model_fields) | set(ServeSettings.model_fields))
            raise GeneratorError(f"unknown argument(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return ServeSettings(**extra).model_dump(include=set(extra))


@serve.deployment(name="textgen")
@serve.ingress()
class TextgenReplica:
    """One replica: the FastAPI app of ``serve.http`` with its own model and engine."""

    def __init__(self, model_path: str, settings: dict[str, Any]) -> None:
        self._model_path = model_path
        # The replica's environment (TEXTGEN_*, e.g. from a runtime_env), then the app's arguments.
        self._settings = ServeSettings.from_env(**settings)
        self._app: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        self._app = create_app(self._model_path, self._settings)
        return self._app

    def check_health(self) -> None:
        engine = self._app.state.textgen.engine if self._app is not None else None
        if engine is not None and not engine.alive:
            raise RuntimeError(f"the generation engine stopped: {engine.stats()['error']}")


def app_builder(args: dict[str, Any]) -> Application:
    """``serve run serve.ray_serve:app_builder model_path=...`` and the RayService's import path."""
    try:
        parsed = RayServeArgs.model_validate(dict(args))
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise GeneratorError(f"bad textgen Ray Serve arguments: {problems}") from None
    if parsed.min_replicas > parsed.max_replicas:
        raise GeneratorError(f"min_replicas ({parsed.min_replicas}) is above max_replicas ({parsed.max_replicas})")
    deployment = TextgenReplica.options(
        autoscaling_config={
            "min_replicas": parsed.min_replicas,
            "max_replicas": parsed.max_replicas,
            "target_ongoing_requests": parsed.target_ongoing_requests,
        },
        max_ongoing_requests=parsed.max_ongoing_requests,
        max_queued_requests=parsed.max_queued_requests,
        ray_actor_options={"num_cpus": parsed.num_cpus},
    )
    return deployment.bind(parsed.model_path, parsed.settings())
