import random

import numpy as np
import pytest

from jaxmlp.data import DataError, Vocab, build_examples, load_dataset, load_words, split_words


def test_bundled_counts_and_vocab(names_data):
    assert len(load_words()) == 32_033
    assert names_data.vocab.chars == (".", *"abcdefghijklmnopqrstuvwxyz")
    assert (len(names_data.train.X), len(names_data.val.X), len(names_data.test.X)) == (
        182_625, 22_655, 22_866)
    for split in (names_data.train, names_data.val, names_data.test):
        assert split.X.dtype == np.int32 and split.Y.dtype == np.int32
        assert split.X.shape[1] == 3 and split.X.min() >= 0 and split.Y.max() < 27


def test_split_is_the_lectures():
    # The lecture: random.seed(42); random.shuffle(words); then 80/10/10 by names.
    words = load_words()
    ref = list(words)
    random.seed(42)
    random.shuffle(ref)
    n1, n2 = int(0.8 * len(ref)), int(0.9 * len(ref))
    tr, va, te = split_words(words)
    assert (tr, va, te) == (ref[:n1], ref[n1:n2], ref[n2:])


def test_loading_leaves_global_random_state_alone():
    random.seed(123)
    expected = random.random()
    random.seed(123)
    load_dataset()
    assert random.random() == expected


def test_context_windows():
    vocab = Vocab.from_words(["emma", "ab"])
    assert vocab.encode("emma") == [vocab.stoi["e"], vocab.stoi["m"], vocab.stoi["m"], 1]
    s = build_examples(["emma"], vocab, block_size=3)
    e, m, a = vocab.stoi["e"], vocab.stoi["m"], vocab.stoi["a"]
    assert s.X.tolist() == [[0, 0, 0], [0, 0, e], [0, e, m], [e, m, m], [m, m, a]]
    assert s.Y.tolist() == [e, m, m, a, 0]
    assert build_examples(["ab"], vocab, block_size=1).X.tolist() == [[0], [1], [2]]


def test_encode_decode_round_trip(names_data):
    v = names_data.vocab
    assert v.decode([*v.encode("olivia"), 0, 5, 6]) == "olivia"
    with pytest.raises(DataError, match="not in this vocabulary"):
        v.encode("zoë")


@pytest.mark.parametrize(
    "content, match",
    [(b"", "has no names"), (b"\n  \n\n", "has no names"), (b"ab\xff\xfe\n", "not UTF-8"),
     (b"anna\nbo.b\n", r"line 2 contains '\.'"), (b"x" * 300, "300 characters long")],
)
def test_bad_files(tmp_path, content, match):
    p = tmp_path / "names.txt"
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_dataset(p)


def test_missing_and_directory(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_words(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="is a directory"):
        load_words(tmp_path)
