import numpy as np
import pytest

from textgen.config import ModelConfig, preset
from textgen.windows import (
    Shard,
    WindowError,
    steps_per_epoch,
    train_dataset,
    train_starts,
    val_dataset,
    val_starts,
)

CFG = ModelConfig(seq_len=10, lstm_units=(8,), embedding_dim=4)
IDS = (np.arange(1003) % 7).astype(np.int32)  # position i holds i % 7


def _batches(ds):
    return [tuple(t.numpy() for t in el) for el in ds]


def test_targets_are_inputs_shifted_by_one():
    ids = np.arange(1003, dtype=np.int32)  # the id is the position: windows are easy to read
    for x, y in _batches(train_dataset(ids, CFG, 2000, 8, epoch=1, seed=0)):
        assert x.shape == (8, 10) and y.shape == (8, 10) and x.dtype == np.int32
        assert np.array_equal(y, x + 1)  # shifted by one
        assert np.all(np.diff(x, axis=1) == 1)  # contiguous windows


def test_windows_do_not_overlap_and_offsets_move():
    starts = {e: np.sort(train_starts(1003, CFG, epoch=e, seed=0)) for e in range(1, 6)}
    for s in starts.values():
        assert np.all(np.diff(s) == CFG.seq_len)  # stride seq_len: no overlap
        assert s[-1] + CFG.seq_len + 1 <= 1003  # the last window fits
    offsets = {int(s[0]) for s in starts.values()}
    assert len(offsets) > 1  # window boundaries move between epochs
    # Same seed and epoch -> same order (resume reproduces the data order).
    assert np.array_equal(train_starts(1003, CFG, 3, 0), train_starts(1003, CFG, 3, 0))
    assert not np.array_equal(train_starts(1003, CFG, 3, 0), train_starts(1003, CFG, 3, 1))


def test_every_epoch_has_the_same_number_of_full_batches():
    steps = steps_per_epoch(1003, CFG, 8)
    for epoch in range(1, 8):
        batches = _batches(train_dataset(IDS, CFG, 7, 8, epoch=epoch, seed=0))
        assert len(batches) == steps == (1003 - 10) // 10 // 8
        assert all(x.shape == (8, 10) for x, _ in batches)  # drop_remainder semantics


def test_shards_partition_the_global_batch_exactly():
    ids = np.arange(1003, dtype=np.int32)
    whole = _batches(train_dataset(ids, CFG, 2000, 8, epoch=2, seed=0))
    # 2 workers x 2 local replicas: each pipeline yields its 2 replicas' parts of every step.
    parts = [_batches(train_dataset(ids, CFG, 2000, 8, 2, 0, Shard(w, 2, 2))) for w in range(2)]
    for step, (x, _) in enumerate(whole):
        pieces = [parts[w][2 * step + r][0] for w in range(2) for r in range(2)]
        assert all(p.shape == (2, 10) for p in pieces)
        assert np.array_equal(np.concatenate(pieces), x)


def test_batch_must_divide_across_replicas():
    with pytest.raises(WindowError, match="not divisible"):
        train_dataset(IDS, CFG, 7, 6, 1, 0, Shard(0, 4, 1))


def test_too_little_text_for_one_batch():
    with pytest.raises(WindowError, match="fewer than one batch"):
        steps_per_epoch(100, CFG, 64)


def test_validation_covers_every_window_once_with_padding():
    ids = np.arange(95, dtype=np.int32)
    ds, steps = val_dataset(ids, CFG, 2000, 4)
    batches = _batches(ds)
    assert steps == len(batches) == 3  # 9 full windows, padded to 12
    x = np.concatenate([b[0] for b in batches])
    w = np.concatenate([b[2] for b in batches])
    assert w.tolist() == [1.0] * 9 + [0.0] * 3
    assert x[:9, 0].tolist() == list(range(0, 90, 10))
    assert np.array_equal(val_starts(95, CFG), np.arange(0, 90, 10))


def test_train_and_validation_never_share_a_window():
    # The split gives each part its own id array, so a window can only hold ids of one part.
    from textgen.text import split_ids

    ids = np.arange(2000, dtype=np.int32)
    train, val = split_ids(ids, 0.1, CFG.seq_len)
    seen_train = np.concatenate([x for x, _ in _batches(train_dataset(train, CFG, 4000, 8, 1, 0))])
    seen_val = np.concatenate([b[0] for b in _batches(val_dataset(val, CFG, 4000, 8)[0])])
    assert seen_train.max() < val[0] and seen_val.min() >= val[0]


