"""``textgen prepare``: streaming, the same text rules as the in-memory reader, the vocabulary and
its unknown mapping, shards, the split, reuse, and refusing bad input without leaving anything."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import last_json, run_cli

import textgen.prepare as prep
from textgen.dataset import DatasetError, fetch_dataset, open_dataset
from textgen.prepare import UNKNOWN, PrepareError, PrepareOptions, prepare, read_pieces
from textgen.text import CorpusError, Vocab, load_corpus, read_text, split_ids


def _ids(out: Path, split: str) -> np.ndarray:
    ds = open_dataset(out)
    parts = ds.train if split == "train" else ds.val
    return np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])


def test_bundled_corpus_prepares_to_the_ids_training_used(tmp_path):
    out, reused = prepare(None, tmp_path / "ds", progress=False)
    text = load_corpus().text
    vocab = Vocab.from_text(text)
    train, val = split_ids(vocab.encode(text), 0.1, 100)
    ds = open_dataset(out)
    assert ds.vocab == vocab and not reused
    assert np.array_equal(_ids(out, "train"), train) and np.array_equal(_ids(out, "val"), val)
    meta = ds.meta
    assert meta["dtype"] == "uint8" and meta["characters"] == 144_431 and meta["unknown"]["mapped_count"] == 0
    assert meta["split"]["val_characters"] == 14_443 and meta["sources"][0]["size"] == 144_431
    assert sum(meta["char_counts"].values()) == 144_431
    assert prepare(None, tmp_path / "ds", progress=False)[1]  # unchanged: reused
    assert not prepare(None, tmp_path / "ds", PrepareOptions(val_fraction=0.2), progress=False)[1]


def test_pieces_match_the_in_memory_reader_across_block_boundaries(tmp_path):
    text = "\ufeffÄb\r\nΣΑΣ é\r\n" * 50 + "ΟΔΟΣ\r" + "x" * 37 + "\r\nend"
    f = tmp_path / "t.txt"
    f.write_bytes(text.encode("utf-8"))
    for block in (3, 4, 7, 64, 1 << 20):  # bytes; no word is longer
        assert "".join(read_pieces(f, True, block=block)) == read_text(f).lower(), block
        assert "".join(read_pieces(f, False, block=block)) == read_text(f), block


@pytest.mark.parametrize("block", [1, 5, 1 << 20])
def test_not_utf8_says_where_exactly_as_the_reader(tmp_path, monkeypatch, block):
    f = tmp_path / "latin1.txt"
    f.write_bytes("line one\ncaf\u00e9\nna\u00efve".encode("utf-8")[:-6] + "\u00efve".encode("latin-1"))
    with pytest.raises(CorpusError) as expected:
        read_text(f)
    monkeypatch.setattr(prep, "BLOCK", block)
    with pytest.raises(CorpusError) as got:
        prepare([f], tmp_path / "ds", progress=False)
    assert str(got.value) == str(expected.value) and "offset 15 (line 3, column 1)" in str(got.value)
    assert list(tmp_path.iterdir()) == [f]  # nothing half-written


def test_several_files_joined_and_split_per_file_tail(tmp_path):
    (tmp_path / "a.txt").write_text("\ufeffFirst file\r\nof text", encoding="utf-8")
    (tmp_path / "b.txt").write_text("second one, longer than the first\n", encoding="utf-8")
    out, _ = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "ds", PrepareOptions(val_fraction=0.25),
                     progress=False)
    ds = open_dataset(out)
    a, b = "first file\nof text\n", "second one, longer than the first\n"
    na, nb = round(len(a) * 0.25), round(len(b) * 0.25)
    assert ds.vocab.decode(_ids(out, "train")) == a[:-na] + b[:-nb]
    assert ds.vocab.decode(_ids(out, "val")) == a[-na:] + b[-nb:]
    assert ds.vocab == Vocab.from_text(load_corpus([tmp_path / "a.txt", tmp_path / "b.txt"]).text)
    assert [s["characters"] for s in ds.meta["sources"]] == [len(a), len(b)]


def test_shards_are_bounded_and_windows_never_span_them(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("abcdefghij" * 1000, encoding="utf-8")
    out, _ = prepare([f], tmp_path / "ds", PrepareOptions(shard_mb=1000 / (1 << 20)), progress=False)
    meta = open_dataset(out).meta
    train = [s for s in meta["shards"] if s["split"] == "train"]
    assert len(train) == 9 and all(s["bytes"] <= 1000 for s in meta["shards"])
    assert {s["split"] for s in meta["shards"]} == {"train", "val"}
    assert "".join(open_dataset(out).vocab.decode(_ids(out, "train"))) == ("abcdefghij" * 1000)[:9000]


def test_max_vocab_maps_the_rare_characters_to_one_unknown(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("aaaaabbbbcccdde\u00e9", encoding="utf-8")
    out, _ = prepare([f], tmp_path / "ds", PrepareOptions(max_vocab=4, val_fraction=0.2), progress=False)
    ds = open_dataset(out)
    assert ds.vocab.chars == ("a", "b", "c", UNKNOWN)
    unknown = ds.meta["unknown"]
    assert unknown["char"] == UNKNOWN and unknown["id"] == 3
    assert unknown["mapped_chars"] == ["d", "e", "\u00e9"] and unknown["mapped_count"] == 4
    assert ds.vocab.decode(np.concatenate([_ids(out, "train"), _ids(out, "val")])) == "aaaaabbbbccc" + UNKNOWN * 4
    out, _ = prepare([f], tmp_path / "ds2", PrepareOptions(min_count=3), progress=False)
    assert open_dataset(out).vocab.chars == ("a", "b", "c", UNKNOWN)


def test_a_base_vocabulary_is_kept_and_extended_in_sorted_order(tmp_path):
    """For --init-from: the checkpoint's characters keep a place (even those the corpus lacks, or
    would drop as rare), the corpus' new ones join them, the ids are the union's; the cache key
    includes the base (the default, none, keeps the fingerprint of before)."""
    from textgen.prepare import fingerprint

    f = tmp_path / "t.txt"
    f.write_text("aaaaabbbbcccdde" * 3, encoding="utf-8")
    opts = PrepareOptions(max_vocab=4, val_fraction=0.2, base_vocab=("x", "d", "a"))
    ds = open_dataset(prepare([f], tmp_path / "ds", opts, progress=False)[0])
    assert ds.vocab.chars == ("a", "b", "c", "d", "x", UNKNOWN)  # "d" kept by the base, "e" dropped
    assert ds.meta["unknown"]["mapped_chars"] == ["e"] and ds.meta["base_vocab"] == ["a", "d", "x"]
    ids = np.concatenate([_ids(ds.path, "train"), _ids(ds.path, "val")])
    assert ds.vocab.decode(ids) == ("aaaaabbbbcccdd" + UNKNOWN) * 3
    assert fingerprint([f], opts) != fingerprint([f], PrepareOptions(max_vocab=4, val_fraction=0.2))
    assert open_dataset(prepare([f], tmp_path / "ds2", PrepareOptions(base_vocab=("z",)), progress=False)[0]
                        ).vocab.chars == ("a", "b", "c", "d", "e", "z")
    with pytest.raises(PrepareError, match="single characters"):
        PrepareOptions(base_vocab=("ab",))


def test_mostly_unknown_is_refused(tmp_path):
    f = tmp_path / "t.txt"
    f.write_text("".join(chr(0x4E00 + i) for i in range(100)) + "ab" * 10, encoding="utf-8")
    with pytest.raises(PrepareError, match="would map to the unknown character"):
        prepare([f], tmp_path / "ds", PrepareOptions(max_vocab=10), progress=False)
    assert list(tmp_path.iterdir()) == [f]


@pytest.mark.parametrize("content, message", [("", "empty"), (" \n\n ", "empty"), ("aaaa", "one character")])
def test_nothing_to_learn(tmp_path, content, message):
    (tmp_path / "t.txt").write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        prepare([tmp_path / "t.txt"], tmp_path / "ds", progress=False)


def test_a_full_disk_removes_the_temporary_directory(tmp_path, monkeypatch):
    def full(self, ids):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(prep.ShardWriter, "write", full)
    code, _, stderr = run_cli(["prepare", "--out", str(tmp_path / "ds"), "--no-progress"])
    assert code == 2 and "disk filled up" in stderr and "was removed" in stderr, stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_or_corrupt_shards_are_refused(tmp_path):
    out, _ = prepare(None, tmp_path / "ds", progress=False)
    shard = out / "train-00000.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="corrupt"):
        open_dataset(out)
    shard.unlink()
    with pytest.raises(DatasetError, match="missing"):
        open_dataset(out)
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        open_dataset(tmp_path)


def test_a_uri_is_fetched_once_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("TEXTGEN_CACHE", str(tmp_path / "cache"))
    out, _ = prepare(None, tmp_path / "ds", progress=False)
    local = fetch_dataset(f"file://{out}")
    assert np.array_equal(_ids(local, "train"), _ids(out, "train"))
    before = (local / "train-00000.bin").stat().st_mtime_ns
    assert fetch_dataset(f"file://{out}") == local and (local / "train-00000.bin").stat().st_mtime_ns == before
    (out / "val-00000.bin").write_bytes(b"x" * (out / "val-00000.bin").stat().st_size)
    (local / "val-00000.bin").unlink()
    with pytest.raises(DatasetError, match="corrupt"):
        fetch_dataset(f"file://{out}")
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        fetch_dataset(f"file://{tmp_path}/nowhere")


def test_cli_prepare_prints_json_and_reuses(tmp_path):
    args = ["prepare", "--out", str(tmp_path / "ds"), "--no-progress"]
    code, stdout, stderr = run_cli(args)
    assert code == 0, stderr
    result = last_json(stdout)
    assert result["characters"] == 144_431 and result["vocab_size"] == 45 and not result["reused"]
    code, stdout, stderr = run_cli(args)
    assert code == 0 and last_json(stdout)["reused"] and "reused" in stderr
    json.loads((tmp_path / "ds" / "dataset.json").read_text())
    code, _, stderr = run_cli(["prepare", "/nonexistent.txt", "--out", str(tmp_path / "x")])
    assert code == 2 and "does not exist" in stderr


def test_reuse_needs_every_shard_and_force_prepares_again(tmp_path):
    out, _ = prepare(None, tmp_path / "ds", progress=False)
    (out / "val-00000.bin").unlink()
    out, reused = prepare(None, tmp_path / "ds", progress=False)
    assert not reused and open_dataset(out).n_val == 14_443
    assert not prepare(None, tmp_path / "ds", progress=False, force=True)[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]  # no temporary or old copy left


def test_only_two_characters_lowercase_other_than_one_by_one():
    import sys

    special = [chr(i) for i in range(sys.maxunicode + 1)
               if not 0xD800 <= i <= 0xDFFF and len(chr(i).lower()) != 1]
    assert special == ["\u0130"] and "AΣ".lower() == "aς" != "a" + "Σ".lower()  # the final sigma
    assert set(prep.CONTEXTUAL_LOWER) == {"\u0130", "\u03a3"}


@pytest.mark.parametrize("block", [16, 1 << 20])
def test_mixed_pieces_prepare_to_the_in_memory_ids(tmp_path, monkeypatch, block):
    lines = ["Plain ASCII line.", "Café ÄÖÜ straße", "ΟΔΟΣ ΣΑΣ Σ", "İstanbul İ", "ÉCOLE Ωmega"] * 40
    f = tmp_path / "mixed.txt"
    f.write_text("\r\n".join(lines), encoding="utf-8")
    monkeypatch.setattr(prep, "BLOCK", block)
    out, _ = prepare([f], tmp_path / "ds", progress=False)
    text = load_corpus([f]).text
    vocab = Vocab.from_text(text)
    train, val = split_ids(vocab.encode(text), 0.1, 10)
    assert open_dataset(out).vocab == vocab
    assert np.array_equal(_ids(out, "train"), train) and np.array_equal(_ids(out, "val"), val)
