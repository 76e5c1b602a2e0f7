"""Runs every `benchmarks/bench_*.py` in one process and writes the performance page.

    python benchmarks/run_all.py                  # all of them
    python benchmarks/run_all.py --only rope      # those whose name contains "rope"
    python benchmarks/run_all.py --rounds 2 --page /tmp/p.md --plot /tmp/p.png
                                                  # a quick check that they all run

Each script's `main()` times its cases side by side with their peers (interleaved,
min/median/max, ratios to a baseline; see `_harness.py`) and returns its rows, and a
`Goal` for each goal an issue sets. This collects them into `docs/performance.md`
(the goals, met or MISSED, first; then a table per benchmark; the machine, the date,
the load and the commit measured) and `docs/images/performance.png` (the ratios,
plotted). A benchmark whose name ends in `_mib` reports XLA's temporary memory in MiB
rather than a time.
"""

import argparse
import datetime
import importlib
import os
import pathlib
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _harness import SMOKE_RUN, Goal, Row, machine_description  # noqa: E402

MEMORY_SUFFIX = "_mib"


@dataclass
class Results:
    """What the scripts returned, by script name, and how long each took."""

    rows: dict[str, list[Row]] = field(default_factory=dict)
    goals: dict[str, list[Goal]] = field(default_factory=dict)
    summaries: dict[str, str] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class Conditions:
    """Where and when the figures were measured."""

    machine: str
    started: datetime.datetime
    load_at_start: tuple[float, float, float]
    load_at_end: tuple[float, float, float]
    commit: str
    rounds: int | None = None


