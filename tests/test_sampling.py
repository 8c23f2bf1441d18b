"""Sampler tests with a fake model whose logits spell a known word (keras-hub ``top_k_sampler_test``
style): no onnxruntime, deterministic, milliseconds. The rule is the exported graph's (Gumbel-max,
top-k and top-p side by side); tests/test_generator.py checks the graph samples the same."""

from __future__ import annotations

import numpy as np
import pytest

from serve import GeneratorError
from serve.sampling import (
    RowNoise,
    Sampler,
    SamplingError,
    Temperature,
    TopK,
    TopP,
    row_rngs,
    sample_rows,
    softmax,
)

VOCAB = "abcdefghijklmnopqrstuvwxyz "
V = len(VOCAB)
WORD = "the quick brown fox"


def fake_logits(step: int, batch: int = 1, peak: float = 5.0) -> np.ndarray:
    """(B, V) logits: every character 0, the WORD's character at this step ``peak``."""
    logits = np.zeros((batch, V), np.float32)
    logits[:, VOCAB.index(WORD[step % len(WORD)])] = peak
    return logits


def spell(sampler: Sampler, seed: int = 0, peak: float = 5.0, n: int = len(WORD), chunk: int = 1) -> str:
    """The fake model's text: noise taken ``chunk`` steps at a time, as the generator does."""
    noise = RowNoise(row_rngs([seed], sampler.greedy), V)
    out = []
    while len(out) < n:
        block = noise.take(min(chunk, n - len(out)))  # (1, K, V)
        for k in range(block.shape[1]):
            out.append(VOCAB[sampler(fake_logits(len(out), peak=peak), block[:, k])[0]])
    return "".join(out)


def gumbel(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).gumbel(size=shape).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Greedy and the extremes


def test_greedy_spells_the_word():
    assert spell(Sampler(temperature=0), peak=0.01) == WORD


def test_greedy_needs_no_noise_and_takes_the_first_of_ties():
    ids = Sampler(temperature=0)(np.array([[1.0, 3.0, 3.0], [0.0, 0.0, 0.0]], np.float32))
    assert ids.tolist() == [1, 0] and ids.dtype == np.int32


@pytest.mark.parametrize("temperature", [1e-6, 1e-30])
def test_temperature_towards_zero_is_greedy(temperature):
    # A flat-ish distribution (peak 0.5 over 27 characters) is sampled as argmax at a tiny temperature.
    assert spell(Sampler(temperature=temperature), peak=0.5) == WORD


def test_top_k_1_is_greedy_at_any_temperature():
    for seed in range(5):
        assert spell(Sampler(temperature=5.0, top_k=1), seed=seed, peak=0.1) == WORD


def test_tiny_top_p_is_greedy():
    assert spell(Sampler(temperature=3.0, top_p=1e-9), peak=0.1) == WORD


def test_sampling_follows_the_model_when_it_is_confident():
    assert spell(Sampler(temperature=1.0), peak=30.0) == WORD


def test_high_temperature_is_close_to_uniform():
    logits = np.tile(fake_logits(0, peak=3.0), (20_000, 1))
    ids = Sampler(temperature=1e6)(logits, gumbel(logits.shape))
    counts = np.bincount(ids, minlength=V)
    assert counts.min() > 0.8 * len(ids) / V and counts.max() < 1.2 * len(ids) / V


# ---------------------------------------------------------------------------------------------
# The draw: Gumbel-max


def test_gumbel_max_frequencies_match_the_softmax():
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    ids = Sampler(temperature=1.0)(np.tile(logits, (50_000, 1)), gumbel((50_000, 4), seed=1))
    freq = np.bincount(ids, minlength=4) / 50_000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)


def test_temperature_reshapes_the_frequencies():
    logits = np.log(np.array([[0.2, 0.8]], np.float32))
    ids = Sampler(temperature=0.5)(np.tile(logits, (50_000, 1)), gumbel((50_000, 2), seed=2))
    expected = np.array([0.2, 0.8]) ** 2 / (0.2**2 + 0.8**2)  # p^(1/T), renormalised
    np.testing.assert_allclose(np.bincount(ids, minlength=2) / 50_000, expected, atol=0.01)


def test_masked_characters_are_never_drawn_whatever_the_noise():
    logits = np.array([[0.0, 5.0, 4.0, -1.0]] * 1000, np.float32)
    noise = gumbel((1000, 4), seed=3) * 10  # far wilder than any real noise
    ids = Sampler(temperature=1.0, top_k=2)(logits, noise)
    assert set(ids.tolist()) == {1, 2}


# ---------------------------------------------------------------------------------------------
# Filters


def test_top_k_keeps_exactly_k_unless_tied():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
    out = TopK(2)(logits)
    assert np.isfinite(out[0]).tolist() == [False, True, True, False]
    assert np.isfinite(out[1]).tolist() == [True, True, True, False]  # ties at the k-th value stay
    assert out[0, 1] == 4.0  # kept logits are unchanged


def test_top_k_at_or_above_vocabulary_is_off():
    logits = fake_logits(3, batch=2)
    for k in (V, V + 10):
        np.testing.assert_array_equal(TopK(k)(logits), logits)
    noise = gumbel((2, V))
    assert (Sampler(0.7, top_k=100)(logits, noise) == Sampler(0.7)(logits, noise)).all()


