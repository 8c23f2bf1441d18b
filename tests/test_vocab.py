import json

import numpy as np
import pytest

from textgen.text import UnknownCharactersError, Vocab, VocabError


def test_sorted_characters_and_round_trip():
    v = Vocab.from_text("hello world")
    assert v.chars == (" ", "d", "e", "h", "l", "o", "r", "w")
    ids = v.encode("hello")
    assert ids.dtype == np.int32 and ids.tolist() == [3, 2, 4, 4, 5]
    assert v.decode(ids) == "hello"
    assert Vocab.from_dict(json.loads(json.dumps(v.to_dict()))) == v


def test_non_ascii_characters():
    v = Vocab.from_text("é€a")
    assert v.decode(v.encode("a€é")) == "a€é"


def test_unknown_policies():
    v = Vocab.from_text("abc ")
    with pytest.raises(UnknownCharactersError, match=r"unknown characters in prompt: 'x', 'é' \(model vocabulary: 4 chars\)"):
        v.encode("abxé", what="prompt")
    assert v.decode(v.encode("abxé", unknown="skip")) == "ab"
    assert v.decode(v.encode("abxé", unknown="replace")) == "ab  "
    assert v.decode(v.encode("abx", unknown="replace", replacement="c")) == "abc"
    with pytest.raises(VocabError, match="replacement"):
        v.encode("x", unknown="replace", replacement="z")
    with pytest.raises(VocabError, match="policy"):
        v.encode("a", unknown="ignore")


def test_invalid_vocabularies():
    with pytest.raises(VocabError, match="nothing to learn"):
        Vocab.from_text("aaaa")
    with pytest.raises(VocabError, match="sorted"):
        Vocab(("b", "a"))
    with pytest.raises(VocabError, match="duplicate"):
        Vocab(("a", "a", "b"))
    with pytest.raises(VocabError, match="'chars'"):
        Vocab.from_dict({"letters": "ab"})


def test_a_lone_surrogate_is_not_a_character():
    with pytest.raises(VocabError, match="surrogates"):
        Vocab(("a", "\ud800"))
