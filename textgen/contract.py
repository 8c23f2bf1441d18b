"""The ONNX file's contract: every name, metadata key and rule that export writes and the generator
reads, defined once. Standard library only: training, export and serving all import it.

    inputs    char_ids (B, T) int32; h_i, c_i (B, H_i) float32 for every LSTM layer i;
              sample_noise (B, K, V) float32 (standard Gumbel noise; zeros for greedy rows);
              temperature (B,) float32 (<= 0: greedy), top_k (B,) int64 (<= 0: off),
              top_p (B,) float32 (>= 1: off)
    outputs   logits (B, T, V) float32; h_i_out, c_i_out (B, H_i) float32; sampled_ids (B, K) int32;
              metadata_json (N,) uint8 (format 2: the metadata as UTF-8 JSON, for bindings that
              cannot read metadata_props)
    metadata  ``textgen.*`` keys (``METADATA_KEYS``), JSON strings

docs/format.md is this contract written out for ports (the noise, the sampling rule, versions).

B, T and K are free. With K = 0 one call is the plain step model: the logits of every position and
the state after ``char_ids``. With K > 0 the graph also samples K characters per row; the state
outputs are then the state after ``char_ids`` and the first K - 1 sampled ids: the last sampled id
is *pending*, the next call's ``char_ids`` (B, 1).

Content hash (``META_CONTENT_SHA256``): the sha256, as 64 lowercase hex digits, of the file's own
bytes with those 64 digits replaced by 64 ASCII ``0``. The exporter serializes the model with the
value ``"0" * 64``, hashes those bytes and writes the digits in place of the zeros (the entry has a
fixed length, so nothing else moves). A reader needs no protobuf: the entry is serialized as the
bytes ``CONTENT_HASH_PREFIX`` (field 1 = the key, field 2 = a 64-byte value) followed by the 64
digits; it finds that prefix (exactly once), reads the digits, puts zeros there and hashes the
file (``content_sha256``). It covers every byte: the graph, the initializers and every metadata
value. A file without the entry (exported before it existed) has no hash to check.
"""

from __future__ import annotations

import hashlib
import math
import struct

# Bumped when a reader of the old version would compute something else from a new file (docs/format.md,
# "Versions"). 2: the noise is NOISE_HASH32 (1: numpy PCG64 Gumbel noise, NOISE_PCG64).
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)  # what this reader loads
# The noise algorithm of a file: META_GENERATION's "noise" (a version-1 file has none: NOISE_PCG64).
NOISE_HASH32 = "textgen-hash32-gumbel-v1"
NOISE_PCG64 = "numpy-pcg64-gumbel"
NOISE_OF_VERSION = {1: NOISE_PCG64, 2: NOISE_HASH32}

# Tensor names (the exporter names every input and output itself).
CHAR_IDS = "char_ids"  # (B, T) int32
LOGITS = "logits"  # (B, T, V) float32
METADATA_JSON = "metadata_json"  # (N,) uint8: UTF-8 JSON of the metadata (format 2; docs/format.md)
NOISE = "sample_noise"  # (B, K, V) float32
TEMPERATURE = "temperature"  # (B,) float32
TOP_K = "top_k"  # (B,) int64
TOP_P = "top_p"  # (B,) float32
SAMPLED_IDS = "sampled_ids"  # (B, K) int32
SETTINGS = (TEMPERATURE, TOP_K, TOP_P)
GENERATION_INPUTS = (NOISE, *SETTINGS)
# ONNX element type of every fixed input and output (state tensors are all float32).
DTYPES = {CHAR_IDS: "int32", LOGITS: "float32", NOISE: "float32", TEMPERATURE: "float32",
          TOP_K: "int64", TOP_P: "float32", SAMPLED_IDS: "int32"}

# The graph divides the logits by max(temperature, GREEDY_TEMPERATURE): temperature 0 is argmax.
GREEDY_TEMPERATURE = 1e-6


