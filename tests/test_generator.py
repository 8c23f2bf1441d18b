"""The generator through real onnxruntime, on the small model trained and exported once per session
(``small_onnx`` in conftest.py), plus the files it must refuse."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from serve import GeneratorError
from serve.generator import Generator
from serve.onnx_model import ModelFileError, OnnxModel

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN = ("tensorflow", "keras", "tf2onnx", "ray", "fastapi")
# The generator may use textgen's bottom layer (stdlib and numpy only), nothing else of it.
TEXTGEN_BOTTOM = ("textgen", "textgen.contract", "textgen.errors", "textgen.text")


@pytest.fixture(scope="module")
def gen(small_onnx) -> Generator:
    return Generator.load(small_onnx)


class CountingSession:
    """Wraps an InferenceSession and records its calls: (char_ids shape, K) each."""

    def __init__(self, session):
        self._session, self.calls = session, []

    def run(self, names, feed):
        self.calls.append((feed["char_ids"].shape, feed["sample_noise"].shape[1]))
        return self._session.run(names, feed)

    def __getattr__(self, name):
        return getattr(self._session, name)


@pytest.fixture
def counted(small_onnx):
    g = Generator.load(small_onnx)
    g.model.session = CountingSession(g.model.session)
    return g


# ---------------------------------------------------------------------------------------------
# Round trip


def test_loads_the_contract_from_the_metadata(gen):
    info = gen.model.info
    assert len(gen.vocab) == 45 and gen.lowercase is True
    assert info.state_inputs == ("h_0", "c_0") and info.state_sizes == (32, 32)
    assert info.model_config["seq_len"] == 32 and info.train_config["val_fraction"] == 0.1
    assert isinstance(info.metrics["val_loss"], float)


def test_generates_max_chars_from_the_vocabulary(gen):
    text = gen.generate("alice was ", max_chars=200, seed=0)
    assert isinstance(text, str) and len(text) == 200 and set(text) <= set(gen.vocab)
    assert gen.generate("alice", max_chars=0, seed=0) == ""


def test_same_seed_same_text_other_seed_other_text(gen):
    a = gen.generate("the queen ", max_chars=100, seed=42)
    assert gen.generate("the queen ", max_chars=100, seed=42) == a
    assert gen.generate("the queen ", max_chars=100, seed=43) != a


def test_greedy_is_deterministic_without_a_seed(gen):
    assert gen.generate("alice", max_chars=60, temperature=0) == gen.generate("alice", max_chars=60, temperature=0)


def test_stream_yields_the_generated_text_one_character_at_a_time(gen):
    chars = list(gen.stream("alice ", max_chars=150, seed=5, top_p=0.9))
    assert all(len(c) == 1 for c in chars)
    assert "".join(chars) == gen.generate("alice ", max_chars=150, seed=5, top_p=0.9)
    stop = ["the", "\n"]
    assert "".join(gen.stream("alice ", max_chars=300, seed=5, stop=stop)) == gen.generate(
        "alice ", max_chars=300, seed=5, stop=stop
    )


def test_prompt_is_consumed_in_the_first_call_then_one_call_per_chunk(counted):
    from serve.generator import DEFAULT_CHUNK, FIRST_CHUNK

    prompt = "alice was beginning to get very tired of sitting by her sister"
    n = FIRST_CHUNK + 2 * DEFAULT_CHUNK + 5
    assert len(counted.generate(prompt, max_chars=n, seed=1)) == n
    assert counted.model.session.calls == [((1, len(prompt)), FIRST_CHUNK), ((1, 1), DEFAULT_CHUNK),
                                           ((1, 1), DEFAULT_CHUNK), ((1, 1), 5)]  # max_chars exactly
    counted.model.session.calls.clear()
    assert counted.generate("a", max_chars=3, seed=1) and counted.model.session.calls == [((1, 1), 3)]


def test_one_prompt_call_equals_feeding_the_prompt_char_by_char(gen):
    model = gen.model
    ids = model.vocabulary.encode("alice was beginning to get very tired")
    logits, state = model.run(ids[None])  # (1, T, V): one call
    by_char = model.zero_state(1)
    for i in ids:
        step_logits, by_char = model.run(np.array([[i]], np.int32), by_char)
    np.testing.assert_allclose(logits[:, -1], step_logits[:, 0], atol=1e-5)
    for a, b in zip(state, by_char):
        np.testing.assert_allclose(a, b, atol=1e-5)
    prefilled = model.prefill([ids, ids[:0], ids])  # the empty prompt keeps the zero state
    for a, b in zip(state, prefilled):
        np.testing.assert_array_equal(b[[0, 2]], np.repeat(a, 2, axis=0))
        assert not b[1].any()


@pytest.mark.parametrize("kwargs", [dict(seed=3), dict(seed=4, temperature=1.2, top_k=9, top_p=0.9),
                                    dict(temperature=0), dict(seed=5, stop=["e ", "."])])
def test_the_chunk_size_does_not_change_the_text(small_onnx, gen, kwargs):
    expected = gen.generate("alice was ", max_chars=300, **kwargs)
    for chunk in (1, 5, 64, 1000):
        other = Generator.load(small_onnx, chunk_size=chunk)
        assert other.generate("alice was ", max_chars=300, **kwargs) == expected, chunk
        assert "".join(other.stream("alice was ", max_chars=300, **kwargs)) == expected, chunk


def test_the_graph_samples_what_the_sampler_says(gen):
    """The first sample of a call comes from the logits after its last character (K = 0 gives
    them, from the same state): greedy is their argmax, Gumbel noise follows sampling.sample_rows.
    (int8 loop weights may swap near-tied characters: all but a few agree; exact equality with
    fp32 loop weights is in tests/test_export.py.)"""
    from serve.sampling import sample_rows

    model = gen.model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.info.vocab_size, size=(256, 12)).astype(np.int32)
    logits, _ = model.run(ids)
    t = rng.choice([0.0, 0.5, 1.0, 1.5], size=256).astype(np.float32)
    k = rng.choice([0, 1, 5, 20], size=256)
    p = rng.choice([1.0, 0.95, 0.5], size=256).astype(np.float32)
    noise = rng.gumbel(size=(256, 1, model.info.vocab_size)).astype(np.float32) * (t > 0)[:, None, None]
    sampled, state = model.chunk(ids, model.zero_state(256), noise, model.settings(256, t, k, p))
    expected = sample_rows(logits[:, -1], noise[:, 0], t, k, p)
    assert sampled.shape == (256, 1) and sampled.dtype == np.int32
    assert np.mean(sampled[:, 0] == expected) > 0.95


def test_batch_rows_equal_single_generations_with_derived_seeds(gen):
    prompts = ["alice", "", "the queen said", "ALICE", "alice"]
    kwargs = dict(max_chars=120, temperature=0.9, top_k=20, stop=[".", "!"])
    batch = gen.generate_batch(prompts, seed=11, **kwargs)
    assert batch == [gen.generate(p, seed=11 + i, **kwargs) for i, p in enumerate(prompts)]
    assert batch[3] == gen.generate("alice", seed=14, **kwargs)  # lowercased model
    seeds = [5, 5, 9, 1, 2]
    assert gen.generate_batch(prompts, seed=seeds, **kwargs) == [
        gen.generate(p, seed=s, **kwargs) for p, s in zip(prompts, seeds)
    ]


def test_batch_of_n_samples_of_one_prompt(counted):
    from serve.generator import DEFAULT_CHUNK, FIRST_CHUNK

    n = FIRST_CHUNK + DEFAULT_CHUNK + 10
    texts = counted.generate_batch(8, prompt="alice ", max_chars=n, seed=3)
    assert len(texts) == 8 and len(set(texts)) == 8 and all(len(t) == n for t in texts)
    # The prompt but its last character ran once for all rows, then one batched call per chunk.
    assert counted.model.session.calls == [((1, 5), 0), ((8, 1), FIRST_CHUNK), ((8, 1), DEFAULT_CHUNK), ((8, 1), 10)]
    greedy = counted.generate_batch(3, prompt="alice", max_chars=30, temperature=0)
    assert greedy == [counted.generate("alice", max_chars=30, temperature=0)] * 3


def test_rows_that_stop_leave_the_batch(gen):
    texts = gen.generate_batch(6, prompt="alice ", max_chars=400, seed=0, stop=" ")
    full = gen.generate_batch(6, prompt="alice ", max_chars=400, seed=0)
    for t, f in zip(texts, full):
        assert " " not in t and f.startswith(t + " ")


def _cut_at_first_stop(full: str, stops: list[str]) -> str:
    for n in range(1, len(full) + 1):
        for s in stops:
            if full[:n].endswith(s):
                return full[: n - len(s)]
    return full


def test_a_stop_string_made_by_the_last_allowed_character_is_removed_too(gen):
    """generate, stream and generate_batch agree when the max_chars-th character completes a stop
    string: it is removed (generate_batch used to keep it)."""
    full = gen.generate("alice ", max_chars=400, seed=2)
    n = next(n for n in range(50, 400) if full[n - 2 : n] not in full[: n - 1])  # a first occurrence
    stop = full[n - 2 : n]
    kwargs = dict(max_chars=n, seed=2, stop=[stop])
    assert gen.generate("alice ", **kwargs) == full[: n - 2]
    assert "".join(gen.stream("alice ", **kwargs)) == full[: n - 2]
    assert gen.generate_batch(["alice ", "alice "], **{**kwargs, "seed": [2, 2]}) == [full[: n - 2]] * 2


def test_stop_string_ends_generation_and_is_not_included(gen):
    full = gen.generate("alice ", max_chars=400, seed=2)
    for stop in (["the"], ["he", "a"], ["\n", "th"], ["alice"]):
        assert gen.generate("alice ", max_chars=400, seed=2, stop=stop) == _cut_at_first_stop(full, stop)
    assert gen.generate("alice ", max_chars=400, seed=2, stop="never-made~") == full


def test_stop_stream_holds_back_only_possible_stop_prefixes():
    """The decode loop's hold-back (``Row.release``, used by ``stream`` and the engine) releases
    exactly the text up to the first stop, for random texts and overlapping stop strings, and
    holds back nothing that cannot start a stop."""
    from serve.decode import Row
    from serve.params import SamplingParams

    chars = ("a", "b", "c")
    rng = np.random.default_rng(0)
    for _ in range(500):
        text = "".join(rng.choice(list("abc"), size=30))
        stops = ["".join(rng.choice(list("abc"), size=rng.integers(1, 4))) for _ in range(rng.integers(1, 3))]
        row, released, stopped = Row(SamplingParams(stop=stops), chars), [], False
        for ch in text:
            stopped = row.add([chars.index(ch)])
            released.append(row.release(stopped))
            assert row.length - row.sent < max(map(len, stops))  # what is held back
            if stopped:
                break
        if not stopped:
            released.append(row.release(True))
        assert "".join(released) == _cut_at_first_stop(text, stops), (text, stops)


def test_prompt_is_lowercased_for_a_lowercased_model(gen):
    assert gen.generate("ALICE Was", max_chars=80, seed=9) == gen.generate("alice was", max_chars=80, seed=9)


def test_empty_prompt_starts_from_a_newline(gen):
    text = gen.generate("", max_chars=80, seed=4)
    assert len(text) == 80 and text == gen.generate("\n", max_chars=80, seed=4)


def test_unknown_prompt_characters(gen):
    with pytest.raises(GeneratorError) as info:
        gen.generate("alicé costs 5€", max_chars=10, seed=1)
    message = str(info.value)
    assert "unknown characters in prompt: '5', 'é', '€' (model vocabulary: 45 chars)" in message
    assert "skip" in message and "replace" in message
    skip = gen.generate("alicé€", max_chars=50, seed=1, unknown="skip")
    assert skip == gen.generate("alic", max_chars=50, seed=1)
    replace = gen.generate("alicé€", max_chars=50, seed=1, unknown="replace")
    assert replace == gen.generate("alic  ", max_chars=50, seed=1)
    assert gen.generate("é", max_chars=20, seed=1, unknown="skip") == gen.generate("", max_chars=20, seed=1)
    with pytest.raises(GeneratorError, match="replacement character '#' is not in the model vocabulary"):
        gen.generate("é", unknown="replace", replacement="#")
    with pytest.raises(GeneratorError, match="policy must be one of error, skip, replace"):
        gen.generate("a", unknown="ignore")


def test_one_generator_serves_threads(gen):
    expected = [gen.generate("alice", max_chars=200, seed=s) for s in range(4)]
    got = [None] * 4

    def work(i):
        got[i] = gen.generate("alice", max_chars=200, seed=i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == expected


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-1), "temperature must be >= 0"),
        (dict(top_p=0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_k=-3), "top_k must be >= 0"),
        (dict(max_chars=-1), "max_chars must be at least 0"),
        (dict(max_chars=100_001), "max_chars must be at most 100,000"),
        (dict(max_chars=2.5), "max_chars must be an integer"),
        (dict(stop=5), "stop must be a string or a list of strings"),
        (dict(stop=["a", 1]), "stop must be a string or a list of strings"),
        (dict(stop=""), "stop strings must not be empty"),
        (dict(seed=-1), "seed must be an integer >= 0"),
        (dict(seed="x"), "seed must be an integer >= 0"),
    ],
)
def test_bad_parameters_raise_generator_error_before_any_output(gen, kwargs, message):
    with pytest.raises(GeneratorError, match=message):
        gen.stream("alice", **kwargs)  # raises on the call, not on the first next()
    with pytest.raises(ValueError, match=message):
        gen.generate("alice", **kwargs)


def test_bad_batch_arguments(gen):
    with pytest.raises(GeneratorError, match="prompts must be a list of strings"):
        gen.generate_batch("alice")
    with pytest.raises(GeneratorError, match="number of samples must be at least 1"):
        gen.generate_batch(0)
    with pytest.raises(GeneratorError, match="got 2 seeds for 3 prompts"):
        gen.generate_batch(["a", "b", "c"], seed=[1, 2])
    with pytest.raises(GeneratorError, match="a prompt must be a string"):
        gen.generate_batch(["a", None])
    with pytest.raises(GeneratorError, match="4,000 prompts x max_chars 100,000 is more than 16,000,000"):
        gen.generate_batch(4000, max_chars=100_000)


def test_caps_are_configurable(small_onnx):
    g = Generator.load(small_onnx, max_chars_cap=10, max_prompt_chars=5)
    assert len(g.generate("alice", max_chars=10, seed=0)) == 10
    with pytest.raises(GeneratorError, match="max_chars must be at most 10"):
        g.generate("alice", max_chars=11)
    with pytest.raises(GeneratorError, match="the prompt has 6 characters, more than the limit of 5"):
        g.generate("alice ", max_chars=1)
    with pytest.raises(GeneratorError, match="num_threads must be an integer >= 0"):
        Generator.load(small_onnx, num_threads=-1)
    with pytest.raises(GeneratorError, match="chunk_size must be at least 1"):
        Generator.load(small_onnx, chunk_size=0)


def test_session_options_can_be_given(small_onnx, gen):
    import onnxruntime as ort

    options = ort.SessionOptions()
    g = Generator.load(small_onnx, session_options=options, num_threads=2)
    assert options.intra_op_num_threads == 2
    assert g.generate("alice", max_chars=40, seed=8) == gen.generate("alice", max_chars=40, seed=8)
    kwargs = dict(max_chars=300, seed=8, top_p=0.9)  # threads split the batch: rows stay the same
    assert g.generate_batch(["alice", "the", ""] * 8, **kwargs) == gen.generate_batch(["alice", "the", ""] * 8, **kwargs)


# ---------------------------------------------------------------------------------------------
# Files that are not a textgen model


def test_missing_empty_directory_and_non_onnx_files(tmp_path, small_onnx):
    with pytest.raises(ModelFileError, match="does not exist; export a checkpoint with `textgen export"):
        Generator.load(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="is a directory"):
        Generator.load(tmp_path)
    (tmp_path / "empty.onnx").write_bytes(b"")
    with pytest.raises(ModelFileError, match=r"is empty \(0 bytes\)"):
        Generator.load(tmp_path / "empty.onnx")
    (tmp_path / "text.onnx").write_text("this is not a model\n")
    with pytest.raises(ModelFileError, match="is not a loadable ONNX model"):
        Generator.load(tmp_path / "text.onnx")
    data = Path(small_onnx).read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="is not a loadable ONNX model"):
        Generator.load(tmp_path / "truncated.onnx")


def _with_metadata(src: Path, dst: Path, **changes: str | None) -> Path:
    import onnx

    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    for k, v in changes.items():
        key = "textgen." + k
        if v is None:
            meta.pop(key, None)
        else:
            meta[key] = v
    del proto.metadata_props[:]
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(dst))
    return dst


def test_a_model_from_an_older_textgen_is_refused_with_what_to_do(tmp_path, small_onnx):
    path = _with_metadata(small_onnx, tmp_path / "old.onnx", generation=None)
    with pytest.raises(ModelFileError, match=r"this model was exported by an older textgen; re-export it with "
                                             r"`textgen export`"):
        Generator.load(path)


def test_onnx_without_textgen_metadata(tmp_path, small_onnx):
    path = _with_metadata(small_onnx, tmp_path / "m.onnx", vocab=None, state_sizes=None)
    with pytest.raises(ModelFileError, match=r"has no textgen metadata \(textgen.vocab, textgen.state_sizes missing\)"):
        Generator.load(path)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(format_version="3"), "format_version '3'; this generator reads versions 1 and 2"),
        (dict(generation=json.dumps({"noise": "xorshift"})), "noise 'xorshift' is not format 2's"),
        (dict(vocab="not json"), "metadata textgen.vocab is not valid JSON"),
        (dict(vocab='["a", "a"]'), "textgen.vocab must be a list of two or more distinct"),
        (dict(lowercase='"yes"'), "textgen.lowercase must be true or false"),
        (dict(state_sizes="[64, 64]"), r"input 'h_0' is tensor\(float\) \[.*32\], expected tensor\(float\) \(\?, 64\)"),
        (dict(vocab=json.dumps(list("abc"))), r"logits.*expected tensor\(float\) \(\?, \?, 3\)"),
    ],
)
def test_onnx_with_bad_metadata(tmp_path, small_onnx, changes, message):
    path = _with_metadata(small_onnx, tmp_path / "m.onnx", **changes)
    with pytest.raises(ModelFileError, match=message):
        Generator.load(path)


def test_onnx_with_the_wrong_inputs_and_outputs(tmp_path, small_onnx):
    """A valid ONNX graph with textgen metadata whose signature breaks the contract."""
    import onnx
    from onnx import TensorProto, helper

    meta = {p.key: p.value for p in onnx.load(str(small_onnx)).metadata_props}
    graph = helper.make_graph(
        [helper.make_node("Identity", ["char_ids"], ["logits"]), helper.make_node("Identity", ["h_0"], ["h_0_out"])],
        "wrong",
        [helper.make_tensor_value_info("char_ids", TensorProto.FLOAT, ["B", "T", 45]),
         helper.make_tensor_value_info("h_0", TensorProto.FLOAT, ["B", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", "T", 45]),
         helper.make_tensor_value_info("h_0_out", TensorProto.FLOAT, ["B", 32])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(model)
    onnx.save(model, str(tmp_path / "wrong.onnx"))
    with pytest.raises(ModelFileError) as info:
        OnnxModel.load(tmp_path / "wrong.onnx")
    message = str(info.value)
    assert "does not match the textgen model contract" in message
    assert "input 'char_ids' is tensor(float)" in message and "expected tensor(int32) (?, ?)" in message
    assert "missing input 'c_0'" in message and "missing output 'c_0_out'" in message
    assert "missing input 'sample_noise'" in message and "missing output 'sampled_ids'" in message


# ---------------------------------------------------------------------------------------------
# The generator needs numpy and onnxruntime only


def test_generator_process_imports_no_training_stack(small_onnx, tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        from textgen import Generator
        gen = Generator.load({str(small_onnx)!r})
        text = gen.generate("alice", max_chars=20, seed=1) + "".join(gen.stream("", max_chars=5, seed=1))
        gen.generate_batch(2, max_chars=5, seed=1)
        import serve.cli
        loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({FORBIDDEN!r}))
        loaded += sorted(m for m in sys.modules if m.startswith("textgen.") and m not in {TEXTGEN_BOTTOM!r})
        print(json.dumps({{"text": text, "loaded": loaded}}))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout, not an installed copy
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert len(result["text"]) == 25
    assert result["loaded"] == [], f"the generator imported {result['loaded']}"


# ---------------------------------------------------------------------------------------------
# Metadata a reader would trip over later, and the content hash


def _metadata_of(path: Path) -> dict[str, str]:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize(
    "key, edit, message",
    [
        ("model_config", lambda c: {**c, "seq_len": 0}, r"textgen.model_config: seq_len must be an integer >= 2, got 0"),
        ("model_config", lambda c: {**c, "seq_len": 32.5}, r"seq_len must be an integer >= 2, got 32.5"),
        ("train_config", lambda c: {**c, "val_fraction": 0.999}, r"val_fraction must be in \(0, 0.5\) as in training"),
        ("vocab", lambda v: ["\ud800", *v[1:]], r"textgen.vocab: vocabulary entries must be characters, not UTF-16"),
    ],
)
def test_metadata_values_out_of_range_are_refused_at_load(tmp_path, small_onnx, key, edit, message):
    value = edit(json.loads(_metadata_of(small_onnx)["textgen." + key]))
    path = _with_metadata(small_onnx, tmp_path / "m.onnx", **{key: json.dumps(value)})  # ASCII: \ud800 escaped
    with pytest.raises(ModelFileError, match=message):
        Generator.load(path)


def sealed_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` changed by ``edit(proto)`` and sealed again like an export (so that the
    check under test is the one after the content hash)."""
    from bench.embed import sealed_copy as copy

    return copy(src, dst, edit)


