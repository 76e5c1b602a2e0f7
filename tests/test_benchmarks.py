"""The benchmarks' shared harness and the performance page `benchmarks/run_all.py`
writes: min/median/max per timed case, the goals (met or MISSED) first, the commit
measured. Nothing heavy runs: the page is built from rows made here. And the GPU
check, `benchmarks/accelerator/run.sh`, run with `--smoke` on the CPU."""

import datetime
import os
import pathlib
import re
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _harness  # noqa: E402
import run_all  # noqa: E402
from _harness import Goal, Row  # noqa: E402


def results() -> run_all.Results:
    timed = [
        Row("lookup", "raw", 2.0, 1.0, "raw", 1.5, 3.25),
        Row("lookup", "ours", 2.5, 1.25, "raw", 2.25, 4000.0),
    ]
    memory = [Row("loss_temp_mib", "plain", 9018.0, 1.0, "plain")]
    goals = [
        Goal("ours / raw", "issue 2", 1.25, 1.02),
        Goal("temporaries", "issue 14", 256.0, 180.0, unit=" MiB"),
        Goal("cached / re-run", "issue 10", 281.0, 10.0, at_least=True),
    ]
    return run_all.Results(
        rows={"bench_a": timed + memory},
        goals={"bench_a": goals},
        summaries={"bench_a": "What bench_a measures."},
        failures={"bench_b": "Traceback ...\nValueError: bad size"},
        seconds={"bench_a": 90.0, "bench_b": 30.0},
    )


def conditions(rounds=None) -> run_all.Conditions:
    return run_all.Conditions(
        machine="x86_64, 2 cores",
        started=datetime.datetime(2026, 11, 21, 16, 5, tzinfo=datetime.UTC),
        load_at_start=(0.25, 0.5, 1.0),
        load_at_end=(2.0, 1.5, 1.25),
        commit="abc1234 + uncommitted changes",
        rounds=rounds,
    )


def table_rows(page: str, header_start: str) -> list[list[str]]:
    """The cells of the markdown table whose header starts with `header_start`."""
    lines = page.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_timed_rows_give_min_median_max_and_memory_rows_one_figure():
    page = run_all.page_markdown(results(), conditions(), "images/p.png")
    timed = table_rows(page, "| case | min |")
    assert timed[0] == ["case", "min", "median", "max", "median ratio to `raw`"]
    assert timed[2] == ["raw", "1.500 ms", "2.000 ms", "3.250 ms", "1.00x"]
    assert timed[3] == ["ours", "2.250 ms", "2.500 ms", "4.00 s", "1.25x"]
    memory = table_rows(page, "| case | MiB")
    assert memory[0] == ["case", "MiB of temporaries", "ratio to `plain`"]
    assert memory[2] == ["plain", "9,018 MiB", "1.00x"]


def test_rows_of_different_baselines_name_each_baseline():
    rows = [
        Row("depth", "scanned, 2", 1.0, 1.0, "scanned, 2", 0.5, 2.0),
        Row("depth", "unrolled, 8", 4.0, 2.0, "unrolled, 2", 3.0, 5.0),
    ]
    table = run_all.markdown_table(rows).splitlines()
    assert table[0] == (
        "| case | min | median | max | median ratio to its baseline | baseline |"
    )
    assert table[3] == (
        "| unrolled, 8 | 3.000 ms | 4.000 ms | 5.000 ms | 2.00x | `unrolled, 2` |"
    )


def test_goals_come_first_each_met_or_missed():
    page = run_all.page_markdown(results(), conditions(), "images/p.png")
    assert page.index("## Goals") < page.index("## `bench_a.py`")
    assert "1 of the 3 goals the issues set are met; **2 MISSED**." in page
    goals = table_rows(page, "| goal |")[2:]
    assert goals == [
        ["ours / raw", "issue 2", "1.25x", "<= 1.02x", "**MISSED**"],
        ["temporaries", "issue 14", "256 MiB", "<= 180 MiB", "**MISSED**"],
        ["cached / re-run", "issue 10", "281x", ">= 10x", "met"],
    ]
    assert "`bench_b.py` failed: its goals, if any, are not measured." in page


