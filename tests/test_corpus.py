from pathlib import Path

import numpy as np
import pytest

from textgen.text import CorpusError, Vocab, bundled_corpus_path, load_corpus, split_ids


def test_bundled_corpus_matches_the_notebook_numbers():
    corpus = load_corpus()
    assert corpus.files == (str(bundled_corpus_path()),)
    assert len(corpus.text) == 144_431  # the notebook's file has one more (distributor) line
    assert Vocab.from_text(corpus.text).size == 45  # as the notebook prints
    assert corpus.text == corpus.text.lower()


def test_lowercase_is_optional():
    assert Vocab.from_text(load_corpus(lowercase=False).text).size > 45


def test_several_files_and_directories(tmp_path: Path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("Second", encoding="utf-8")
    (tmp_path / "d" / "sub" / "c.txt").write_text("third\r\nline\n", encoding="utf-8")
    (tmp_path / "d" / "ignored.bin").write_bytes(b"\xff\xfe")
    (tmp_path / "a.txt").write_text("\ufefffirst", encoding="utf-8")
    corpus = load_corpus([tmp_path / "a.txt", tmp_path / "d"])
    # BOM stripped, files joined with a newline, CRLF normalised, lowercased, dirs sorted.
    assert corpus.text == "first\nsecond\nthird\nline\n"
    assert [Path(f).name for f in corpus.files] == ["a.txt", "b.txt", "c.txt"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "does not exist"),
        ("empty.txt", "", "empty"),
        ("blank.txt", " \n\n ", "empty"),
        ("one.txt", "aaaa", "one character"),
        ("dir", "<dir>", "no \\*.txt files"),
    ],
)
def test_clear_errors(tmp_path: Path, name, content, message):
    path = tmp_path / name
    if content == "<dir>":
        path.mkdir()
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        load_corpus([path])


def test_non_utf8_says_where(tmp_path: Path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("caf\u00e9\nna\u00efve".encode("latin-1"))
    with pytest.raises(CorpusError) as e:
        load_corpus([f])
    msg = str(e.value)
    assert "not UTF-8" in msg and "0xe9" in msg and "offset 3" in msg and "line 1, column 4" in msg
    assert "iconv" in msg


def test_split_is_a_contiguous_tail():
    ids = np.arange(1000, dtype=np.int32)
    train, val = split_ids(ids, 0.1, seq_len=20)
    assert len(val) == 100 and len(train) == 900
    assert np.array_equal(np.concatenate([train, val]), ids)


def test_split_errors():
    with pytest.raises(CorpusError, match="shorter than two windows"):
        split_ids(np.arange(30), 0.1, seq_len=20)
    with pytest.raises(CorpusError, match="validation tail"):
        split_ids(np.arange(100), 0.1, seq_len=20)


def test_a_link_out_of_a_corpus_directory_is_refused(tmp_path: Path):
    outside = tmp_path / "secret.txt"
    outside.write_text("root:x:0:0:root\n", encoding="utf-8")
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_text("alice was beginning\n", encoding="utf-8")
    (tmp_path / "d" / "b.txt").symlink_to(tmp_path / "d" / "a.txt")  # inside the directory: fine
    assert load_corpus([tmp_path / "d"]).text == "alice was beginning\n" * 2
    (tmp_path / "d" / "sub" / "passwd.txt").symlink_to(outside)
    with pytest.raises(CorpusError, match=r"passwd.txt is a link to .*secret.txt, outside the directory"):
        load_corpus([tmp_path / "d"])
    (tmp_path / "d" / "sub" / "passwd.txt").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("more\n", encoding="utf-8")
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    try:  # Python 3.11's rglob does not follow a link to a directory; where it does, it is refused
        text = load_corpus([tmp_path / "d"]).text
    except CorpusError as e:
        assert "outside the directory" in str(e)
    else:
        assert "more" not in text
    assert load_corpus([outside]).text == "root:x:0:0:root\n"  # a file named on its own is the user's choice