def _largest_float_initializer(proto):
    from onnx import TensorProto

    floats = [t for t in proto.graph.initializer if t.data_type == TensorProto.FLOAT]
    return max(floats, key=lambda t: int(np.prod(t.dims)))


def _scale_2000_weights(proto) -> None:
    from onnx import numpy_helper

    t = _largest_float_initializer(proto)
    w = numpy_helper.to_array(t).copy()
    w.reshape(-1)[:2000] *= 50
    t.CopyFrom(numpy_helper.from_array(w, t.name))


def _edit_vocabulary(change):
    def edit(proto) -> None:
        for p in proto.metadata_props:
            if p.key == "textgen.vocab":
                p.value = json.dumps(change(json.loads(p.value)), ensure_ascii=False)
    return edit


def _swap(v: list[str]) -> list[str]:
    return [*v[:10], v[11], v[10], *v[12:]]


def _shift_one_entry(v: list[str]) -> list[str]:
    """Still sorted and distinct: one character becomes its successor (not in the vocabulary)."""
    i = next(i for i in range(len(v) - 1) if ord(v[i + 1]) - ord(v[i]) > 1)
    return [*v[:i], chr(ord(v[i]) + 1), *v[i + 1:]]


MODIFIED = r"was modified after export \(content hash mismatch\); export it again"


