"""Names -> vocabulary -> context windows -> the lecture's 80/10/10 split.

The vocabulary rule (as in the lecture): token 0 is `.`, which pads the start of every context
and marks the end of a name; the other tokens are the distinct characters of the names file in
sorted order (`a`..`z` -> 1..26 for the bundled file). A names file therefore defines its own
vocabulary; it may not contain `.` (reserved) or whitespace inside a name. Lines are stripped and
blank lines skipped. A saved run keeps its vocabulary, so text it cannot encode is rejected.
"""

from __future__ import annotations

import functools
import hashlib
import os
import random
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from jaxmlp.errors import ConfigError, DataError

END = "."  # token 0: start padding and end of name
MAX_NAME_LENGTH = 256  # longer lines mean the file is not a list of names
MAX_FILE_BYTES = 1 << 30  # 1 GiB: far beyond any list of names; refuse before reading it
# The bundled file: beside the package in a checkout (editable install), else ./data.
_REPO_DATA = Path(__file__).resolve().parent.parent / "data" / "names.txt"
DEFAULT_DATA = _REPO_DATA if _REPO_DATA.exists() else Path("data") / "names.txt"


@dataclass(frozen=True)
class Vocab:
    """Character <-> token maps; `chars[0]` is always `.`."""

    chars: tuple[str, ...]

    @classmethod
    def from_words(cls, words: list[str]) -> Vocab:
        return cls((END, *sorted(set("".join(words)))))

    @property
    def size(self) -> int:
        return len(self.chars)

    @functools.cached_property  # built once, not once per encoded name
    def stoi(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    @functools.cached_property
    def charset(self) -> frozenset[str]:
        """The characters a name may use (not `.`)."""
        return frozenset(self.chars[1:])

    def encode_text(self, text: str) -> np.ndarray:
        """Every character of `text` (all in the vocabulary, `.` included) -> (len,) int32."""
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        order = np.argsort([ord(c) for c in self.chars])
        codes = np.asarray([ord(c) for c in self.chars], np.uint32)[order]
        return order[np.searchsorted(codes, points)].astype(np.int32)

    def encode(self, word: str) -> list[int]:
        """'emma' -> [5, 13, 13, 1] (no end token)."""
        stoi = self.stoi
        missing = sorted({c for c in word if c not in stoi or c == END})
        if missing:
            raise DataError(
                f"characters {''.join(missing)!r} in {word!r} are not in this vocabulary "
                f"({''.join(self.chars[1:])!r}); use only those characters"
            )
        return [stoi[c] for c in word]

    def decode(self, tokens) -> str:
        """Tokens -> text, stopping at the first end token."""
        out = []
        for t in tokens:
            t = int(t)
            if t == 0:
                break
            out.append(self.chars[t])
        return "".join(out)


class Split(NamedTuple):
    """One split's examples. X: (N, block_size) int32 contexts; Y: (N,) int32 next tokens."""

    X: np.ndarray
    Y: np.ndarray


class Dataset(NamedTuple):
    vocab: Vocab
    block_size: int
    train: Split
    val: Split
    test: Split
    sha256: str = ""  # of the names file's bytes, as read: a run records what it trained on

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)


def load_words(path: str | Path = DEFAULT_DATA) -> list[str]:
    """Read a names file: one name per line, UTF-8 (a byte-order mark is allowed).

    Raises DataError, naming the problem and the fix, for a path that is missing, a directory,
    a device, unreadable, too large, not UTF-8, without names, or with a line that is not a name.
    """
    return read_names(path)[0]


def read_names(path: str | Path = DEFAULT_DATA) -> tuple[list[str], str]:
    """(names, SHA-256 of the bytes they were parsed from): the file is read exactly once, so a
    pipe or a file being rewritten cannot give names that differ from the recorded hash."""
    path = Path(path)
    raw = _read_once(path)
    return _parse(raw, path), hashlib.sha256(raw).hexdigest()


def _read_once(path: Path) -> bytes:
    shown = str(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise DataError(f"data file {shown!r} does not exist; pass --data PATH to a names file "
                        "(one name per line)") from None
    except OSError as e:  # e.g. a path through a file, a name too long, no permission
        raise DataError(f"cannot open data file {shown!r} ({e.strerror}); "
                        "pass --data PATH to a readable names file") from None
    st = os.fstat(fd)
    mode = st.st_mode
    if stat.S_ISREG(mode) and st.st_size > MAX_FILE_BYTES:
        os.close(fd)
        raise DataError(f"data file {shown!r} is {st.st_size / 2**20:,.0f} MiB, more than any "
                        f"names file ({MAX_FILE_BYTES >> 20:,} MiB at most); check --data")
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):  # /dev/zero would never end
        os.close(fd)
        what = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise DataError(f"data path {shown!r} is {what}; pass --data PATH to a names file "
                        "(one name per line)")
    with os.fdopen(fd, "rb") as f:
        try:
            raw = f.read(MAX_FILE_BYTES + 1)  # a pipe has no size to check beforehand
        except OSError as e:
            raise DataError(f"cannot read data file {shown!r} ({e.strerror}); check its "
                            "permissions") from None
    if len(raw) > MAX_FILE_BYTES:
        raise DataError(f"data file {shown!r} is more than {MAX_FILE_BYTES >> 20:,} MiB, more "
                        "than any names file; check --data")
    return raw