def benchmark_scripts(only: str | None) -> list[pathlib.Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    return [s for s in scripts if only is None or only in s.stem]


def run_scripts(scripts: list[pathlib.Path]) -> Results:
    """Each script's rows and goals, its docstring's first paragraph, its run time,
    and the errors of those that failed (a failure does not stop the others)."""
    results = Results()
    for script in scripts:
        name = script.stem
        print(f"\n=== {script.name}", flush=True)
        start = time.perf_counter()
        try:
            module = importlib.import_module(name)
            results.summaries[name] = (module.__doc__ or "").strip().split("\n\n")[0]
            main: Callable[[], list[Row | Goal]] = module.main
            returned = main()
            results.rows[name] = [r for r in returned if isinstance(r, Row)]
            results.goals[name] = [g for g in returned if isinstance(g, Goal)]
        except Exception:
            results.failures[name] = traceback.format_exc()
            print(results.failures[name], file=sys.stderr)
        results.seconds[name] = time.perf_counter() - start
    return results


def git_commit(checkout: pathlib.Path = ROOT) -> str:
    """The checkout's short commit, with "+ uncommitted changes" if its files differ
    from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=checkout, capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{commit} + uncommitted changes" if dirty else commit


def group_by_benchmark(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.benchmark, []).append(row)
    return groups


def markdown_table(rows: list[Row]) -> str:
    """A table of the rows' figures and ratios; where the rows have different
    baselines, a column names each row's."""
    is_memory = rows[0].benchmark.endswith(MEMORY_SUFFIX)
    figures = ["MiB of temporaries"] if is_memory else ["min", "median", "max"]
    baselines = {row.baseline for row in rows}
    if len(baselines) == 1:
        ratio, baseline_column = f"ratio to `{rows[0].baseline}`", []
    else:
        ratio, baseline_column = "ratio to its baseline", ["baseline"]
    if not is_memory:
        ratio = "median " + ratio
    header = ["case", *figures, ratio, *baseline_column]
    alignment = ["---", *["---:"] * (len(figures) + 1), *["---"] * len(baseline_column)]
    lines = [_markdown_row(header), _markdown_row(alignment)]
    for row in rows:
        if is_memory:
            cells = [f"{row.median_ms:,.0f} MiB"]
        else:
            spread = (row.min_ms, row.median_ms, row.max_ms)
            cells = [_time(ms) if ms is not None else "n/a" for ms in spread]
        baseline = [f"`{row.baseline}`"] if baseline_column else []
        lines.append(_markdown_row([row.case, *cells, f"{row.ratio:.2f}x", *baseline]))
    return "\n".join(lines)


def _markdown_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _time(milliseconds: float) -> str:
    if milliseconds >= 1000:
        return f"{milliseconds / 1000:.2f} s"
    if milliseconds >= 1:
        return f"{milliseconds:.3f} ms"
    return f"{milliseconds * 1000:.1f} µs"


def goals_section(results: Results) -> list[str]:
    """The table of every goal, met or MISSED, and the scripts whose goals are not
    measured because they failed."""
    goals = [goal for script_goals in results.goals.values() for goal in script_goals]
    missed = sum(not goal.met for goal in goals)
    parts = [
        "## Goals",
        "",
        f"{len(goals) - missed} of the {len(goals)} goals the issues set are met"
        + (f"; **{missed} MISSED**." if missed else "."),
        "",
        "| goal | set by | measured | goal | |",
        "| --- | --- | ---: | ---: | --- |",
    ]
    for goal in goals:
        verdict = "met" if goal.met else "**MISSED**"
        parts.append(
            f"| {goal.description} | {goal.source} | {goal.measured:.4g}{goal.unit} "
            f"| {goal.target} | {verdict} |"
        )
    parts.append("")
    for script in results.failures:
        parts += [f"`{script}.py` failed: its goals, if any, are not measured.", ""]
    return parts


def _load(averages: tuple[float, float, float]) -> str:
    return ", ".join(f"{average:.2f}" for average in averages)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def page_markdown(results: Results, conditions: Conditions, plot: str) -> str:
    """The performance page: conditions, goals, then a section per script."""
    per_script = ", ".join(
        f"`{script}` {_minutes(seconds)}" for script, seconds in results.seconds.items()
    )
    parts = [
        "# Performance",
        "",
        "Every benchmark runs our modules side by side with the raw `jnp` form and "
        "the peers (Equinox, flax, keras, keras_hub, penzai), in one process, "
        "interleaved: each round times every case once, in a rotating order, so that "
        "a change in the machine's speed falls on all cases alike. The tables give "
        "the minimum, median and maximum over the rounds (their spread is the noise) "
        "and the medians' ratios to a baseline (below 1: faster than the baseline). "
        "Memory is XLA's temporary buffers from `memory_analysis()` of the compiled "
        "program, one figure, without noise.",
        "",
        f"- Commit: `{conditions.commit}`",
        f"- Date: {conditions.started:%Y-%m-%d %H:%M} UTC",
        f"- Machine: {conditions.machine}",
        f"- Load average (1, 5, 15 min): {_load(conditions.load_at_start)} when the "
        f"run started, {_load(conditions.load_at_end)} when it ended; other processes "
        "running make the times noisy, the interleaving keeps the ratios fair",
        f"- Run time: {_minutes(sum(results.seconds.values()))} ({per_script})",
    ]
    if conditions.rounds is not None:
        parts.append(
            f"- **A smoke run**: at most {conditions.rounds} rounds per benchmark, to "
            "check that they run; these are not figures to quote"
        )
    parts += [
        "",
        "Regenerate this page with `python benchmarks/run_all.py`.",
        "",
        *goals_section(results),
        f"![Ratios to each benchmark's baseline]({plot})",
        "",
    ]
    for script, script_rows in results.rows.items():
        parts += [f"## `{script}.py`", "", results.summaries[script], ""]
        for benchmark, group in group_by_benchmark(script_rows).items():
            parts += [f"### {benchmark}", "", markdown_table(group), ""]
    for script, error in results.failures.items():
        last_line = error.strip().splitlines()[-1]
        parts += [f"## `{script}.py`", "", f"Failed: `{last_line}`", ""]
    return "\n".join(parts)


def write_text(path: pathlib.Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
    print(f"wrote {path}")


def write_plot(path: pathlib.Path, rows: dict[str, list[Row]]) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [
        (benchmark, group)
        for script_rows in rows.values()
        for benchmark, group in group_by_benchmark(script_rows).items()
    ]
    if not groups:
        return
    heights = [len(group) for _, group in groups]
    figure, axes = plt.subplots(
        len(groups),
        1,
        figsize=(9, 0.32 * sum(heights) + 0.9 * len(groups)),
        gridspec_kw={"height_ratios": heights},
        squeeze=False,
    )
    for ax, (benchmark, group) in zip(axes[:, 0], groups, strict=True):
        ratios = [row.ratio for row in group]
        colors = ["tab:green" if ratio < 1 else "tab:red" for ratio in ratios]
        # Bars grow from 1 (the baseline) to the ratio: left is faster, right slower.
        ax.barh(
            [row.case for row in group],
            [ratio - 1 for ratio in ratios],
            left=1,
            color=colors,
        )
        for y, ratio in enumerate(ratios):
            side = "left" if ratio >= 1 else "right"
            ax.text(ratio, y, f" {ratio:.2f}x ", va="center", ha=side, fontsize=7)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.margins(x=0.15)
        ax.invert_yaxis()
        ax.set_title(benchmark, fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3, which="both")
    axes[-1, 0].set_xlabel("time (or memory) / the baseline's; log scale")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the scripts whose name contains this")
    parser.add_argument(
        "--rounds",
        type=int,
        help="at most this many rounds per benchmark: a quick check that they run, "
        "marked as such on the page",
    )
    parser.add_argument(
        "--page", type=pathlib.Path, default=ROOT / "docs" / "performance.md"
    )
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=ROOT / "docs" / "images" / "performance.png",
    )
    args = parser.parse_args(argv)
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    scripts = benchmark_scripts(args.only)
    if not scripts:
        raise SystemExit(f"No benchmarks/bench_*.py matches --only {args.only!r}.")
    SMOKE_RUN.rounds = args.rounds
    started, load_at_start = (
        datetime.datetime.now(datetime.UTC),
        os.getloadavg(),
    )
    commit = git_commit()  # before the page changes the checkout
    print(f"{machine_description()}; commit {commit}")
    results = run_scripts(scripts)
    conditions = Conditions(
        machine=machine_description(),
        started=started,
        load_at_start=load_at_start,
        load_at_end=os.getloadavg(),
        commit=commit,
        rounds=args.rounds,
    )
    write_plot(args.plot, results.rows)
    plot = os.path.relpath(args.plot, args.page.parent)
    write_text(args.page, page_markdown(results, conditions, plot))
    total = sum(results.seconds.values())
    cpu = os.times()
    print(
        f"run time {_minutes(total)}; CPU time {_minutes(cpu.user + cpu.system)}, "
        f"of which children's {_minutes(cpu.children_user + cpu.children_system)}"
    )
    if args.rounds is not None:
        full = total + SMOKE_RUN.skipped_seconds
        print(f"with every benchmark's own rounds: about {_minutes(full)}")
    return 1 if results.failures else 0


if __name__ == "__main__":
    sys.exit(main())
