"""Side-by-side timing and memory measurement shared by every benchmark.

Timing is interleaved: each round times every case once, in a rotating order, so that
drift in the machine's speed (other processes, thermal state) falls on all cases alike.
Medians over rounds are reported, with ratios to a baseline case.
"""

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from statistics import median
from typing import Any

import jax


@dataclass
class Row:
    """One measured case of one benchmark."""

    benchmark: str
    case: str
    median_ms: float
    ratio: float
    baseline: str


def machine_description() -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
    )


def _run(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    *,
    rounds: int = 15,
    min_round_seconds: float = 0.05,
    samples: dict[str, list[float]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of each zero-argument callable, measured interleaved.

    Each case is called once first (compilation), then calibrated to a number of calls
    per round that takes at least `min_round_seconds`. Pass a dict as `samples` to
    receive every round's seconds per call, per case (for min/median/max).
    """
    numbers = {}
    for name, fn in cases.items():
        jax.block_until_ready(fn())
        once = _run(fn, 1)
        numbers[name] = max(1, int(min_round_seconds / max(once, 1e-7)))
    if samples is None:
        samples = {}
    samples.update({name: [] for name in cases})
    names = list(cases)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_run(cases[name], numbers[name]))
    return {name: median(values) for name, values in samples.items()}


def report(benchmark: str, medians: dict[str, float], *, baseline: str) -> list[Row]:
    """Prints a table of medians and ratios to `baseline`; returns its rows."""
    base = medians[baseline]
    rows = [
        Row(benchmark, name, seconds * 1e3, seconds / base, baseline)
        for name, seconds in medians.items()
    ]
    width = max(len(row.case) for row in rows)
    print(f"\n{benchmark}  (ratio: time / time of {baseline!r})")
    for row in rows:
        print(f"  {row.case:<{width}}  {row.median_ms:10.3f} ms  {row.ratio:6.2f}x")
    return rows


def compiled_temp_bytes(fn: Callable, *args: Any) -> int:
    """XLA's temporary buffer bytes for `jax.jit(fn)(*args)`, from compilation alone.

    `args` may be `jax.ShapeDtypeStruct`s: nothing is allocated or run.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes
