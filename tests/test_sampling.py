"""The sampling rule (``serve.sampling.sample_rows``) with a fake model whose logits spell a known
word (keras-hub ``top_k_sampler_test`` style): no onnxruntime, deterministic, milliseconds. The
rule is the exported graph's (Gumbel-max, top-k and top-p side by side); tests/test_generator.py
checks the graph samples the same. Also the checks of a request's parameters (``serve.params``)."""

from __future__ import annotations

import numpy as np
import pytest

from serve import GeneratorError
from serve.params import Limits, ParamError, SamplingParams
from serve.sampling import RowNoise, row_rng, sample_rows

VOCAB = "abcdefghijklmnopqrstuvwxyz "
V = len(VOCAB)
WORD = "the quick brown fox"


def fake_logits(step: int, batch: int = 1, peak: float = 5.0) -> np.ndarray:
    """(B, V) logits: every character 0, the WORD's character at this step ``peak``."""
    logits = np.zeros((batch, V), np.float32)
    logits[:, VOCAB.index(WORD[step % len(WORD)])] = peak
    return logits


def sample(logits, noise=None, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """``sample_rows`` with one setting for every row (greedy rows get zero noise)."""
    logits = np.asarray(logits, np.float32)
    b = len(logits)
    if noise is None:
        noise = np.zeros_like(logits)
    return sample_rows(logits, noise, np.full(b, temperature), np.full(b, top_k), np.full(b, top_p))


def kept(logits, temperature=1.0, top_k=0, top_p=1.0) -> np.ndarray:
    """(B, V) bool: which characters the rule can draw (an overwhelming noise on each in turn)."""
    logits = np.asarray(logits, np.float32)
    out = np.zeros(logits.shape, bool)
    for c in range(logits.shape[1]):
        noise = np.zeros_like(logits)
        noise[:, c] = 1e30
        out[:, c] = sample(logits, noise, temperature, top_k, top_p) == c
    return out


def spell(temperature=1.0, top_k=0, top_p=1.0, seed: int = 0, peak: float = 5.0, n: int = len(WORD),
          chunk: int = 1) -> str:
    """The fake model's text: noise taken ``chunk`` steps at a time, as the generator does."""
    noise = RowNoise([row_rng(seed, temperature == 0)], V)
    out = []
    while len(out) < n:
        block = noise.take(min(chunk, n - len(out)))  # (1, K, V)
        for k in range(block.shape[1]):
            out.append(VOCAB[sample(fake_logits(len(out), peak=peak), block[:, k], temperature, top_k, top_p)[0]])
    return "".join(out)


def gumbel(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gumbel(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Greedy and the extremes


def test_greedy_spells_the_word():
    assert spell(temperature=0, peak=0.01) == WORD


def test_greedy_needs_no_noise_and_takes_the_first_of_ties():
    ids = sample(np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]], np.float32), temperature=0)
    assert ids.tolist() == [1, 0] and ids.dtype == np.int32


@pytest.mark.parametrize("temperature", [1e-6, 1e-30])
def test_temperature_towards_zero_is_greedy(temperature):
    # A flat-ish distribution (peak 0.5 over 27 characters) is sampled as argmax at a tiny temperature.
    assert spell(temperature=temperature, peak=0.5) == WORD


def test_top_k_1_is_greedy_at_any_temperature():
    for seed in range(5):
        assert spell(temperature=5.0, top_k=1, seed=seed, peak=0.1) == WORD


def test_tiny_top_p_is_greedy():
    assert spell(temperature=3.0, top_p=1e-9, peak=0.1) == WORD


def test_sampling_follows_the_model_when_it_is_confident():
    assert spell(temperature=1.0, peak=30.0) == WORD


def test_high_temperature_is_close_to_uniform():
    logits = np.tile(fake_logits(0, peak=3.0), (20_000, 1))
    ids = sample(logits, gumbel(logits.shape), temperature=1e6)
    counts = np.bincount(ids, minlength=V)
    assert counts.min() > 0.8 * len(ids) / V and counts.max() < 1.2 * len(ids) / V


# ---------------------------------------------------------------------------------------------
# The draw: Gumbel-max


def test_gumbel_max_frequencies_match_the_softmax():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    ids = sample(np.tile(logits, (50_000, 1)), gumbel((50_000, 4), seed=1), temperature=1.0)
    freq = np.bincount(ids, minlength=4) / 50_000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)