def test_the_page_states_commit_date_machine_load_and_run_time():
    page = run_all.page_markdown(results(), conditions(), "images/p.png")
    assert "- Commit: `abc1234 + uncommitted changes`" in page
    assert "- Date: 2026-11-21 16:05 UTC" in page
    assert "- Machine: x86_64, 2 cores" in page
    assert (
        "- Load average (1, 5, 15 min): 0.25, 0.50, 1.00 when the run started, "
        "2.00, 1.50, 1.25 when it ended" in page
    )
    assert "- Run time: 2.0 min (`bench_a` 1.5 min, `bench_b` 0.5 min)" in page
    assert "smoke run" not in page
    smoke = run_all.page_markdown(results(), conditions(rounds=2), "images/p.png")
    assert "**A smoke run**: at most 2 rounds per benchmark" in smoke


def test_git_commit_names_the_head_and_uncommitted_changes(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
            cwd=tmp_path,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("one")
    git("add", "a.txt")
    git("commit", "-qm", "one")
    head = git("rev-parse", "--short", "HEAD")
    assert run_all.git_commit(tmp_path) == head
    (tmp_path / "a.txt").write_text("two")
    assert run_all.git_commit(tmp_path) == f"{head} + uncommitted changes"


@pytest.mark.parametrize(
    ("measured", "limit", "at_least", "met"),
    [(1.05, 1.05, False, True), (1.06, 1.05, False, False), (9.9, 10, True, False)],
)
def test_check_goal_prints_met_or_missed(capsys, measured, limit, at_least, met):
    goal = _harness.check_goal(
        "ratio", measured, limit, source="issue 1", at_least=at_least
    )
    assert goal.met is met
    printed = capsys.readouterr().out
    assert re.search(r"\bmet$" if met else r"\bMISSED$", printed.strip())


def test_report_rows_carry_min_median_max_of_the_rounds(monkeypatch):
    monkeypatch.setattr(_harness.SMOKE_RUN, "rounds", 3)
    monkeypatch.setattr(_harness.SMOKE_RUN, "skipped_seconds", 0.0)
    calls = {"a": 0, "b": 0}

    def case(name):
        def run():
            calls[name] += 1
            time.sleep(0.002)  # so that a round is mostly the cases' time
            return jnp.zeros(())

        return run

    timings = _harness.time_interleaved(
        {"a": case("a"), "b": case("b")}, rounds=50, min_round_seconds=0
    )
    assert calls == {"a": 2 + 3, "b": 2 + 3}  # warm-up, calibration, 3 rounds
    rows = _harness.report("bench", timings, baseline="a")
    for row in rows:
        seconds = sorted(timings.samples[row.case])
        assert len(seconds) == 3
        assert row.min_ms == pytest.approx(seconds[0] * 1e3)
        assert row.median_ms == pytest.approx(seconds[1] * 1e3)
        assert row.max_ms == pytest.approx(seconds[2] * 1e3)
    assert rows[1].ratio == pytest.approx(rows[1].median_ms / rows[0].median_ms)
    # The 47 rounds a smoke run leaves out, at the rounds' mean time.
    mean_round = sum(sum(values) for values in timings.samples.values()) / 3
    assert _harness.SMOKE_RUN.skipped_seconds == pytest.approx(47 * mean_round, rel=0.2)


def test_the_gpu_check_runs_on_the_cpu_with_smoke(tmp_path):
    """`benchmarks/accelerator/run.sh --smoke`: tiny shapes on the CPU, so that the
    GPU check cannot rot while no GPU runs it."""
    page = tmp_path / "performance-gpu.md"
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        GPU_CHECK_PAGE=str(page),
        JAX_PLATFORMS="cpu",
    )
    env.pop("OUT", None)
    result = subprocess.run(
        ["bash", str(BENCHMARKS / "accelerator" / "run.sh"), "--smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verdicts = re.findall(
        r"^  (PASS|FAIL) (.+): (?:largest|shape)", result.stdout, re.MULTILINE
    )
    items = [item for _, item in verdicts]
    assert {verdict for verdict, _ in verdicts} == {"PASS"}
    for item in (
        "lookup, bfloat16",
        "decode, float32",
        "cross_entropy, bfloat16: d table",
        "mean_cross_entropy, float32: d hidden",
        "RoPE, bfloat16",
        "TransformerLM training step: loss",
        "TransformerLM training step: gradient along a random direction",
        "greedy generate, 8 tokens after 8",
    ):
        assert item in items
    text = page.read_text()
    for section in (
        "## Correctness",
        "## Goals",
        "## Fused loss + gradients",
        "## Lookup, decode and RoPE",
        "## TransformerLM training step",
        "## generate",
        "## How to read and rerun",
    ):
        assert section in text
    assert f"{len(items)} of the {len(items)} items PASS." in text
    assert "**A smoke run**" in text
    fused = table_rows(text, "| case | min |")
    assert [row[0] for row in fused[2:]] == [
        "materialised: h @ W.T, optax",
        "cross_entropy(...).mean()",
        "mean_cross_entropy",
    ]


def test_checkpoint_memory_benchmark_runs_small():
    """The checkpoint-loading benchmark end to end on a tiny model: its weights'
    bytes are the Llama parameter count's, and its goal is the measured ratio."""
    import bench_checkpoint_memory

    size = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    returned = bench_checkpoint_memory.main(size)
    rows = {row.case: row for row in returned if isinstance(row, Row)}
    (goal,) = [goal for goal in returned if isinstance(goal, Goal)]
    width, head_dim = size["hidden_size"], size["hidden_size"] // size["num_heads"]
    attention = 2 * width * width + 2 * width * size["num_kv_heads"] * head_dim
    layer = attention + 3 * width * size["intermediate_size"] + 2 * width
    parameters = 2 * size["vocab_size"] * width + size["num_layers"] * layer + width
    assert rows["weights"].median_ms * 2**20 == 4 * parameters
    peak = rows["peak above imports"]
    assert peak.ratio == pytest.approx(peak.median_ms / rows["weights"].median_ms)
    assert goal.measured == peak.ratio and goal.limit == 1.2


def test_remat_benchmark_runs_small():
    """The rematerialisation benchmark end to end on a tiny model: a memory row and a
    timed row per policy, and its goal is the measured ratio of `layer` to `none`."""
    import bench_remat

    size = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_layers=2,
        num_heads=2,
        batch=2,
        seq=16,
    )
    returned = bench_remat.main(size, rounds=2)
    (goal,) = [goal for goal in returned if isinstance(goal, Goal)]
    rows = [row for row in returned if isinstance(row, Row)]
    memory = {row.case: row for row in rows if row.benchmark.endswith("_mib")}
    timed = {row.case: row for row in rows if not row.benchmark.endswith("_mib")}
    assert list(memory) == list(timed) == ["none", "layer", "matmuls"]
    assert all(row.min_ms <= row.median_ms <= row.max_ms for row in timed.values())
    assert memory["layer"].ratio == memory["layer"].median_ms / memory["none"].median_ms
    assert goal.measured == memory["layer"].ratio and goal.limit == 0.35