def state_names(num_layers: int) -> tuple[list[str], list[str]]:
    """The per-layer state inputs and outputs: [h_0, c_0, h_1, ...], [h_0_out, c_0_out, ...]."""
    ins = [f"{k}_{i}" for i in range(num_layers) for k in ("h", "c")]
    return ins, [f"{n}_out" for n in ins]


def start_char(chars: tuple[str, ...] | list[str]) -> str:
    """What an empty prompt is fed: a newline (the model's "start of a paragraph"), else a space,
    else the first character of the vocabulary. It is not part of the output."""
    return "\n" if "\n" in chars else " " if " " in chars else chars[0]


# The noise NOISE_HASH32 (docs/format.md, "Noise"): standard Gumbel noise for the character at
# position j (0, 1, ... of the row's generated characters) and vocabulary index v of a row whose seed
# is r, from a 32-bit integer hash. This is the reference, one value at a time; serve.sampling
# computes the same numbers with numpy.
MASK32 = 0xFFFFFFFF
HASH_SALT = 0x9E3779B9
# sha256 of gumbel_of_bits(k) as float32 little-endian for k = 0 .. 2**24 - 1: a port whose table has
# this hash computes every noise value exactly.
GUMBEL_TABLE_SHA256 = "aa6336afa257c1c7dd928c565166357d22d6aa9702c9cdb9372ec60bec12cd92"


def lowbias32(x: int) -> int:
    """Chris Wellons' "lowbias32" 32-bit integer hash (murmur3 fmix32 constants retuned)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & MASK32
    x ^= x >> 15
    x = (x * 0x846CA68B) & MASK32
    return x ^ (x >> 16)


def hash_row_key(seed: int) -> int:
    """The row's 32-bit key from its seed r (taken mod 2**64): lowbias32(lowbias32(lo ^ salt) ^ hi)."""
    r = seed % (1 << 64)
    return lowbias32(lowbias32((r & MASK32) ^ HASH_SALT) ^ (r >> 32))


def hash_gumbel(seed: int, position: int, index: int) -> float:
    """The float32 value (as a Python float) of the noise at (row seed, position, vocabulary index)."""
    h = lowbias32(lowbias32(hash_row_key(seed) ^ (position & MASK32)) ^ index)
    return gumbel_of_bits(h >> 8)


def gumbel_of_bits(k: int) -> float:
    """g(k) = -log(-log(u)), u = (k + 0.5) / 2**24 for a 24-bit k, in float64 with ``portable_log``,
    rounded to float32."""
    u = (k + 0.5) / (1 << 24)  # in (0, 1), exact
    return float32(-portable_log(-portable_log(u)))


# ``portable_log``: only IEEE-754 double +, -, *, / (correctly rounded in every language), in this
# order, so every port computes the same bits; libm's log differs in the last bit between libraries.
SQRT_HALF = 0.7071067811865476
LN2 = 0.6931471805599453
LOG_SERIES = tuple(1.0 / (2 * i + 1) for i in range(7, 0, -1))  # 1/15, 1/13, ..., 1/3


def portable_log(x: float) -> float:
    """ln(x) for a normal x > 0: x = m * 2**e (frexp; m in [sqrt(1/2), sqrt(2))), s = (m - 1) / (m + 1),
    ln(m) ~ 2s (1 + s**2/3 + s**4/5 + ... + s**14/15) by Horner (|s| <= 0.172: relative error below
    2e-12, far inside a float32 rounding)."""
    m, e = math.frexp(x)
    if m < SQRT_HALF:
        m, e = m * 2.0, e - 1
    s = (m - 1.0) / (m + 1.0)
    z = s * s
    p = LOG_SERIES[0]
    for c in LOG_SERIES[1:]:
        p = p * z + c
    r = s * 2.0
    return e * LN2 + (r + r * (z * p))


