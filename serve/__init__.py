"""The generator and its front ends: one ONNX file in, text out, with numpy and onnxruntime only.

    from textgen import Generator          # the public import (the same class)
    gen = Generator.load("model.onnx")
    gen.generate("alice was ", max_chars=200, temperature=0.8, seed=1)

Nothing here imports TensorFlow, Keras, tf2onnx or Ray Train: the ONNX file is the whole contract
(``textgen.contract``), and the text rules are ``textgen.text``'s. Importing ``serve`` is cheap:
``Generator`` and ``OnnxModel`` load onnxruntime when first used. Modules, upstream first:
``params`` (a request's parameters, checked once), ``sampling`` (the graph's sampling rule in numpy
and the per-row noise), ``onnx_model`` (the session and its checks), ``decode`` (the decode loop),
``generator`` (the API), ``engine`` (continuous batching), ``http`` / ``ray_serve`` (the service),
``cli`` (``textgen generate``, ``eval`` and ``serve``).
"""

from __future__ import annotations

import importlib
from typing import Any

from serve.params import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE, MAX_CHARS_CAP
from textgen.errors import TextgenError as GeneratorError  # every bad argument or model file

_LAZY = {"Generator": "serve.generator", "OnnxModel": "serve.onnx_model"}

__all__ = ["DEFAULT_MAX_CHARS", "DEFAULT_TEMPERATURE", "MAX_CHARS_CAP", "Generator", "GeneratorError", "OnnxModel"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'serve' has no attribute {name!r}")
