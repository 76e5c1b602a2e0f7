"""The training example as 2 processes x 2 CPU devices (jax.distributed on the loopback
address): against one process at the same global batch, killed in the middle of a
save and resumed, and started with settings that differ."""

import os
import pathlib
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
from test_examples import load_run

EXAMPLE = pathlib.Path(__file__).resolve().parents[2] / "examples" / "train_tiny_lm.py"
SETTINGS = [
    "--tokenizer", "byte",
    "--steps", "4",
    "--batch-size", "8",
    "--seq-len", "32",
    "--hidden-size", "32",
    "--intermediate-size", "64",
    "--num-layers", "1",
    "--num-heads", "2",
    "--num-kv-heads", "1",
    "--eval-every", "2",
    "--eval-bytes", "2048",
    "--train-bytes", "65536",
    "--sample-length", "4",
    "--num-samples", "1",
]  # fmt: skip
TIMEOUT = 600
# Runs the example with orbax's final rename of a step directory (every file of the
# step written) replaced by a SIGKILL, at the step `KILL_AT_STEP` names.
KILLED_IN_A_SAVE = """
import os, runpy, signal, sys
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def killed_before_the_rename(self):
    if self.get_final().name == os.environ["KILL_AT_STEP"]:
        os.kill(os.getpid(), signal.SIGKILL)
    await finalize(self)

atomicity.AtomicRenameTemporaryPath.finalize = killed_before_the_rename
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch(
    out: pathlib.Path, *extra: str, devices: int, kill_at_step: int | None = None
) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join([str(EXAMPLE.parents[1]), str(EXAMPLE.parent)]),
        JAX_PLATFORMS="cpu",
    )
    command = [str(EXAMPLE), *SETTINGS, "--out", str(out), *extra]
    if kill_at_step is not None:
        env["KILL_AT_STEP"] = str(kill_at_step)
        command = ["-c", KILLED_IN_A_SAVE, *command]
    return subprocess.Popen(
        [sys.executable, *command],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen]) -> None:
    """Waits for every process, which must succeed; on a failure or the time limit,
    stops the rest."""
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        stop(processes)


def stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.kill()
            process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch_two(out: pathlib.Path, *extra, per_process=((), ()), kill_at_step=None):
    """Starts the example as 2 processes of 2 devices, on one `--out`; the first
    process gets `per_process[0]` too, the second `per_process[1]`."""
    coordinator = f"127.0.0.1:{free_port()}"
    return [
        launch(
            out,
            "--num-processes", "2",
            "--process-id", str(index),
            "--coordinator", coordinator,
            *extra,
            *own,
            devices=2,
            kill_at_step=kill_at_step,
        )
        for index, own in enumerate(per_process)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """Four steps as 2 processes, saving every 2 steps, uninterrupted."""
    out = tmp_path_factory.mktemp("two")
    finish(launch_two(out, "--save-every", "2"))
    return out


def test_two_processes_match_one(two_processes, tmp_path):
    finish([launch(tmp_path, devices=1)])
    _, two = load_run(two_processes)
    _, one = load_run(tmp_path)
    # Both processes wrote their shards of the arrays into one checkpoint.
    for step in (2, 4):
        state = two_processes / "checkpoints" / str(step) / "state"
        for index in (0, 1):
            assert any((state / f"ocdbt.process_{index}").rglob("*")), (step, index)
    assert two["step"] == one["step"] == 4
    assert [step for step, _ in two["history"]["held_out"]] == [2, 4]
    for (_, bits_two), (_, bits_one) in zip(
        two["history"]["held_out"], one["history"]["held_out"], strict=True
    ):
        assert abs(bits_two - bits_one) <= 0.01
    # The same global batches: the training losses agree too, to float32 rounding
    # of a sum split over 4 devices.
    for loss_two, loss_one in zip(
        two["history"]["train_loss"], one["history"]["train_loss"], strict=True
    ):
        assert abs(loss_two - loss_one) <= 1e-4 * abs(loss_one)


def test_two_processes_killed_in_a_save_resume_exactly(two_processes, tmp_path):
    """Saving every step, the run dies as process 0 is about to commit step 2 (every
    file of it written); the other process is killed with it. `--resume` continues
    from step 1 and ends with the uninterrupted run's weights and optimiser state,
    bit for bit."""
    processes = launch_two(tmp_path, "--save-every", "1", kill_at_step=2)
    try:
        assert processes[0].wait(timeout=TIMEOUT) == -signal.SIGKILL, processes[
            0
        ].communicate()[1][-3000:]
    finally:
        stop(processes)
    checkpoints = tmp_path / "checkpoints"
    assert sorted(
        path.name for path in checkpoints.iterdir() if path.name.isdigit()
    ) == ["1"]
    (unfinished,) = [path for path in checkpoints.iterdir() if "tmp" in path.name]
    assert unfinished.name.startswith("2") and any(unfinished.rglob("*"))
    finish(launch_two(tmp_path, "--resume"))
    assert not unfinished.exists()  # Removed on resuming.
    resumed_state, resumed = load_run(tmp_path, state=True)
    straight_state, straight = load_run(two_processes, state=True)
    assert resumed["step"] == 4
    for leaf, expected in zip(resumed_state, straight_state, strict=True):
        assert np.asarray(leaf).tobytes() == np.asarray(expected).tobytes()
    assert resumed["history"] == straight["history"]


def test_processes_started_with_different_seeds_stop(tmp_path):
    processes = launch_two(tmp_path, per_process=(("--seed", "0"), ("--seed", "1")))
    try:
        for index, process in enumerate(processes):
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 1
            assert (
                f"The 2 processes were started with different --seed (process "
                f"{index} has {index})"
            ) in stderr
    finally:
        stop(processes)
    assert not any(tmp_path.iterdir())  # Stopped before anything was written.
