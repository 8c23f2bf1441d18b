"""textgen: character-level LSTM text generation — train (Keras, Ray), export (ONNX), generate.

The public import for apps that embed the generator (numpy and onnxruntime only):

    from textgen import Generator
    gen = Generator.load("model.onnx")
    print(gen.generate("alice was ", max_chars=200, seed=1))

Importing ``textgen`` loads nothing heavy: ``Generator`` (from ``serve.generator``) loads
onnxruntime when first named, and the training modules (``windows``, ``model``, ``train``,
``checkpoint``) load TensorFlow when imported. At the bottom, imported by every layer: ``errors``
and ``contract`` (standard library only) and ``text`` (numpy).
"""

import importlib
from typing import Any

from textgen.errors import RunFailed, TextgenError

__version__ = "0.1.0"
__all__ = ["Generator", "RunFailed", "TextgenError", "__version__"]


def __getattr__(name: str) -> Any:
    # The one reference from this package to the generator above it: a facade, resolved lazily so
    # that the training core never loads onnxruntime (tests/test_layers.py).
    if name == "Generator":
        return importlib.import_module("serve.generator").Generator
    raise AttributeError(f"module 'textgen' has no attribute {name!r}")