def test_temperature_reshapes_the_frequencies():
    logits = np.log(np.array([[0.2, 0.8]], np.float32))
    ids = sample(np.tile(logits, (50_000, 1)), gumbel((50_000, 2), seed=2), temperature=0.5)
    expected = np.array([0.2, 0.8]) ** 2 / (0.2**2 + 0.8**2)  # p^(1/T), renormalised
    np.testing.assert_allclose(np.bincount(ids, minlength=2) / 50_000, expected, atol=0.01)


def test_masked_characters_are_never_drawn_whatever_the_noise():
    logits = np.array([[0.0, 5.0, 4.0, -1.0]] * 1000, np.float32)
    noise = gumbel((1000, 4), seed=3) * 10  # far wilder than any real noise
    ids = sample(logits, noise, temperature=1.0, top_k=2)
    assert set(ids.tolist()) == {1, 2}


# ---------------------------------------------------------------------------------------------
# Filters


def test_top_k_keeps_exactly_k_unless_tied():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
    out = kept(logits, top_k=2)
    assert out[0].tolist() == [False, True, True, False]
    assert out[1].tolist() == [True, True, True, False]  # ties at the k-th value stay


def test_top_k_at_or_above_vocabulary_is_off():
    logits = fake_logits(3, batch=2)
    for k in (V, V + 10):
        assert kept(logits, top_k=k).all()
    noise = gumbel((2, V))
    assert (sample(logits, noise, 0.7, top_k=100) == sample(logits, noise, 0.7)).all()


@pytest.mark.parametrize("p, n_kept", [(0.4, 1), (0.6, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(p, n_kept):
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))
    out = kept(logits, top_p=p)
    assert int(out.sum()) == n_kept
    order = [1, 3, 2, 0]  # most probable first
    assert out[0, order[:n_kept]].all()


def test_top_p_one_is_off_even_for_vanishing_probabilities():
    logits = np.array([[0.0, -200.0, -300.0]], np.float32)  # exp underflows: the cumulative sum is 1
    assert kept(logits, top_p=1.0).all()
    noise = np.array([[0.0, 500.0, 0.0]], np.float32)  # only absurd noise picks character 1
    assert sample(logits, noise, 1.0, top_p=1.0)[0] == 1
    assert sample_rows(logits, noise, [1.0], [0], [1.0])[0] == 1


def test_top_k_and_top_p_judge_the_same_distribution():
    """The graph's rule: a character must pass both filters, top-p measured on the whole
    temperature-scaled distribution (not renormalised to the top-k, as HF transformers does)."""
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32))
    assert kept(logits, 1.0, top_k=2, top_p=0.5).tolist() == [[True, True, False, False]]  # HF-style would keep 1
    assert kept(logits, 1.0, top_k=3, top_p=0.5).tolist() == [[True, True, False, False]]  # top-p is the tighter


def test_the_rule_is_pure_and_the_filters_keep_the_argmax():
    logits = np.random.default_rng(4).normal(size=(3, V)).astype(np.float32)
    before = logits.copy()
    for settings in (dict(temperature=0.5), dict(top_k=3), dict(top_p=0.5)):
        out = kept(logits, **settings)
        np.testing.assert_array_equal(logits, before)
        assert out[np.arange(3), logits.argmax(-1)].all()
        assert out.shape == logits.shape


def test_the_filters_judge_the_temperature_scaled_logits():
    """Temperature first, then top-k and top-p side by side: a character must pass both."""
    logits = np.random.default_rng(5).normal(size=(2, V)).astype(np.float32)
    both = kept(logits, 0.5, top_k=5, top_p=0.9)
    np.testing.assert_array_equal(both, kept(logits, 0.5, top_k=5) & kept(logits, 0.5, top_p=0.9))
    np.testing.assert_array_equal(kept(logits, 0.5, top_k=5), kept(logits * 2, 1.0, top_k=5))
    assert kept(logits, 0.9).all()  # no filter: everything can be drawn


