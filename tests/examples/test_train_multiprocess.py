"""The training example as 2 processes x 2 CPU devices (jax.distributed on the loopback
address) against one process at the same global batch."""

import json
import os
import pathlib
import socket
import subprocess
import sys

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


def launch(out: pathlib.Path, *extra: str, devices: int) -> subprocess.Popen:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(EXAMPLE.parents[1]),
        JAX_PLATFORMS="cpu",
    )
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), *SETTINGS, "--out", str(out), *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: list[subprocess.Popen]) -> None:
    """Waits for every process; on a failure or the time limit, stops the rest."""
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=TIMEOUT)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def process_flags(index: int, coordinator: str) -> list[str]:
    return [
        "--num-processes", "2",
        "--process-id", str(index),
        "--coordinator", coordinator,
    ]  # fmt: skip


def test_two_processes_match_one(tmp_path):
    coordinator = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / "process0", tmp_path / "process1"]
    processes = [
        launch(out, *process_flags(index, coordinator), devices=2)
        for index, out in enumerate(outs)
    ]
    finish(processes)
    finish([launch(tmp_path / "one", devices=1)])

    two = json.loads((outs[0] / "checkpoint.json").read_text())
    one = json.loads((tmp_path / "one" / "checkpoint.json").read_text())
    # Process 0 alone writes the outputs.
    assert (outs[0] / "checkpoint.eqx").is_file()
    assert not any(outs[1].iterdir())
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
