"""Side-by-side timing and memory measurement shared by every benchmark.

Timing is interleaved: each round times every case once, in a rotating order, so that
drift in the machine's speed (other processes, thermal state) falls on all cases alike.
The minimum, median and maximum over rounds are reported, with the medians' ratios to
a baseline case. A goal an issue sets is checked with `check_goal`, which prints it as
met or MISSED and returns a `Goal` for `main()` to return among its rows.
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
    """One measured case of one benchmark: milliseconds per call (min, median and max
    over the interleaved rounds), or for a benchmark named `*_mib` one figure in MiB
    (in `median_ms`, with no min or max)."""

    benchmark: str
    case: str
    median_ms: float
    ratio: float
    baseline: str
    min_ms: float | None = None
    max_ms: float | None = None


@dataclass
class Goal:
    """A goal an issue sets, such as "reduced loss / naive loss <= 1.05x", with the
    figure measured against it."""

    description: str
    source: str
    measured: float
    limit: float
    at_least: bool = False
    unit: str = "x"

    @property
    def met(self) -> bool:
        if self.at_least:
            return self.measured >= self.limit
        return self.measured <= self.limit

    @property
    def verdict(self) -> str:
        return "met" if self.met else "MISSED"

    @property
    def target(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:.4g}{self.unit}"


def check_goal(
    description: str,
    measured: float,
    limit: float,
    *,
    source: str,
    at_least: bool = False,
    unit: str = "x",
) -> Goal:
    """Prints whether `measured` meets `limit` (at most it, or `at_least`) and returns
    the `Goal`, for `main()` to return alongside its rows (`run_all.py` lists every
    goal at the top of the performance page)."""
    goal = Goal(description, source, measured, limit, at_least, unit)
    print(
        f"  goal ({source}) {description}: {measured:.4g}{unit}, "
        f"{goal.target}: {goal.verdict}"
    )
    return goal


def check_ratio_goal(
    rows: list[Row], case: str, limit: float, *, source: str, at_least: bool = False
) -> Goal:
    """`check_goal` on the ratio of `case`'s row (one of `report`'s rows) to its
    baseline."""
    row = next(row for row in rows if row.case == case)
    description = f"{row.benchmark}: {case} / {row.baseline}"
    return check_goal(description, row.ratio, limit, source=source, at_least=at_least)


def machine_description() -> str:
    device = jax.devices()[0]
    cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"JAX {jax.__version__} on {device.platform} ({device.device_kind})"
    )


class _SmokeRun:
    """`run_all.py --rounds N` sets `rounds` for every benchmark (a quick check that
    they run, not figures), and learns from `skipped_seconds` what the rounds left
    out would have taken."""

    rounds: int | None = None
    skipped_seconds: float = 0.0


SMOKE_RUN = _SmokeRun()


def rounds_to_run(rounds: int) -> int:
    """`rounds`, unless a smoke run sets fewer."""
    return rounds if SMOKE_RUN.rounds is None else min(rounds, SMOKE_RUN.rounds)


def _run(fn: Callable[[], Any], number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / number


class Timings(dict):
    """Median seconds per call by case name, with every round's seconds per call in
    `samples` (for the minimum and maximum)."""

    samples: dict[str, list[float]]


def time_interleaved(
    cases: dict[str, Callable[[], Any]],
    *,
    rounds: int = 15,
    min_round_seconds: float = 0.05,
    samples: dict[str, list[float]] | None = None,
) -> Timings:
    """Median seconds per call of each zero-argument callable, measured interleaved.

    Each case is called once first (compilation), then calibrated to a number of calls
    per round that takes at least `min_round_seconds`. The result's `samples` (also
    written into `samples` if a dict is passed) holds every round's seconds per call,
    per case.
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
    run_rounds = rounds_to_run(rounds)
    start = time.perf_counter()
    for r in range(run_rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(_run(cases[name], numbers[name]))
    per_round = (time.perf_counter() - start) / run_rounds
    SMOKE_RUN.skipped_seconds += (rounds - run_rounds) * per_round
    timings = Timings({name: median(values) for name, values in samples.items()})
    timings.samples = samples
    return timings


def report(benchmark: str, medians: dict[str, float], *, baseline: str) -> list[Row]:
    """Prints a table of min/median/max and the medians' ratios to `baseline`;
    returns its rows. `medians` is `time_interleaved`'s result (a plain dict of
    medians gives rows without min and max)."""
    base = medians[baseline]
    samples = getattr(medians, "samples", {})
    rows = []
    for name, seconds in medians.items():
        low, high = (
            f(samples[name]) * 1e3 if name in samples else None for f in (min, max)
        )
        rows.append(
            Row(benchmark, name, seconds * 1e3, seconds / base, baseline, low, high)
        )
    width = max(len(row.case) for row in rows)
    print(f"\n{benchmark}  (ms: min, median, max; ratio of medians to {baseline!r})")
    for row in rows:
        figures = (row.min_ms, row.median_ms, row.max_ms)
        text = "  ".join(
            f"{ms:10.3f}" if ms is not None else " " * 10 for ms in figures
        )
        print(f"  {row.case:<{width}}  {text}  {row.ratio:6.2f}x")
    return rows


def compiled_temp_bytes(fn: Callable, *args: Any) -> int:
    """XLA's temporary buffer bytes for `jax.jit(fn)(*args)`, from compilation alone.

    `args` may be `jax.ShapeDtypeStruct`s: nothing is allocated or run.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes
