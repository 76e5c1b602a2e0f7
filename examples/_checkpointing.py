"""The training example's checkpoints, written so that a kill at any moment leaves a
checkpoint that resumes exactly or is refused with a clear message, never a silently
wrong one.

A checkpoint in a directory is `checkpoint.eqx` (the model, the optimiser state and the
step, `eqx.tree_serialise_leaves`), any side files (the BPE's `tokenizer.json`), and
`checkpoint.json`, the record: the step, the settings, the history, and the SHA-256 of
every other file. Each file is written to a temporary name in the same directory,
flushed to disk and renamed over the old one (`os.replace`, atomic), the record last:
a kill while writing leaves the previous file whole, and a kill between two renames
leaves a record whose checksums no longer match, which `read_record` refuses.
"""

import contextlib
import hashlib
import json
import os
import pathlib
import signal
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import equinox as eqx
import jax
import numpy as np

STATE_FILE = "checkpoint.eqx"
RECORD_FILE = "checkpoint.json"
# A record is a few settings and one loss per step: far below this.
MAX_RECORD_BYTES = 256 * 2**20


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[list]:
    """Inside the block, Ctrl-C (SIGINT) appends to the yielded list instead of
    raising `KeyboardInterrupt`: the training loop stops after the current step and
    saves, and a second Ctrl-C during the save cannot cut the save short. The previous
    handler comes back on leaving the block."""
    requests = []
    previous = signal.signal(signal.SIGINT, lambda *_: requests.append(True))
    try:
        yield requests
    finally:
        signal.signal(signal.SIGINT, previous)


def write_atomically(path: pathlib.Path, write: Callable[[BinaryIO], Any]) -> str:
    """Calls `write` on a temporary file next to `path`, flushes it to disk and renames
    it to `path`: `path` holds its old bytes or all the new ones, never a part.

    **Returns:** the SHA-256 (hex) of the bytes written, read back from the disk.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        digest = hashlib.sha256(temporary.read_bytes()).hexdigest()
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return digest


def _fsync_directory(directory: pathlib.Path) -> None:
    # The rename itself reaches the disk only once the directory entry does.
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    out: pathlib.Path, model, optimiser_state, step: int, record: dict, side_files
) -> None:
    """Writes the checkpoint of step `step` to `out`.

    **Arguments:**

    - `model`, `optimiser_state`: what `load_state` reads back.
    - `record`: what else to keep (settings, history), JSON-serialisable.
    - `side_files`: `{file name: bytes}` to write beside it (a tokenizer).

    **Raises:** `SystemExit` if a parameter is not finite: a diverged run never
    replaces the checkpoint it started from.
    """
    params = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    if not all(np.isfinite(leaf).all() for leaf in params):
        raise SystemExit(
            f"step {step}: the model's parameters are not finite (the training "
            f"diverged); {out / RECORD_FILE} is left as it was. Try a lower "
            "--learning-rate."
        )
    _remove_leftovers(out, [*side_files, STATE_FILE, RECORD_FILE])
    digests = {
        name: write_atomically(out / name, lambda file, data=data: file.write(data))
        for name, data in side_files.items()
    }
    digests[STATE_FILE] = write_atomically(
        out / STATE_FILE,
        lambda file: eqx.tree_serialise_leaves(file, (model, optimiser_state, step)),
    )
    record = {"step": step, "sha256": digests, **record}
    text = json.dumps(record, indent=2) + "\n"
    write_atomically(out / RECORD_FILE, lambda file: file.write(text.encode()))


def _remove_leftovers(out: pathlib.Path, names) -> None:
    """Removes the temporary files of saves that were killed before their rename."""
    for name in names:
        for leftover in out.glob(f".{name}.*.tmp"):
            leftover.unlink(missing_ok=True)


def read_record(out: pathlib.Path) -> dict:
    """The record of the checkpoint in `out`, once every file it lists is there with
    the bytes it was saved with.

    **Raises:** `SystemExit` naming the file, if there is no checkpoint, if a file is
    missing, or if a file does not match the record (a save cut short between two
    files, or a file copied from another run).
    """
    path = out / RECORD_FILE
    if not path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {path}.")
    if path.stat().st_size > MAX_RECORD_BYTES:
        raise SystemExit(f"--resume: {path} is over {MAX_RECORD_BYTES} bytes.")
    try:
        record = json.loads(path.read_text())
        step, digests = record["step"], dict(record["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise SystemExit(
            f"--resume: {path} is not a checkpoint record of this example "
            f"({type(error).__name__}: {error})."
        ) from None
    for name, expected in digests.items():
        file = out / name
        if pathlib.Path(name).name != name:
            raise SystemExit(f"--resume: {path} lists {name!r}, not a file in {out}.")
        if not file.is_file():
            raise SystemExit(
                f"--resume: {file} is missing; the checkpoint of step {step} in "
                f"{path} needs it."
            )
        found = hashlib.sha256(file.read_bytes()).hexdigest()
        if found != expected:
            raise SystemExit(
                f"--resume: {file} does not belong to the checkpoint of step {step} "
                f"in {path} (SHA-256 {found[:16]}..., expected {expected[:16]}...): "
                "a save was cut short between the two files, or one was replaced. "
                "Restore a matching pair, or start afresh without --resume."
            )
    return record


def load_state(out: pathlib.Path, model, optimiser_state, record: dict):
    """The model and optimiser state of the checkpoint whose record is `record` (see
    `read_record`); `model` and `optimiser_state` give the structure to read into."""
    model, optimiser_state, step = eqx.tree_deserialise_leaves(
        out / STATE_FILE, (model, optimiser_state, 0)
    )
    if step != record["step"]:
        raise SystemExit(
            f"--resume: {out / STATE_FILE} holds step {step}, {out / RECORD_FILE} "
            f"step {record['step']}."
        )
    return model, optimiser_state