@pytest.mark.parametrize("edit, message", [
    (_scale_2000_weights, MODIFIED),
    (_edit_vocabulary(_shift_one_entry), MODIFIED),
    (_edit_vocabulary(_swap), "vocabulary characters must be sorted"),  # caught before the hash
])
def test_a_model_changed_after_export_is_refused(tmp_path, small_onnx, edit, message):
    import onnx

    proto = onnx.load(str(small_onnx))
    edit(proto)
    onnx.save(proto, str(tmp_path / "changed.onnx"))
    with pytest.raises(ModelFileError, match=message):
        Generator.load(tmp_path / "changed.onnx")


def test_the_untouched_file_and_an_older_export_without_a_hash_load(tmp_path, small_onnx):
    from textgen import contract as C

    assert C.META_CONTENT_SHA256 in _metadata_of(small_onnx)
    Generator.load(small_onnx)
    old = _with_metadata(small_onnx, tmp_path / "old.onnx", content_sha256=None)
    assert C.content_sha256(old.read_bytes()) is None
    assert Generator.load(old).generate("alice", max_chars=20, seed=1) == Generator.load(small_onnx).generate(
        "alice", max_chars=20, seed=1)
    resealed = sealed_copy(small_onnx, tmp_path / "again.onnx", lambda proto: None)
    Generator.load(resealed)  # the scheme a reader recomputes is the exporter's


