"""Sampler tests with a fake model whose logits spell a known word (keras-hub ``top_k_sampler_test``
style): no onnxruntime, deterministic, milliseconds."""

from __future__ import annotations

import numpy as np
import pytest

from serve import GeneratorError
from serve.sampling import RowUniforms, Sampler, SamplingError, Temperature, TopK, TopP, draw, softmax

VOCAB = "abcdefghijklmnopqrstuvwxyz "
WORD = "the quick brown fox"


def fake_logits(step: int, batch: int = 1, peak: float = 5.0) -> np.ndarray:
    """(B, V) logits: every character 0, the WORD's character at this step ``peak``."""
    logits = np.zeros((batch, len(VOCAB)), np.float32)
    logits[:, VOCAB.index(WORD[step % len(WORD)])] = peak
    return logits


def spell(sampler: Sampler, seed: int = 0, peak: float = 5.0, n: int = len(WORD)) -> str:
    uniforms = RowUniforms([np.random.default_rng(seed)])
    return "".join(VOCAB[sampler(fake_logits(t, peak=peak), uniforms.next())[0]] for t in range(n))


def test_greedy_spells_the_word():
    assert spell(Sampler(temperature=0), peak=0.01) == WORD


def test_greedy_needs_no_uniforms_and_takes_the_first_of_ties():
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
    rng = np.random.default_rng(0)
    logits = np.tile(fake_logits(0, peak=3.0), (20_000, 1))
    ids = Sampler(temperature=1e6)(logits, rng.random(len(logits)))
    counts = np.bincount(ids, minlength=len(VOCAB))
    assert counts.min() > 0.8 * len(ids) / len(VOCAB) and counts.max() < 1.2 * len(ids) / len(VOCAB)


def test_draw_frequencies_match_the_softmax():
    rng = np.random.default_rng(1)
    logits = np.log(np.array([[0.1, 0.2, 0.3, 0.4]], np.float32))
    ids = draw(np.tile(logits, (50_000, 1)), rng.random(50_000))
    freq = np.bincount(ids, minlength=4) / 50_000
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.3, 0.4], atol=0.01)


def test_draw_is_an_exact_inverse_cdf_and_never_picks_masked_characters():
    logits = np.log(np.array([[0.25, 0.25, 0.5]] * 5, np.float32))
    assert draw(logits, np.array([0.0, 0.2499, 0.25, 0.74, 0.999999])).tolist() == [0, 0, 1, 2, 2]
    masked = np.array([[-np.inf, 0.0, -np.inf]] * 3, np.float32)
    assert draw(masked, np.array([0.0, 0.5, 1 - 2**-53])).tolist() == [1, 1, 1]


def test_top_k_keeps_exactly_k_unless_tied():
    logits = np.array([[1.0, 4.0, 3.0, 2.0], [1.0, 1.0, 1.0, 0.0]], np.float32)
    out = TopK(2)(logits)
    assert np.isfinite(out[0]).tolist() == [False, True, True, False]
    assert np.isfinite(out[1]).tolist() == [True, True, True, False]  # ties at the k-th value stay
    assert out[0, 1] == 4.0  # kept logits are unchanged


def test_top_k_at_or_above_vocabulary_is_off():
    logits = fake_logits(3, batch=2)
    for k in (len(VOCAB), len(VOCAB) + 10):
        np.testing.assert_array_equal(TopK(k)(logits), logits)
    u = np.array([0.3, 0.9])
    assert (Sampler(0.7, top_k=100)(logits, u) == Sampler(0.7)(logits, u)).all()


@pytest.mark.parametrize("p, kept", [(0.5, 1), (0.79, 2), (0.8, 2), (0.81, 3), (0.96, 4), (1.0, 4)])
def test_top_p_keeps_the_smallest_nucleus(p, kept):
    logits = np.log(np.array([[0.05, 0.5, 0.15, 0.3]], np.float32))
    out = TopP(p)(logits)
    assert int(np.isfinite(out).sum()) == kept
    order = [1, 3, 2, 0]  # most probable first
    assert np.isfinite(out[0, order[:kept]]).all()


def test_top_p_one_is_off():
    logits = np.random.default_rng(2).normal(size=(4, len(VOCAB))).astype(np.float32)
    u = np.random.default_rng(3).random(4)
    np.testing.assert_array_equal(TopP(1.0)(logits), logits)
    assert (Sampler(0.9, top_p=1.0)(logits, u) == Sampler(0.9)(logits, u)).all()
    assert Sampler(0.9, top_k=0, top_p=1.0).processors[0].__class__ is Temperature
    assert len(Sampler(0.9, top_k=0, top_p=1.0).processors) == 1


def test_processors_are_pure_and_keep_the_argmax():
    logits = np.random.default_rng(4).normal(size=(3, len(VOCAB))).astype(np.float32)
    before = logits.copy()
    for processor in (Temperature(0.5), TopK(3), TopP(0.5)):
        out = processor(logits)
        np.testing.assert_array_equal(logits, before)
        assert (out.argmax(-1) == logits.argmax(-1)).all()
        assert out.dtype == np.float32 and out.shape == logits.shape


def test_order_is_temperature_then_top_k_then_top_p():
    sampler = Sampler(temperature=0.5, top_k=5, top_p=0.9)
    assert [type(p) for p in sampler.processors] == [Temperature, TopK, TopP]
    logits = np.random.default_rng(5).normal(size=(2, len(VOCAB))).astype(np.float32)
    expected = TopP(0.9)(TopK(5)(Temperature(0.5)(logits)))
    np.testing.assert_array_equal(sampler.process(logits), expected)


def test_softmax_rows_sum_to_one():
    p = softmax(np.array([[1000.0, 0.0, -np.inf]], np.float32))
    assert np.isclose(p.sum(), 1.0) and p[0, 2] == 0.0


def test_same_seed_same_text_and_different_seeds_differ():
    sampler = Sampler(temperature=1.5)
    assert spell(sampler, seed=7, peak=1.0) == spell(sampler, seed=7, peak=1.0)
    assert len({spell(sampler, seed=s, peak=1.0) for s in range(5)}) == 5


def test_batch_rows_are_independent_of_each_other():
    """Row i of a batch equals the same row run alone, also after other rows left the batch."""
    sampler, seeds, steps = Sampler(temperature=2.0, top_p=0.9), [3, 4, 5], 40

    def alone(seed):
        u = RowUniforms([np.random.default_rng(seed)])
        return [int(sampler(fake_logits(t, peak=1.0), u.next())[0]) for t in range(steps)]

    u = RowUniforms([np.random.default_rng(s) for s in seeds], block=7)  # block size does not matter
    rows, got = np.arange(3), {r: [] for r in range(3)}
    for t in range(steps):
        if t == 11:  # row 1 finishes
            u.keep(np.array([0, 2]))
            rows = rows[[0, 2]]
        ids = sampler(fake_logits(t, batch=len(rows), peak=1.0), u.next())
        for r, i in zip(rows, ids):
            got[r].append(int(i))
    assert got[0] == alone(3) and got[2] == alone(5) and got[1] == alone(4)[:11]


def test_sampling_without_uniforms_is_refused():
    with pytest.raises(SamplingError, match="uniform"):
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
