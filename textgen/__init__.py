"""textgen: character-level LSTM text generation — train (Keras, Ray), export (ONNX), generate.

This package is the training core. It imports nothing heavy at the top level; TensorFlow is loaded
by the modules that need it (windows, model, train, checkpoint weights).
"""

__version__ = "0.1.0"
