"""Generation request defaults, shared by the Python API, the CLI and the HTTP service."""

from __future__ import annotations

DEFAULT_MAX_CHARS = 500
DEFAULT_TEMPERATURE = 0.8  # below 1: fewer misspellings than the raw distribution, still varied
MAX_CHARS_CAP = 100_000  # per request; raise it with Generator(max_chars_cap=...)