def test_sample_rows_per_row_equals_each_row_alone():
    """The vectorised per-row rule (what the graph does for a batch) equals each row sampled by
    itself, bit for bit, greedy rows included (they get zero noise)."""
    rng = np.random.default_rng(0)
    for trial in range(200):
        b = int(rng.integers(1, 40))
        logits = (rng.normal(size=(b, 45)) * rng.uniform(0.1, 8)).astype(np.float32)
        if trial % 3 == 0:
            logits[:, :5] = logits[:, :1]  # ties
        t = rng.choice([0, 0.5, 1.0, 0.8, 1.7, 1e-3], size=b)
        k = rng.choice([0, 1, 3, 10, 44, 45, 100], size=b)
        p = rng.choice([1.0, 0.9, 0.5, 0.01], size=b)
        noise = rng.gumbel(size=(b, 45)).astype(np.float32) * (t > 0)[:, None]
        expected = [sample(logits[i : i + 1], noise[i : i + 1], t[i], int(k[i]), p[i])[0] for i in range(b)]
        np.testing.assert_array_equal(sample_rows(logits, noise, t, k, p), expected)


# ---------------------------------------------------------------------------------------------
# Noise: seeds, chunks, batches


def test_same_seed_same_text_and_different_seeds_differ():
    assert spell(1.5, seed=7, peak=1.0) == spell(1.5, seed=7, peak=1.0)
    assert len({spell(1.5, seed=s, peak=1.0) for s in range(5)}) == 5


def test_the_text_does_not_depend_on_the_chunk_size():
    texts = {spell(2.0, top_p=0.9, seed=3, peak=1.0, n=60, chunk=c) for c in (1, 4, 7, 32, 60)}
    assert len(texts) == 1


def test_greedy_rows_get_zeros_and_draw_nothing():
    rng = np.random.default_rng(1)
    noise = RowNoise([None, rng], 4)
    block = noise.take(3)
    assert block.shape == (2, 3, 4) and block.dtype == np.float32
    assert not block[0].any() and block[1].any()
    assert np.array_equal(block[1], np.random.default_rng(1).gumbel(size=(3, 4)).astype(np.float32))
    assert row_rng(1, greedy=True) is None and row_rng(2, greedy=True) is None
    assert noise.take(0).shape == (2, 0, 4)


def test_batch_rows_are_independent_of_each_other():
    """Row i of a batch equals the same row run alone, also after other rows left the batch and
    new ones joined, whatever the chunk sizes."""
    settings, steps = dict(temperature=2.0, top_p=0.9), 40

    def alone(seed, start=0, n=steps):  # the row by itself, its characters from step `start` on
        noise = RowNoise([np.random.default_rng(seed)], V).take(n)[0]  # (n, V)
        return [int(sample(fake_logits(start + t, peak=1.0), noise[t : t + 1], **settings)[0]) for t in range(n)]

    noise = RowNoise([np.random.default_rng(s) for s in (3, 4, 5)], V)
    rows, t, got = [3, 4, 5], 0, {3: [], 4: [], 5: [], 6: []}
    for chunk in (5, 6, 7, 9, 13):
        block = noise.take(chunk)
        for k in range(chunk):
            ids = sample(fake_logits(t + k, batch=len(rows), peak=1.0), block[:, k], **settings)
            for r, i in zip(rows, ids):
                got[r].append(int(i))
        t += chunk
        if t == 11:  # seed 4 finishes, seed 6 joins
            noise.keep([0, 2])
            noise.extend([np.random.default_rng(6)])
            rows = [3, 5, 6]
            assert len(noise) == 3
    assert t == steps
    assert got[3] == alone(3) and got[5] == alone(5) and got[4] == alone(4)[:11]
    assert got[6] == alone(6, start=11, n=steps - 11)


# ---------------------------------------------------------------------------------------------
# A request's parameters (serve.params): checked once, the field named


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("nan")), "temperature must be finite"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(temperature="hot"), "temperature must be a number"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_k=True), "top_k must be an integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_p=-0.2), r"top_p must be in \(0, 1\]"),
    ],
)
def test_bad_arguments_are_rejected_with_clear_messages(kwargs, message):
    with pytest.raises(ParamError, match=message) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, GeneratorError) and isinstance(info.value, ValueError)
    assert info.value.field == next(iter(kwargs))


def test_every_bad_field_is_named_once_in_both_phrasings():
    with pytest.raises(ParamError) as info:
        SamplingParams(temperature=-1, top_p=2, n=0)
    assert info.value.fields == ["temperature", "top_p", "n"]
    assert "temperature must be >= 0" in str(info.value) and "number of samples must be at least 1" in str(info.value)
    assert info.value.detail().startswith("temperature: greater than or equal to 0, got -1; top_p: less than")