def test_finetune_benchmark_runs_small():
    """The fine-tuning step benchmark on a tiny model: LoRA's trainable state is
    the gradients and two Adam moments of its adapters' factors, counted here from
    the shapes, and its goal is the measured ratio to the full fine-tune's."""
    import bench_finetune

    size = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
    )
    returned = bench_finetune.main(size, (2, 16))
    rows = {(row.benchmark, row.case): row for row in returned if isinstance(row, Row)}
    (goal,) = [goal for goal in returned if isinstance(goal, Goal)]
    width, inner, rank = 32, 48, bench_finetune.RANK
    kv = 2 * width // 4
    # Per layer: q, o (32 x 32), k, v (16 x 32), gate, up (48 x 32), down (32 x 48).
    shapes = [(width, width)] * 2 + [(kv, width)] * 2 + [(inner, width)] * 3
    adapters = 2 * sum(rank * (rows_ + columns) for rows_, columns in shapes)
    state = rows[("finetune_trainable_state_mib", "LoRA rank 8")]
    assert state.median_ms * 2**20 == 3 * 4 * adapters
    assert rows[("finetune_trainable_state_mib", "QLoRA int8")].median_ms == (
        state.median_ms
    )
    assert goal.measured == pytest.approx(state.ratio) and goal.limit == 0.02
    full = rows[("finetune_step_mib", "full fine-tune")]
    assert full.ratio == 1.0 and full.median_ms > 0
