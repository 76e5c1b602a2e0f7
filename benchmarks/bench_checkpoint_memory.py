"""Peak resident memory of `TransformerLM.from_huggingface` against the bytes of the
weights it loads: a Llama-style float32 checkpoint of about 1 GiB is written, then
loaded in a fresh process, whose peak resident set (`VmHWM`, reset after the imports
where Linux allows, else `ru_maxrss`) above its resident set after the imports is
the loader's cost.

Goal (issue item 5): peak above the baseline at most 1.2x the weights' bytes. A
missed goal prints as MISSED.

    python benchmarks/bench_checkpoint_memory.py
"""

import json
import math
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
from typing import Any

# vocab 32000, width 2048, MLP 5632, 3 layers, 16 heads over 4 key/value heads,
# untied: 1.07e9 bytes of float32.
FULL_SIZE = dict(
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_layers=3,
    num_heads=16,
    num_kv_heads=4,
)
GOAL = 1.2
_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}


def _status_kib(field: str) -> int | None:
    """A `/proc/self/status` figure in KiB (`VmRSS`, `VmHWM`), None off Linux."""
    try:
        lines = pathlib.Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Resets `VmHWM` to the current resident set (Linux 4.0+), so that the peak
    measured is the load's alone."""
    try:
        pathlib.Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _max_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def write_checkpoint(directory: str, size: dict) -> None:
    """A randomly initialised float32 model of `size` written to `directory`."""
    import jax

    from eqx_embed import TransformerConfig, TransformerLM

    config = TransformerConfig("llama", **size, tie_word_embeddings=False)
    TransformerLM(config, key=jax.random.key(0)).to_huggingface(directory)


def measure_load(directory: str) -> dict:
    """Loads the checkpoint in `directory`; the resident bytes after the imports, at
    the peak of the load, and the weights' bytes."""
    import jax

    from eqx_embed import TransformerLM

    # A first (tiny) array, so that the baseline holds the backend's own start-up.
    jax.block_until_ready(jax.numpy.zeros(8))
    baseline_kib = _status_kib("VmRSS")
    if baseline_kib is not None and _reset_peak():
        baseline = baseline_kib * 1024

        def peak_bytes() -> int:
            return 1024 * (_status_kib("VmHWM") or 0)
    else:
        baseline, peak_bytes = _max_rss_bytes(), _max_rss_bytes
    model = TransformerLM.from_huggingface(directory)
    jax.block_until_ready(model)
    peak = peak_bytes()
    return dict(baseline=baseline, peak=peak, weights=_stored_bytes(directory))


def _stored_bytes(directory: str) -> int:
    """The bytes of the tensors in `directory`'s `model.safetensors`, from its header
    (as safetensors reads it)."""
    from safetensors import safe_open

    total = 0
    with safe_open(os.path.join(directory, "model.safetensors"), "numpy") as file:
        for name in file.offset_keys():
            tensor = file.get_slice(name)
            total += math.prod(tensor.get_shape()) * _DTYPE_BYTES[tensor.get_dtype()]
    return total


def _in_subprocess(function: str, *args: Any) -> str:
    """`function(*args)`'s JSON result, from a fresh Python process."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "import bench_checkpoint_memory as bench; "
        f"print(json.dumps(bench.{function}(*map(json.loads, sys.argv[2:]))))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, here, *map(json.dumps, args)],
        capture_output=True,
        text=True,
        check=True,
    )
    return result.stdout.strip().splitlines()[-1]


def main(size: dict | None = None) -> list:
    from _harness import Row, check_goal, machine_description

    size = FULL_SIZE if size is None else size
    print(machine_description())
    with tempfile.TemporaryDirectory() as directory:
        # Each in its own process: the writer's arrays are not the loader's.
        _in_subprocess("write_checkpoint", directory, size)
        figures = json.loads(_in_subprocess("measure_load", directory))
    loaded = figures["peak"] - figures["baseline"]
    ratio = loaded / figures["weights"]
    label = f"float32 Llama, {figures['weights'] / 2**30:.2f} GiB of weights"
    print(f"\nfrom_huggingface peak resident memory, {label}")
    print(f"  after imports  {figures['baseline'] / 2**20:9.0f} MiB")
    print(f"  peak           {figures['peak'] / 2**20:9.0f} MiB")
    print(f"  peak - imports {loaded / 2**20:9.0f} MiB  {ratio:6.2f}x the weights")
    weights_mib = figures["weights"] / 2**20
    return [
        Row("checkpoint_load_mib", "weights", weights_mib, 1.0, "weights"),
        Row(
            "checkpoint_load_mib",
            "peak above imports",
            loaded / 2**20,
            ratio,
            "weights",
        ),
        check_goal(
            f"from_huggingface peak resident memory / weights' bytes, {label}",
            ratio,
            GOAL,
            source="issue item 5",
        ),
    ]


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