def float32(x: float) -> float:
    """x rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


# Metadata keys (``metadata_props``), each a JSON string.
META_FORMAT_VERSION = "textgen.format_version"  # str(FORMAT_VERSION)
META_VOCAB = "textgen.vocab"  # list of the characters, index = id
META_LOWERCASE = "textgen.lowercase"  # true if the corpus was lowercased (prompts are too)
META_MODEL_CONFIG = "textgen.model_config"  # ModelConfig
META_TRAIN_CONFIG = "textgen.train_config"  # TrainConfig (val_fraction, seed, ...)
META_METRICS = "textgen.metrics"  # metrics of the exported checkpoint (val_loss, val_bpc, epoch, ...)
META_STATE_INPUTS = "textgen.state_inputs"  # ["h_0", "c_0", ...]
META_STATE_OUTPUTS = "textgen.state_outputs"  # ["h_0_out", "c_0_out", ...]
META_STATE_SIZES = "textgen.state_sizes"  # [H_0, H_0, H_1, H_1, ...], one per state input
META_PARITY = "textgen.parity_max_abs_diff"  # max |logits_keras - logits_onnx| measured at export
META_GENERATION = "textgen.generation"  # the sampling loop's inputs/output, precision, checks
META_EXPORTED_AT = "textgen.exported_at"  # ISO 8601 UTC
META_CONTENT_SHA256 = "textgen.content_sha256"  # sha256 of the file (see the module docstring)
METADATA_KEYS = (
    META_FORMAT_VERSION, META_VOCAB, META_LOWERCASE, META_MODEL_CONFIG, META_TRAIN_CONFIG,
    META_METRICS, META_STATE_INPUTS, META_STATE_OUTPUTS, META_STATE_SIZES, META_PARITY,
    META_GENERATION, META_EXPORTED_AT, META_CONTENT_SHA256,
)
# What a reader cannot do without (the rest is informative). A file with all of these but no
# META_GENERATION is a step model of an older textgen, without the sampling loop.
REQUIRED_METADATA = (
    META_FORMAT_VERSION, META_VOCAB, META_LOWERCASE, META_MODEL_CONFIG, META_STATE_INPUTS,
    META_STATE_OUTPUTS, META_STATE_SIZES,
)

# The content hash's entry as protobuf serializes it: tag 0x0a (field 1, bytes), the key's length and
# the key, tag 0x12 (field 2, bytes), length 64; then the 64 hex digits.
CONTENT_HASH_PLACEHOLDER = "0" * 64
CONTENT_HASH_PREFIX = (b"\x0a" + bytes([len(META_CONTENT_SHA256)]) + META_CONTENT_SHA256.encode("ascii")
                       + b"\x12" + bytes([len(CONTENT_HASH_PLACEHOLDER)]))


def content_sha256(data: bytes) -> tuple[str, str] | None:
    """(stored, computed) content hash of an ONNX file's bytes; None if it has no such entry.
    With more than one entry nothing can be verified: computed is then the empty string."""
    at = data.find(CONTENT_HASH_PREFIX)
    if at < 0:
        return None
    start = at + len(CONTENT_HASH_PREFIX)
    stored = data[start : start + 64].decode("ascii", "replace")
    if data.find(CONTENT_HASH_PREFIX, at + 1) >= 0:
        return stored, ""
    zeroed = data[:start] + CONTENT_HASH_PLACEHOLDER.encode("ascii") + data[start + 64 :]
    return stored, hashlib.sha256(zeroed).hexdigest()


def seal_content_hash(data: bytes) -> bytes:
    """The exporter's half: bytes serialized with the placeholder value -> the same bytes with the
    content hash written in its place."""
    stored, computed = content_sha256(data) or (None, "")
    if stored != CONTENT_HASH_PLACEHOLDER or not computed:
        raise ValueError("the serialized model must hold exactly one content hash entry with the placeholder")
    start = data.find(CONTENT_HASH_PREFIX) + len(CONTENT_HASH_PREFIX)
    return data[:start] + computed.encode("ascii") + data[start + 64 :]