@pytest.mark.parametrize("p, kept", [(0.4, 1), (0.6, 2), (0.85, 3), (0.97, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))
    out = TopP(p)(logits)
    assert int(np.isfinite(out).sum()) == kept
    order = [1, 3, 2, 0]  # most probable first
    assert np.isfinite(out[0, order[:kept]]).all()


def test_top_p_one_is_off_even_for_vanishing_probabilities():
    logits = np.array([[0.0, -200.0, -300.0]], np.float32)  # exp underflows: the cumulative sum is 1
    np.testing.assert_array_equal(TopP(1.0)(logits), logits)
    noise = np.array([[0.0, 500.0, 0.0]], np.float32)  # only absurd noise picks character 1
    assert Sampler(1.0, top_p=1.0)(logits, noise)[0] == 1
    assert sample_rows(logits, noise, [1.0], [0], [1.0])[0] == 1


def test_top_k_and_top_p_judge_the_same_distribution():
    """The graph's rule: a character must pass both filters, top-p measured on the whole
    temperature-scaled distribution (not renormalised to the top-k, as HF transformers does)."""
    logits = np.log(np.array([[0.4, 0.3, 0.2, 0.1]], np.float32))
    out = Sampler(1.0, top_k=2, top_p=0.5).process(logits)
    assert np.isfinite(out).tolist() == [[True, True, False, False]]  # HF-style would keep 1
    out = Sampler(1.0, top_k=3, top_p=0.5).process(logits)
    assert np.isfinite(out).tolist() == [[True, True, False, False]]  # top-p is the tighter here


def test_processors_are_pure_and_keep_the_argmax():
    logits = np.random.default_rng(4).normal(size=(3, V)).astype(np.float32)
    before = logits.copy()
    for processor in (Temperature(0.5), TopK(3), TopP(0.5)):
        out = processor(logits)
        np.testing.assert_array_equal(logits, before)
        assert (out.argmax(-1) == logits.argmax(-1)).all()
        assert out.dtype == np.float32 and out.shape == logits.shape


def test_sampler_is_temperature_then_both_filters():
    sampler = Sampler(temperature=0.5, top_k=5, top_p=0.9)
    assert [type(f) for f in sampler.filters] == [TopK, TopP]
    assert len(Sampler(0.9, top_k=0, top_p=1.0).filters) == 0
    logits = np.random.default_rng(5).normal(size=(2, V)).astype(np.float32)
    scaled = Temperature(0.5)(logits)
    np.testing.assert_array_equal(sampler.process(logits), np.minimum(TopK(5)(scaled), TopP(0.9)(scaled)))


def test_sample_rows_equals_a_sampler_per_row():
    """The vectorised per-row rule (what the graph does for a batch) equals one Sampler per row,
    bit for bit, greedy rows included (they get zero noise)."""
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
        expected = [Sampler(t[i], int(k[i]), p[i])(logits[i : i + 1], noise[i : i + 1])[0] for i in range(b)]
        np.testing.assert_array_equal(sample_rows(logits, noise, t, k, p), expected)


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0, -np.inf]], np.float32))
    assert np.isclose(p.sum(), 1.0) and p[0, 2] == 0.0


# ---------------------------------------------------------------------------------------------
# Noise: seeds, chunks, batches


def test_same_seed_same_text_and_different_seeds_differ():
    sampler = Sampler(temperature=1.5)
    assert spell(sampler, seed=7, peak=1.0) == spell(sampler, seed=7, peak=1.0)
    assert len({spell(sampler, seed=s, peak=1.0) for s in range(5)}) == 5


def test_the_text_does_not_depend_on_the_chunk_size():
    sampler = Sampler(temperature=2.0, top_p=0.9)
    texts = {spell(sampler, seed=3, peak=1.0, n=60, chunk=c) for c in (1, 4, 7, 32, 60)}
    assert len(texts) == 1


def test_greedy_rows_get_zeros_and_draw_nothing():
    rng = np.random.default_rng(1)
    noise = RowNoise([None, rng], 4)
    block = noise.take(3)
    assert block.shape == (2, 3, 4) and block.dtype == np.float32
    assert not block[0].any() and block[1].any()
    assert np.array_equal(block[1], np.random.default_rng(1).gumbel(size=(3, 4)).astype(np.float32))
    assert row_rngs([1, 2], greedy=True) == [None, None]
    assert noise.take(0).shape == (2, 0, 4)


def test_batch_rows_are_independent_of_each_other():
    """Row i of a batch equals the same row run alone, also after other rows left the batch and
    new ones joined, whatever the chunk sizes."""
    sampler, steps = Sampler(temperature=2.0, top_p=0.9), 40

    def alone(seed, start=0, n=steps):  # the row by itself, its characters from step `start` on
        noise = RowNoise([np.random.default_rng(seed)], V).take(n)[0]  # (n, V)
        return [int(sampler(fake_logits(start + t, peak=1.0), noise[t : t + 1])[0]) for t in range(n)]

    noise = RowNoise([np.random.default_rng(s) for s in (3, 4, 5)], V)
    rows, t, got = [3, 4, 5], 0, {3: [], 4: [], 5: [], 6: []}
    for chunk in (5, 6, 7, 9, 13):
        block = noise.take(chunk)
        for k in range(chunk):
            ids = sampler(fake_logits(t + k, batch=len(rows), peak=1.0), block[:, k])
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
# Arguments


def test_sampling_without_noise_is_refused():
    with pytest.raises(SamplingError, match="Gumbel noise"):
        Sampler(temperature=1.0)(fake_logits(0))


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
    with pytest.raises(SamplingError, match=message) as info:
        Sampler(**kwargs)
    assert isinstance(info.value, GeneratorError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Temperature(0), "temperature 0 means greedy"),
        (lambda: TopK(0), "top_k must be >= 1"),
        (lambda: TopP(0), r"top_p must be in \(0, 1\]"),
    ],
)
def test_processor_constructors_reject_bad_values(make, message):
    with pytest.raises(SamplingError, match=message):
        make()
