"""The data loader on arbitrary input: a valid Dataset or a DataError, never anything else."""

import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxmlp.data import Dataset, Vocab, load_dataset
from jaxmlp.errors import DataError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LECTURE_VOCAB = Vocab(tuple(".abcdefghijklmnopqrstuvwxyz"))

# Valid names files (padding spaces and blank lines allowed), and the same with noise lines.
def padded(alphabet):
    name = st.text(st.sampled_from(alphabet), min_size=1, max_size=12)
    return st.builds(lambda pre, w, post: pre + w + post, st.sampled_from(["", " ", "\t"]), name,
                     st.sampled_from(["", " ", "  "]))


noise = st.one_of(st.text(max_size=20), st.sampled_from(
    ["", " ", ".", "a.b", "ab cd", "\x00", "\ufeff", "\u2028", "\x85", "x" * 300]))
newline = st.sampled_from(["\n", "\r\n", "\r"])


@st.composite
def name_files(draw, alphabet="abcdeéz"):
    lines = draw(st.lists(st.one_of(padded(alphabet), st.just("")), min_size=8, max_size=40))
    for _ in range(draw(st.sampled_from([0, 0, 1, 2]))):  # noise lines, anywhere
        lines.insert(draw(st.integers(0, len(lines))), draw(noise))
    bom = draw(st.sampled_from(["", "", "\ufeff"]))
    return bom + draw(newline).join(lines)


def load(content: bytes | str, **kw) -> Dataset | DataError:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "names.txt"
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8", newline="")
        else:
            path.write_bytes(content)
        try:
            return load_dataset(path, **kw)
        except DataError as e:
            return e


def check(result, vocab: Vocab | None = None) -> None:
    if isinstance(result, DataError):
        message = str(result)
        assert message and "\n" not in message and "\r" not in message
        return
    assert isinstance(result, Dataset)
    if vocab is not None:
        assert result.vocab == vocab
    assert result.vocab.chars[0] == "." and len(set(result.vocab.chars)) == result.vocab.size
    assert all(c.isprintable() and not c.isspace() for c in result.vocab.chars)
    for split in (result.train, result.val, result.test):
        assert split.X.dtype == np.int32 and split.Y.dtype == np.int32
        assert split.X.shape == (len(split.Y), result.block_size)
        assert len(split.Y) > 0
        assert split.X.min() >= 0 and split.X.max() < result.vocab.size
        assert split.Y.min() >= 0 and split.Y.max() < result.vocab.size
        assert (split.X[:, 0] == 0).any()  # every name starts from the padded context


@FUZZ
@given(st.text())
def test_arbitrary_text(text):
    check(load(text))


@FUZZ
@given(st.binary())
def test_arbitrary_bytes(raw):
    check(load(raw))


@FUZZ
@given(name_files(), st.integers(1, 5))
def test_noisy_names_files(text, block_size):
    result = load(text, block_size=block_size)
    check(result)
    if isinstance(result, Dataset):
        body = text[1:] if text.startswith("\ufeff") else text  # a UTF-8 byte-order mark
        words = [w.strip() for w in body.splitlines() if w.strip()]
        examples = sum(len(w) + 1 for w in words)
        assert sum(len(s.Y) for s in (result.train, result.val, result.test)) == examples
        assert sum(int((s.Y == 0).sum()) for s in (result.train, result.val, result.test)) == \
            len(words)


@FUZZ
@given(name_files("abcxyz"))
def test_against_a_saved_runs_vocabulary(text):
    check(load(text, vocab=LECTURE_VOCAB), vocab=LECTURE_VOCAB)
