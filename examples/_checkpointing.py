"""The training example's checkpoints, with orbax: sharded, written by every process
at once, restored onto any mesh, and atomic, so that a kill at any moment leaves the
last good checkpoint whole.

A run's `--out` holds `checkpoints/<step>/`, one directory per saved step (the last
`KEEP_CHECKPOINTS`), each with two orbax items: `state`, the arrays of the model and
of the optimiser state (`StandardSave`: each process writes the shards it holds), and
`record`, a JSON of the step, the settings, the history and the SHA-256 of the side
files (the BPE's `tokenizer.json`, written once beside `checkpoints/`). Orbax writes a
step to a temporary directory and renames it when every process is done: a save cut
short leaves no step directory, and the next run removes its temporary one.
"""

import contextlib
import hashlib
import os
import pathlib
import signal
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

import equinox as eqx
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

CHECKPOINTS_DIR = "checkpoints"
# The newest step and the one before it: a step is deleted only once a newer one is
# whole, so one is always there; two spare a step that later turns out to be bad.
KEEP_CHECKPOINTS = 2


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
    # The rename itself reaches the disk only once the directory entry does.
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return digest


def checkpoint_manager(out: pathlib.Path) -> ocp.CheckpointManager:
    """The orbax manager of `out/checkpoints/`: every process of a run makes one, on a
    directory they all see. Saves are asynchronous (the arrays are copied to the host,
    then written while training goes on); the temporary directories of saves that were
    cut short are removed."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=KEEP_CHECKPOINTS, cleanup_tmp_directories=True
    )
    return ocp.CheckpointManager(out.absolute() / CHECKPOINTS_DIR, options=options)


@eqx.filter_jit
def _all_finite(arrays) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


def save_state(
    manager: ocp.CheckpointManager, step: int, model, optimiser_state, record: dict
) -> None:
    """Starts saving the checkpoint of step `step` (every process calls it); the save
    finishes in the background (`manager.wait_until_finished()`).

    **Arguments:**

    - `model`, `optimiser_state`: their arrays are saved, each shard by the process
        that holds it; `restore_state` reads them back onto any layout.
    - `record`: what else to keep (settings, history), JSON-serialisable.

    **Raises:** `SystemExit` if a parameter is not finite: a diverged run never
    saves over the checkpoints it started from.
    """
    if not _all_finite(jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))):
        raise SystemExit(
            f"step {step}: the model's parameters are not finite (the training "
            f"diverged); {manager.directory} is left as it was. Try a lower "
            "--learning-rate."
        )
    arrays = eqx.filter((model, optimiser_state), eqx.is_array)
    manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(arrays),
            record=ocp.args.JsonSave({"step": step, **record}),
        ),
    )


def latest_record(manager: ocp.CheckpointManager, out: pathlib.Path) -> dict:
    """The record of the newest whole checkpoint, once the side files it lists (in
    `out`) are there with the bytes it was saved with.

    **Raises:** `SystemExit` naming the file, if there is no checkpoint, if a side
    file is missing, or if one does not match the record (replaced since).
    """
    step = manager.latest_step()
    if step is None:
        raise SystemExit(f"--resume: no checkpoint at {manager.directory}.")
    restored = manager.restore(
        step, args=ocp.args.Composite(record=ocp.args.JsonRestore())
    )
    record = dict(restored.record)
    for name, expected in record.get("sha256", {}).items():
        file = out / name
        if pathlib.Path(name).name != name:
            raise SystemExit(f"--resume: step {step} lists {name!r}, not a file.")
        if not file.is_file():
            raise SystemExit(
                f"--resume: {file} is missing; the checkpoint of step {step} in "
                f"{manager.directory} needs it."
            )
        found = hashlib.sha256(file.read_bytes()).hexdigest()
        if found != expected:
            raise SystemExit(
                f"--resume: {file} does not belong to the checkpoint of step {step} "
                f"in {manager.directory} (SHA-256 {found[:16]}..., expected "
                f"{expected[:16]}...): it was replaced. Restore it, or start afresh "
                "without --resume."
            )
    return record


def restore_state(manager: ocp.CheckpointManager, step: int, model, optimiser_state):
    """The model and optimiser state saved at `step`, laid out as `model` and
    `optimiser_state` are (their shapes, dtypes and shardings: any mesh, any number of
    devices or processes), with their static parts."""
    arrays, static = eqx.partition((model, optimiser_state), eqx.is_array)
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), arrays
    )
    restored = manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
    )
    return eqx.combine(restored.state, static)