def test_limits_cap_what_a_request_may_ask_for():
    server = Limits.server(max_chars=2000, max_prompt_chars=300, max_n=4)
    for kwargs, field, detail in [
        (dict(max_chars=0), "max_chars", "greater than or equal to 1"),
        (dict(max_chars=2001), "max_chars", "less than or equal to 2000, got 2001 (this server's cap is max_chars_cap)"),
        (dict(n=5), "n", "less than or equal to 4"),
        (dict(temperature=1000), "temperature", "less than or equal to 100"),
        (dict(stop=["x"] * 9), "stop", "at most 8 strings"),
        (dict(stop="y" * 65), "stop", "each of 1 to 64 characters"),
    ]:
        with pytest.raises(ParamError) as info:
            SamplingParams(**kwargs, limits=server)
        assert info.value.fields == [field] and detail in info.value.detail(), kwargs
    assert SamplingParams(max_chars=0).max_chars == 0  # a Generator's: nothing to make is fine
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b") and SamplingParams(temperature=0).greedy


# ---------------------------------------------------------------------------------------------
# Format 2's noise: the numpy source equals the documented hash, value for value


@pytest.mark.parametrize("seed", [0, 1, 7, 2**32 - 1, 2**32, 2**63 - 1, 2**63 + 9, 2**64 + 5])
def test_hash_noise_equals_the_pure_python_reference(seed):
    from serve.sampling import HashNoise
    from textgen.contract import hash_gumbel

    source = HashNoise(seed)
    blocks = np.concatenate([source.gumbel(size=(k, 45)) for k in (3, 0, 1, 17)])  # taken in pieces
    expected = np.array([[hash_gumbel(seed, j, v) for v in range(45)] for j in range(21)], np.float32)
    np.testing.assert_array_equal(blocks, expected)
    assert blocks.dtype == np.float32


def test_the_hash_is_lowbias32_and_its_gumbel_table_is_pinned():
    """lowbias32 on known values; g(k) for every 24-bit k: numpy's table (its sha256 is in
    docs/format.md, which the JS tests check too) equals the pure-Python reference on a stride of
    it, and is -log(-log(u)) to float32 accuracy (libm's log is not used: it differs between
    libraries in the last bit, which a float32 rounding sometimes shows)."""
    import hashlib
    import math

    from serve.sampling import gumbel_of_bits
    from serve.sampling import lowbias32 as np_lowbias32
    from textgen.contract import GUMBEL_TABLE_SHA256, lowbias32
    from textgen.contract import gumbel_of_bits as py_gumbel_of_bits

    assert [lowbias32(x) for x in (0, 1, 0xFFFFFFFF, 0x9E3779B9)] == [0, 0x688990C0, 0x6768824A, 0x1FCE552]  # C's
    xs = np.array([0, 1, 0xFFFFFFFF, 12345, 0x9E3779B9], np.uint32)
    assert np_lowbias32(xs).tolist() == [lowbias32(int(x)) for x in xs]
    table = gumbel_of_bits(np.arange(1 << 24, dtype=np.uint32))
    assert table.dtype == np.float32
    assert hashlib.sha256(table.astype("<f4").tobytes()).hexdigest() == GUMBEL_TABLE_SHA256
    assert table[::101].tolist() == [py_gumbel_of_bits(k) for k in range(0, 1 << 24, 101)]
    u = (np.arange(1 << 24) + 0.5) / (1 << 24)
    assert np.abs(table - -np.log(-np.log(u))).max() < 1e-6
    assert math.isclose(float(table.astype(np.float64).mean()), np.euler_gamma, abs_tol=1e-6)


def test_row_sources_follow_the_file_noise():
    from serve.sampling import HashNoise

    assert isinstance(row_rng(3, False), HashNoise)
    assert isinstance(row_rng(3, False, "numpy-pcg64-gumbel"), np.random.Generator)
    assert isinstance(row_rng(None, False), HashNoise) and row_rng(None, True, "textgen-hash32-gumbel-v1") is None


@pytest.mark.parametrize("limit", [None, 1, 5, 200])
def test_hash_noise_is_the_same_whatever_the_lookahead_and_limit(limit):
    from serve.sampling import HashNoise

    whole = HashNoise(11).gumbel(size=(300, 7))
    source = HashNoise(11, limit)
    pieces = [source.gumbel(size=(k, 7)) for k in (1, 0, 4, 130, 2, 163)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