def test_the_content_hash_can_be_recomputed_from_the_file_alone(small_onnx):
    import hashlib

    from textgen import contract as C

    data = Path(small_onnx).read_bytes()
    stored = _metadata_of(small_onnx)[C.META_CONTENT_SHA256]
    assert data.count(C.CONTENT_HASH_PREFIX) == 1
    zeroed = data.replace(C.CONTENT_HASH_PREFIX + stored.encode(), C.CONTENT_HASH_PREFIX + b"0" * 64)
    assert hashlib.sha256(zeroed).hexdigest() == stored


# ---------------------------------------------------------------------------------------------
# The noise: format 2's hash noise, format 1's PCG64


def _texts_by_hand(model: OnnxModel, prompt: str, n: int, noise: np.ndarray) -> str:
    """The text the graph makes for ``prompt`` with ``noise`` (n, V): one call, no generator."""
    ids = np.array([[model.vocabulary.index[c] for c in prompt]], np.int32)
    sampled, _ = model.chunk(ids, model.zero_state(1), noise[None].astype(np.float32), model.settings(1, 0.9))
    return "".join(model.vocabulary.chars[i] for i in sampled[0])


def test_format_2_texts_follow_from_the_documented_hash_alone(gen):
    """The noise of docs/format.md computed one value at a time in plain Python
    (``textgen.contract.hash_gumbel``) makes the generator's text."""
    from textgen.contract import hash_gumbel

    assert gen.model.info.format_version == 2 and gen.model.info.noise == "textgen-hash32-gumbel-v1"
    v = gen.model.info.vocab_size
    noise = np.array([[hash_gumbel(2**63 - 1 + 3, j, i) for i in range(v)] for j in range(60)])
    expected = _texts_by_hand(gen.model, "alice was ", 60, noise)
    assert gen.generate("alice was ", max_chars=60, temperature=0.9, seed=2**63 - 1 + 3) == expected
    assert gen.generate_batch(["alice was "] * 4, max_chars=60, temperature=0.9, seed=2**63 - 1)[3] == expected


