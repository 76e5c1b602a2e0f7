import json
import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

# keras is a test oracle: it must run on JAX, set before it is imported.
os.environ.setdefault("KERAS_BACKEND", "jax")

import hypothesis  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile(
    "eqx_embed", max_examples=25, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("eqx_embed")


@pytest.fixture(scope="session")
def run_on_devices():
    """Runs a Python snippet in a fresh interpreter with 8 CPU devices (the device
    count is fixed when JAX starts, so it cannot change within this process) and
    returns the JSON object the snippet prints last."""

    def run(snippet: str, *, devices: int = 8, timeout: float = 600) -> Any:
        root = pathlib.Path(__file__).parent.parent
        env = dict(
            os.environ,
            XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
            PYTHONPATH=str(root),
            JAX_PLATFORMS="cpu",
        )
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(snippet)],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode:
            raise AssertionError(f"snippet failed:\n{result.stderr[-4000:]}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    return run