def test_seed_kind_reproduces_the_notebook_windows():
    cfg = preset("notebook-1x256").model
    ids = (np.arange(400) % 45).astype(np.int32)
    assert steps_per_epoch(400, cfg, 100) == 3  # 300 stride-1 windows
    x, y = _batches(train_dataset(ids, cfg, 45, 100, 1, 0))[0]
    assert x.shape == (100, 100, 1) and x.dtype == np.float32 and y.shape == (100,)
    # The input is the id scaled by the vocabulary size; the target is the character after it.
    first = np.rint(x[:, 0, 0] * 45).astype(int)
    assert np.array_equal((first + 100) % 45, y)
    assert x.max() < 1.0


def test_windows_from_several_parts_never_span_two():
    # Three shards of different lengths: position i of shard k holds 10000 * k + i.
    parts = [np.arange(10_000 * k, 10_000 * k + n, dtype=np.int32) for k, n in enumerate((333, 95, 575))]
    for x, y in _batches(train_dataset(parts, CFG, 40_000, 8, epoch=3, seed=1)):
        w = np.concatenate([x, y[:, -1:]], axis=1)
        assert np.all(np.diff(w, axis=1) == 1)  # contiguous: inside one shard
        assert np.all(w[:, 0] // 10_000 == w[:, -1] // 10_000)
    expected = sum((n - 10) // 10 for n in (333, 95, 575)) // 8
    assert steps_per_epoch([333, 95, 575], CFG, 8) == expected == len(_batches(train_dataset(parts, CFG, 40_000, 8, 2, 0)))


def test_shards_partition_the_global_batch_exactly_from_memory_maps(tmp_path):
    parts = []
    for k, n in enumerate((700, 1003)):
        path = tmp_path / f"train-{k}.bin"
        ((np.arange(n) + 3000 * k) % 251).astype(np.uint8).tofile(path)
        parts.append(np.memmap(path, dtype=np.uint8, mode="r", shape=(n,)))
    whole = _batches(train_dataset(parts, CFG, 256, 8, epoch=2, seed=0))
    split = [_batches(train_dataset(parts, CFG, 256, 8, 2, 0, Shard(w, 2, 1))) for w in range(2)]
    assert len(whole) == len(split[0]) == len(split[1]) > 0
    for step, (x, _) in enumerate(whole):
        assert np.array_equal(np.concatenate([split[0][step][0], split[1][step][0]]), x)


def test_validation_sample_is_bounded_fixed_and_spread():
    assert np.array_equal(val_starts(95, CFG, max_chars=1_000_000), val_starts(95, CFG))  # small: all
    sample = val_starts(100_000, CFG, max_chars=1000)
    assert len(sample) == 100 and sample[0] == 0 and sample[-1] == val_starts(100_000, CFG)[-1]
    assert np.array_equal(sample, val_starts(100_000, CFG, max_chars=1000))
    ds, steps = val_dataset(np.arange(100_000, dtype=np.int32), CFG, 200_000, 16, max_chars=1000)
    assert steps == 7 and sum(b[2].sum() for b in _batches(ds)) == 100


def test_resuming_mid_epoch_skips_the_steps_already_trained():
    full = _batches(train_dataset(IDS, CFG, 7, 8, epoch=4, seed=0))
    rest = _batches(train_dataset(IDS, CFG, 7, 8, epoch=4, seed=0, skip_steps=5))
    assert len(rest) == len(full) - 5 and all(np.array_equal(a[0], b[0]) for a, b in zip(full[5:], rest))


def _rss_file_kb() -> int:
    line = next(l for l in open("/proc/self/status") if l.startswith("RssFile:"))
    return int(line.split()[1])


def test_windows_read_from_a_memory_mapped_shard_never_join_the_resident_set(tmp_path):
    from textgen.windows import gather_fn

    path = tmp_path / "train-00000.bin"
    data = (np.arange(16 << 20) % 50_000).astype(np.uint16)
    data.tofile(path)
    part = np.memmap(path, dtype=np.uint16, mode="r", shape=(len(data),))
    starts = np.arange(0, len(data) - 11, 997)  # windows all over the file
    gather = gather_fn([data[:100], part], 10)
    gather(np.arange(100, 200))  # warm up: the code's own pages
    before = _rss_file_kb()
    windows = gather(starts + 100)
    assert _rss_file_kb() - before < 4_000  # the 32 MB file was read through, not mapped in
    assert windows.dtype == np.int32 and np.array_equal(windows, data[starts[:, None] + np.arange(11)])