def _parse(raw: bytes, path: Path) -> list[str]:
    shown = str(path)
    try:
        text = raw.decode("utf-8-sig")  # tolerate the BOM some Windows editors write
    except UnicodeDecodeError as e:
        raise DataError(
            f"data file {shown!r} is not UTF-8 text (byte {e.start}); save it as UTF-8"
        ) from None
    words = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        word = line.strip()
        if not word:
            continue
        if len(word) > MAX_NAME_LENGTH:
            raise DataError(
                f"{path.name} line {lineno} is {len(word):,} characters long (names may have at "
                f"most {MAX_NAME_LENGTH}); is this a file of names, one per line?"
            )
        if END not in word and word.isprintable() and len(word.split()) == 1:
            words.append(word)  # the common case, checked in C; the slow path names the culprit
            continue
        bad = sorted({c for c in word if c == END or c.isspace() or not c.isprintable()})
        if bad:
            raise DataError(
                f"{path.name} line {lineno} contains {''.join(bad)!r}; '.' is the end token and "
                "names may not contain whitespace or control characters: remove them"
            )
        words.append(word)
    if not words:
        raise DataError(f"data file {shown!r} has no names (it is empty or blank); put one name "
                        "per line")
    return words


def build_examples(words: list[str], vocab: Vocab, block_size: int) -> Split:
    """Every name gives len(name)+1 examples: the `block_size` previous tokens -> next token.

    'emma' with block_size 3: ... -> e, ..e -> m, .em -> m, emm -> a, mma -> . (token 0).
    """
    _check_block_size(block_size)
    for w in words:  # DataError naming the first name the vocabulary cannot encode
        if not set(w) <= vocab.charset:
            vocab.encode(w)
    if not words:
        return Split(np.zeros((0, block_size), np.int32), np.zeros(0, np.int32))
    # All names in one token sequence, each preceded by block_size pads and ended by 0; an
    # example is a window of block_size tokens and the token after it, for every position that
    # is not a pad.
    pad = END * block_size
    seq = vocab.encode_text(pad + pad.join(f"{w}{END}" for w in words))  # (L,)
    is_pad = np.zeros(len(seq), bool)
    starts = np.cumsum([0] + [len(w) + 1 + block_size for w in words[:-1]])
    is_pad[(starts[:, None] + np.arange(block_size)).ravel()] = True
    targets = np.flatnonzero(~is_pad)  # positions of the next tokens, each >= block_size
    X = np.lib.stride_tricks.sliding_window_view(seq, block_size)[targets - block_size]
    return Split(np.ascontiguousarray(X, dtype=np.int32), seq[targets].astype(np.int32))


def split_words(words: list[str], seed: int = 42) -> tuple[list[str], list[str], list[str]]:
    """The lecture's split: Python's random.seed(42) + random.shuffle, then 80/10/10 by names.

    Python's `random` (not JAX's) is what makes the split identical to the PyTorch lecture's.
    """
    words = list(words)
    random.seed(seed)  # the lecture seeds the global generator; we restore it afterwards
    random.shuffle(words)
    n1, n2 = int(0.8 * len(words)), int(0.9 * len(words))
    return words[:n1], words[n1:n2], words[n2:]


def load_dataset(
    path: str | Path = DEFAULT_DATA, block_size: int = 3, vocab: Vocab | None = None
) -> Dataset:
    """Names file -> Dataset (182,625 / 22,655 / 22,866 examples for the bundled file).

    With `vocab` (a saved run's), every character of the file must be in it.
    """
    _check_block_size(block_size)
    words, sha256 = read_names(path)
    if len(words) < 10:
        raise DataError(
            f"data file {str(path)!r} has {len(words)} names; the 80/10/10 split needs at least 10"
        )
    if vocab is not None:
        missing = sorted(set("".join(words)) - set(vocab.chars[1:]))
        if missing:
            raise DataError(
                f"data file {str(path)!r} uses {_shorten(''.join(missing))!r}, which the run's "
                f"vocabulary {_shorten(''.join(vocab.chars[1:]))!r} lacks; pass --data with a "
                "names file in the run's characters")
    vocab = vocab or Vocab.from_words(words)
    state = random.getstate()
    try:
        tr, va, te = split_words(words)
    finally:
        random.setstate(state)
    return Dataset(
        vocab,
        block_size,
        build_examples(tr, vocab, block_size),
        build_examples(va, vocab, block_size),
        build_examples(te, vocab, block_size),
        sha256,
    )


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size must be a positive integer, got {block_size!r}")
    if block_size > MAX_NAME_LENGTH + 1:  # longer contexts are only padding, and memory
        raise ConfigError(f"block_size must be at most {MAX_NAME_LENGTH + 1} (names have at most "
                          f"{MAX_NAME_LENGTH} characters), got {block_size}")


def _shorten(text: str, limit: int = 40) -> str:
    """Keep error messages one readable line however large a vocabulary is."""
    return text if len(text) <= limit else text[:limit] + "..."
