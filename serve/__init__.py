"""The generator: one ONNX file in, text out, with numpy and onnxruntime only.

    from serve import Generator
    gen = Generator.load("model.onnx")
    gen.generate("alice was ", max_chars=200, temperature=0.8, seed=1)

Nothing here imports TensorFlow, Keras, tf2onnx, Ray, FastAPI or the ``textgen`` training package:
the ONNX file (inputs, outputs and ``textgen.*`` metadata, see ``serve.onnx_model``) is the whole
contract. Front ends (the CLI, an HTTP app) are modules of their own, imported only when used.

Modules, upstream first: ``text`` (the shared error type and defaults, vocabulary, prompts, stop
strings, corpus files), ``sampling`` (the graph's sampling rule in numpy, its checked settings and
the per-row Gumbel noise), ``onnx_model`` (the session, its checks, the model calls: prefill and
chunks sampled in the graph), ``generator`` (the API), ``cli`` (``textgen generate`` and ``textgen
eval``).
"""

from serve.generator import Generator
from serve.onnx_model import OnnxModel
from serve.sampling import Sampler
from serve.text import DEFAULT_MAX_CHARS, DEFAULT_TEMPERATURE, MAX_CHARS_CAP, GeneratorError

__all__ = [
    "DEFAULT_MAX_CHARS",
    "DEFAULT_TEMPERATURE",
    "MAX_CHARS_CAP",
    "Generator",
    "GeneratorError",
    "OnnxModel",
    "Sampler",
]
