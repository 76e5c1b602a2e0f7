"""The training example's tokenizers: bytes, or a byte-level BPE trained on the fly.

Both read raw bytes and give them back (`token_bytes`), and both know how many bytes
of the input each token stands for (`byte_lengths`), so that a loss in nats per token
converts exactly to bits per byte, whatever the text's encoding.
"""

import pathlib
import re
from typing import Any

import numpy as np


class ByteTokenizer:
    """Every byte is a token."""

    kind = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def token_bytes(self, ids: np.ndarray) -> bytes:
        return np.asarray(ids, dtype=np.uint8).tobytes()

    def byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def side_files(self) -> dict[str, bytes]:
        return {}


def _byte_symbols() -> list[str]:
    """One printable, non-space character per byte, as GPT-2's byte-level BPE has
    them: the printable Latin-1 bytes stand for themselves, the others for U+0100 on."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = iter(range(0x100, 0x200))
    return [chr(b) if b in printable else chr(next(others)) for b in range(256)]


BYTE_SYMBOLS = _byte_symbols()
SYMBOL_BYTES = {symbol: byte for byte, symbol in enumerate(BYTE_SYMBOLS)}


def _pre_tokenizer_pattern() -> str:
    """GPT-2's split into words, written on the byte symbols: a run of word bytes
    (letters, digits, `_` and the bytes of non-ASCII characters) or of other non-space
    bytes, with at most one leading space; a run of white space leaves its last
    character to the word after it."""

    def symbols(condition) -> str:
        return "".join(re.escape(BYTE_SYMBOLS[b]) for b in range(256) if condition(b))

    def is_word(b: int) -> bool:
        return b >= 0x80 or bytes([b]).isalnum() or b == ord("_")

    def is_space(b: int) -> bool:
        return bytes([b]).isspace()

    word, space = symbols(is_word), symbols(is_space)
    other = symbols(lambda b: not (is_word(b) or is_space(b)))
    leading_space = re.escape(BYTE_SYMBOLS[ord(" ")])
    return (
        f"{leading_space}?[{word}]+|{leading_space}?[{other}]+"
        f"|[{space}]+(?![^{space}])|[{space}]+"
    )


class BPETokenizer:
    """A byte-level BPE from Hugging Face `tokenizers`, trained on the training text.

    It reads raw bytes, each written as one symbol (`BYTE_SYMBOLS`), so every token
    stands for a whole number of bytes of the input, valid UTF-8 or not: the held-out
    loss converts exactly to bits per byte, and decoding gives back the input's bytes.
    """

    kind = "bpe"
    filename = "tokenizer.json"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self._bytes = [
            bytes(SYMBOL_BYTES[symbol] for symbol in tokenizer.id_to_token(i))
            for i in range(self.vocab_size)
        ]

    @classmethod
    def train(cls, data: bytes, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        pattern = Regex(_pre_tokenizer_pattern())
        tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=BYTE_SYMBOLS, show_progress=False
        )
        tokenizer.train_from_iterator(_symbol_lines(data), trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, directory: pathlib.Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        path = directory / cls.filename
        try:
            return cls(Tokenizer.from_file(str(path)))
        except Exception as error:  # tokenizers raises bare Exceptions.
            raise SystemExit(f"--resume: cannot read {path}: {error}") from None

    def side_files(self) -> dict[str, bytes]:
        return {self.filename: self.tokenizer.to_str().encode()}

    def encode(self, data: bytes) -> np.ndarray:
        # Line by line, so that the Rust side encodes in parallel.
        encodings = self.tokenizer.encode_batch(_symbol_lines(data))
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def token_bytes(self, ids: np.ndarray) -> bytes:
        return b"".join(self._bytes[i] for i in np.asarray(ids).tolist())

    def byte_lengths(self) -> np.ndarray:
        return np.array([len(token) for token in self._bytes])


def _symbol_lines(data: bytes) -> list[str]:
    """`data`'s lines, each byte written as its symbol (Latin-1 decodes a byte to the
    character of the same number, which `str.translate` maps to the symbol)."""
    table = dict(enumerate(BYTE_SYMBOLS))
    return [
        line.decode("latin-1").translate(table)
        for line in data.splitlines(keepends=True)
    ]
