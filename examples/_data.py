"""The training example's text: the documents, the train and held-out split, their
packing into one token stream with segment ids, the training batches, the held-out
windows, and the compressors' figures on the same bytes."""

import gzip
import lzma
import pathlib
import sysconfig

import numpy as np

# Held-out documents: every HELD_OUT_EVERY-th one, starting half-way into the stride.
HELD_OUT_EVERY = 16


def read_documents(text: str | None) -> list[bytes]:
    """The documents to learn from, in a fixed order.

    `None`: the standard library's top-level `.py` modules, sorted by name. Otherwise
    the file `text`, or every file under the directory `text` (hidden ones and binary
    ones, which contain a NUL byte, excluded), sorted by path.
    """
    if text is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(root.glob("*.py"))
    else:
        root = pathlib.Path(text)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(
                path
                for path in root.rglob("*")
                if path.is_file()
                and not any(
                    part.startswith(".") for part in path.relative_to(root).parts
                )
            )
        else:
            raise SystemExit(f"--text {text}: no such file or directory.")
    documents = [path.read_bytes() for path in paths]
    documents = [
        document for document in documents if document and b"\0" not in document
    ]
    if not documents:
        raise SystemExit(f"--text {text}: found no non-empty text files.")
    return documents


def split_documents(documents: list[bytes]) -> tuple[list[bytes], list[bytes]]:
    """Train and held-out documents: whole documents go to one side or the other.

    A single document is cut at 90% instead.
    """
    if len(documents) == 1:
        (document,) = documents
        cut = len(document) * 9 // 10
        return [document[:cut]], [document[cut:]]
    held_out_indices = set(range(HELD_OUT_EVERY // 2, len(documents), HELD_OUT_EVERY))
    held_out_indices = held_out_indices or {len(documents) - 1}
    train = [doc for i, doc in enumerate(documents) if i not in held_out_indices]
    held_out = [doc for i, doc in enumerate(documents) if i in held_out_indices]
    return train, held_out


def pack_documents(
    tokenizer, documents: list[bytes], limit: int
) -> tuple[bytes, np.ndarray, np.ndarray]:
    """The text `b"\\n".join(documents)[:limit]`, its tokens, and the document of each
    token (the segment ids that keep attention and positions within a document).

    The newline between two documents starts the second one, where it plays the part
    of a beginning-of-document token: a document's first byte is predicted within
    its own segment, from that newline, and the one target that crosses a change of
    segment (from the end of a document to the newline after it) is always that
    newline. That target is kept, not masked: the held-out bits per byte count every
    byte of the raw text, newlines between documents included. Each document is
    tokenized on its own, so that no token straddles two.
    """
    pieces, size = [], 0
    for index, document in enumerate(documents):
        piece = (b"\n" + document if index else document)[: limit - size]
        if not piece:
            break
        pieces.append(piece)
        size += len(piece)
    encoded = [tokenizer.encode(piece) for piece in pieces]
    segment_ids = np.repeat(
        np.arange(len(encoded), dtype=np.int32), [len(e) for e in encoded]
    )
    return b"".join(pieces), np.concatenate(encoded), segment_ids


def batch_at(
    step: int,
    stream: np.ndarray,
    segment_ids: np.ndarray,
    *,
    seed: int,
    batch_size: int,
    seq_len: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The training batch of step `step`: random windows of the packed token stream,
    drawn from a generator seeded by `(seed, step)` alone, so that a resumed run sees
    the same batches as an uninterrupted one; with the tokens' segment ids."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
    indices = starts[:, None] + np.arange(seq_len + 1)
    windows = stream[indices]
    return windows[:, :-1], windows[:, 1:], segment_ids[indices[:, :-1]]


def held_out_windows(
    stream: np.ndarray, segment_ids: np.ndarray, *, seq_len: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Windows over the packed held-out stream, in whole batches: tokens, targets,
    which targets each window scores, and the tokens' segment ids.

    A window starts every `seq_len // 2` tokens and scores only the targets the
    previous one did not (its second half; the first window scores all of its own),
    so every target but the trailing remainder is scored exactly once, with at least
    `seq_len // 2` tokens of context from the second window on, as a model reading
    the text from the start would have. (Windows that do not overlap would score the
    first tokens of each window almost blind.) Within a window, as in training, a
    token sees its own document only. The last batch is padded with windows that
    score nothing.
    """
    stride = seq_len // 2
    if len(stream) < seq_len + 1:
        raise SystemExit(
            f"The held-out text has {len(stream)} tokens, fewer than --seq-len "
            f"{seq_len} + 1: give more text or a shorter --seq-len."
        )
    starts = np.arange(0, len(stream) - seq_len, stride)
    indices = starts[:, None] + np.arange(seq_len)
    where = np.ones(indices.shape, dtype=bool)
    where[1:, : seq_len - stride] = False
    padding = ((0, -len(starts) % batch_size), (0, 0))
    arrays = stream[indices], stream[indices + 1], where, segment_ids[indices]
    return tuple(np.pad(array, padding) for array in arrays)


def compressed_bits_per_byte(data: bytes) -> dict[str, float]:
    """What the classic compressors achieve on `data`, in bits per byte."""
    return {
        "gzip -9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
        "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data),
    }
