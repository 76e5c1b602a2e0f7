"""Runs every `benchmarks/bench_*.py` in one process and writes the performance page.

    python benchmarks/run_all.py                  # all of them
    python benchmarks/run_all.py --only rope      # those whose name contains "rope"

Each script's `main()` times its cases side by side with their peers (interleaved,
medians, ratios to a baseline; see `_harness.py`) and returns its rows. This collects
them into `docs/performance.md` (a table per benchmark, with the machine it ran on) and
`docs/images/performance.png` (the ratios, plotted). A benchmark whose name ends in
`_mib` reports XLA's temporary memory in MiB rather than a time.
"""

import argparse
import datetime
import importlib
import os
import pathlib
import sys
import traceback
from collections.abc import Callable

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from _harness import Row, machine_description  # noqa: E402

MEMORY_SUFFIX = "_mib"


def benchmark_scripts(only: str | None) -> list[pathlib.Path]:
    scripts = sorted(HERE.glob("bench_*.py"))
    return [s for s in scripts if only is None or only in s.stem]


def run_scripts(
    scripts: list[pathlib.Path],
) -> tuple[dict[str, list[Row]], dict[str, str], dict[str, str]]:
    """Each script's rows, its docstring's first paragraph, and the errors of those
    that failed (a failure does not stop the others)."""
    rows, summaries, failures = {}, {}, {}
    for script in scripts:
        print(f"\n=== {script.name}", flush=True)
        try:
            module = importlib.import_module(script.stem)
            summaries[script.stem] = (module.__doc__ or "").strip().split("\n\n")[0]
            main: Callable[[], list[Row]] = module.main
            rows[script.stem] = main()
        except Exception:
            failures[script.stem] = traceback.format_exc()
            print(failures[script.stem], file=sys.stderr)
    return rows, summaries, failures


def group_by_benchmark(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(row.benchmark, []).append(row)
    return groups


def markdown_table(rows: list[Row]) -> str:
    is_memory = rows[0].benchmark.endswith(MEMORY_SUFFIX)
    unit = "MiB of temporaries" if is_memory else "median"
    lines = [
        f"| case | {unit} | ratio to `{rows[0].baseline}` |",
        "| --- | ---: | ---: |",
    ]
    for row in rows:
        value = f"{row.median_ms:,.0f} MiB" if is_memory else _time(row.median_ms)
        lines.append(f"| {row.case} | {value} | {row.ratio:.2f}x |")
    return "\n".join(lines)


def _time(milliseconds: float) -> str:
    if milliseconds >= 1000:
        return f"{milliseconds / 1000:.2f} s"
    if milliseconds >= 1:
        return f"{milliseconds:.3f} ms"
    return f"{milliseconds * 1000:.1f} µs"


def write_page(
    path: pathlib.Path,
    rows: dict[str, list[Row]],
    summaries: dict[str, str],
    failures: dict[str, str],
    plot: pathlib.Path,
) -> None:
    today = datetime.date.today().isoformat()
    parts = [
        "# Performance",
        "",
        "Every benchmark runs our modules side by side with the raw `jnp` form and the "
        "peers (Equinox, flax, keras_hub, penzai), in one process, interleaved: each "
        "round times every case once, in a rotating order, so that a change in the "
        "machine's speed falls on all cases alike. The tables give medians over the "
        "rounds and ratios to a baseline (below 1: faster than the baseline). Memory "
        "is XLA's temporary buffers from `memory_analysis()` of the compiled program.",
        "",
        f"Measured on {today}, on {machine_description()}, with a load average of "
        f"{os.getloadavg()[0]:.1f} when it started (other processes running make the "
        "times noisy; the interleaving keeps the ratios fair). Regenerate this page "
        "with `python benchmarks/run_all.py`.",
        "",
        f"![Ratios to each benchmark's baseline]({plot.relative_to(path.parent)})",
        "",
    ]
    for script, script_rows in rows.items():
        parts += [f"## `{script}.py`", "", summaries[script], ""]
        for benchmark, group in group_by_benchmark(script_rows).items():
            parts += [f"### {benchmark}", "", markdown_table(group), ""]
    for script, error in failures.items():
        last_line = error.strip().splitlines()[-1]
        parts += [f"## `{script}.py`", "", f"Failed: `{last_line}`", ""]
    path.write_text("\n".join(parts))
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
        "--page", type=pathlib.Path, default=ROOT / "docs" / "performance.md"
    )
    parser.add_argument(
        "--plot",
        type=pathlib.Path,
        default=ROOT / "docs" / "images" / "performance.png",
    )
    args = parser.parse_args(argv)
    scripts = benchmark_scripts(args.only)
    if not scripts:
        raise SystemExit(f"No benchmarks/bench_*.py matches --only {args.only!r}.")
    print(machine_description())
    rows, summaries, failures = run_scripts(scripts)
    write_plot(args.plot, rows)
    write_page(args.page, rows, summaries, failures, args.plot)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