def test_a_format_1_file_still_loads_and_keeps_its_pcg64_texts(tmp_path, small_onnx, gen):
    from bench.embed import as_format_1

    old = OnnxModel.load(sealed_copy(small_onnx, tmp_path / "v1.onnx", as_format_1))
    assert old.info.format_version == 1 and old.info.noise == "numpy-pcg64-gumbel"
    assert [o.name for o in old.session.get_outputs()][-1] == "sampled_ids"
    noise = np.random.default_rng(5).gumbel(size=(80, old.info.vocab_size))
    text = Generator(old).generate("alice was ", max_chars=80, temperature=0.9, seed=5)
    assert text == _texts_by_hand(old, "alice was ", 80, noise)
    assert text != gen.generate("alice was ", max_chars=80, temperature=0.9, seed=5)


def test_metadata_json_holds_the_metadata_for_bindings_without_metadata_props(small_onnx, gen):
    """One cheap call (B = 1, T = 1, K = 0) fetches ``metadata_json``: every metadata value but the
    content hash, parsed."""
    model = gen.model
    feed = {"char_ids": np.zeros((1, 1), np.int32), **dict(zip(model.info.state_inputs, model.zero_state(1))),
            "sample_noise": np.zeros((1, 0, model.info.vocab_size), np.float32), **model.settings(1)}
    (raw,) = model.session.run(["metadata_json"], feed)
    assert raw.dtype == np.uint8
    values = json.loads(raw.tobytes().decode("utf-8"))
    meta = _metadata_of(small_onnx)
    assert set(values) == set(meta) - {"textgen.content_sha256"}
    assert values.pop("textgen.exported_at") == meta["textgen.exported_at"]  # a plain string, not JSON
    assert all(values[k] == json.loads(meta[k]) for k in values)
    assert tuple(values["textgen.vocab"]) == gen.vocab and values["textgen.format_version"] == 2
