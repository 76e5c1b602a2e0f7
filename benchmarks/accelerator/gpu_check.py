"""The GPU check: correctness on the device against float64 NumPy references, then
side-by-side timings and XLA temporaries at the sizes of real models' heads, written
to one page.

- Correctness (`gpu_correctness.py`), each item PASS or FAIL; any FAIL makes the
    exit status non-zero, after the page is written.
- Fused loss + gradients against the materialised loss (`logits = h @ W.T`, then
    `optax.softmax_cross_entropy_with_integer_labels`, in the inputs' dtype as a user
    writes it) at 8192 x 2304 x 256000 bfloat16 (Gemma 2 2B's head, the shape of Cut
    Cross-Entropy's published table) and 8192 x 4096 x 128256 bfloat16 (Llama 3),
    with XLA's temporary bytes of each. Goals: at most 1.0x the materialised loss's
    time with at most 2% of its temporaries (Cut Cross-Entropy reports 1.16 GB
    against 28 GB, 135 ms against 209 ms, on an A100 at the first shape).
- Lookup, decode and RoPE at those widths against the raw `jnp` forms.
- A `TransformerLM` training step against its `equinox.nn` twin
    (`benchmarks/bench_transformer.py`'s), and `generate`'s tokens per second after
    512 tokens of context.

Each case is compiled once (its temporaries read from that compilation) and timed
with `_harness.time_interleaved`.

Run: `benchmarks/accelerator/run.sh` (on a GPU: about 8 minutes at most), or
`python benchmarks/accelerator/gpu_check.py --smoke --page /tmp/p.md` (tiny shapes on
the CPU, to check that it runs).
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import sys
import time
from functools import partial

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    check_ratio_goal,
    machine_description,
    report,
    time_interleaved,
)
from bench_rope import hand_fused_reference  # noqa: E402
from bench_transformer import (  # noqa: E402
    OPTIMISER,
    equinox_copy,
    logits_loss,
    make_train_step,
)
from gpu_correctness import Check, llama_config, run_checks  # noqa: E402
from run_all import Results, git_commit, goals_section, markdown_table  # noqa: E402

import eqx_embed  # noqa: E402

SOURCE = "GPU check"
TIME_GOAL, MEMORY_GOAL = 1.0, 0.02
MATERIALISED = "materialised: h @ W.T, optax"


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What one run measures: the loss shapes (tokens, width, vocabulary, model),
    RoPE's (batch, seq, heads, head_dim) at each, the model, and the rounds."""

    losses: tuple[tuple[int, int, int, str], ...]
    rope: tuple[tuple[int, int, int, int], ...]
    model: eqx_embed.TransformerConfig
    batch: int
    seq: int
    context: int
    new_tokens: int
    rounds: int


FULL = Sizes(
    losses=((8192, 2304, 256000, "Gemma 2 2B"), (8192, 4096, 128256, "Llama 3 8B")),
    rope=((4, 2048, 8, 256), (4, 2048, 32, 128)),
    model=llama_config(32000, 1024, 2816, 4, 16, 8, 1024),
    batch=8,
    seq=1024,
    context=512,
    new_tokens=64,
    rounds=5,
)
SMOKE = Sizes(
    losses=((64, 32, 515, "tiny"),),
    rope=((2, 16, 2, 32),),
    model=llama_config(256, 32, 64, 1, 4, 2, 64),
    batch=2,
    seq=16,
    context=16,
    new_tokens=4,
    rounds=2,
)


@dataclasses.dataclass
class Section:
    """One part of the page: its rows, its goals, and notes listed after it."""

    title: str
    summary: str
    rows: list[Row] = dataclasses.field(default_factory=list)
    goals: list[Goal] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)


SAMPLES: dict[str, dict[str, list[float]]] = {}


def timed(benchmark: str, cases: dict, baseline: str, rounds: int) -> list[Row]:
    """`time_interleaved` and `report`, keeping every round's seconds for the JSON."""
    SAMPLES[benchmark] = {}
    timings = time_interleaved(cases, rounds=rounds, samples=SAMPLES[benchmark])
    return report(benchmark, timings, baseline=baseline)


def compiled(jitted, *args):
    """`jitted` (a `jax.jit` or `eqx.filter_jit` function) compiled once for `args`,
    and XLA's temporary bytes of that compilation."""
    executable = jitted.lower(*args).compile()
    analysis = getattr(executable, "compiled", executable).memory_analysis()
    return executable, analysis.temp_size_in_bytes


def memory_rows(benchmark: str, temps: dict[str, int], baseline: str) -> list[Row]:
    """Rows of MiB (a benchmark named `*_mib`, as `run_all.markdown_table` reads)."""
    rows = [
        Row(benchmark, case, bytes_ / 2**20, bytes_ / temps[baseline], baseline)
        for case, bytes_ in temps.items()
    ]
    for row in rows:
        print(f"  {row.case:<40} {row.median_ms:10,.1f} MiB  {row.ratio:6.3f}x")
    return rows


def materialised_loss(table, hidden, targets):
    logits = hidden @ table.T
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def per_token_loss(table, hidden, targets):
    layer = eqx_embed.ReversibleEmbedding(weight=table)
    return layer.cross_entropy(hidden, targets).mean()


def reduced_loss(table, hidden, targets):
    layer = eqx_embed.ReversibleEmbedding(weight=table)
    return layer.mean_cross_entropy(hidden, targets)


def _arrays(tokens: int, width: int, vocab: int):
    """A bfloat16 table (scaled as a trained one's logits are, of order one), hidden
    states and targets, drawn on the device."""
    table_key, hidden_key, target_key = jax.random.split(jax.random.key(0), 3)
    table = jax.random.normal(table_key, (vocab, width), jnp.bfloat16) / width**0.5
    hidden = jax.random.normal(hidden_key, (tokens, width), jnp.bfloat16)
    targets = jax.random.randint(target_key, (tokens,), 0, vocab)
    return table, hidden, targets


def fused_loss_section(sizes: Sizes) -> Section:
    section = Section(
        "Fused loss + gradients",
        "Loss and gradients with respect to the table and the hidden states, "
        "bfloat16: the fused `cross_entropy(...).mean()` (per-token losses, "
        "vocabulary blocks) and `mean_cross_entropy` (token chunks, gradients in "
        "the forward pass) against the materialised loss. Goals: at most "
        f"{TIME_GOAL:g}x its time and {MEMORY_GOAL:.0%} of its temporaries.",
    )
    losses = {
        MATERIALISED: materialised_loss,
        "cross_entropy(...).mean()": per_token_loss,
        "mean_cross_entropy": reduced_loss,
    }
    for tokens, width, vocab, model in sizes.losses:
        label = f"{tokens} x {width} x {vocab} bfloat16 ({model})"
        args = _arrays(tokens, width, vocab)
        executables, temps = {}, {}
        for name, loss in losses.items():
            grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
            executables[name], temps[name] = compiled(grad, *args)
        cases = {name: partial(f, *args) for name, f in executables.items()}
        rows = timed(f"loss + grads, {label}", cases, MATERIALISED, sizes.rounds)
        print(f"\nXLA temporaries, {label}")
        rows += memory_rows(f"{label} temp_mib", temps, MATERIALISED)
        section.rows += rows
        medians = {row.case: row for row in rows if not row.benchmark.endswith("mib")}
        flops = 6 * tokens * width * vocab  # three matmuls of 2 * T * D * V
        rate = flops / (medians[MATERIALISED].median_ms * 1e-3) / 1e12
        section.notes.append(
            f"{label}: the materialised loss runs its three matmuls at "
            f"{rate:.3g} TFLOP/s."
        )
        for name in list(losses)[1:]:
            section.goals += [
                check_goal(
                    f"{name} loss + grads time / materialised, {label}",
                    medians[name].ratio,
                    TIME_GOAL,
                    source=SOURCE,
                ),
                check_goal(
                    f"{name} loss + grads temporaries / materialised, {label}",
                    temps[name] / temps[MATERIALISED],
                    MEMORY_GOAL,
                    source=SOURCE,
                ),
            ]
    return section


def layers_section(sizes: Sizes) -> Section:
    section = Section(
        "Lookup, decode and RoPE",
        "At the loss shapes' widths, bfloat16, under `jax.jit`: "
        "`jax.vmap(layer)(ids)` against `jnp.take(W, ids, axis=0)`, "
        "`jax.vmap(layer.decode)(h)` against `h @ W.T`, and "
        "`jax.vmap(rope)(queries)` against the hand-fused rotation of "
        "`benchmarks/bench_rope.py` (float32 arithmetic, cast back once, as ours).",
    )
    ours_lookup = jax.jit(lambda layer, ids: jax.vmap(layer)(ids))
    ours_decode = jax.jit(lambda layer, hidden: jax.vmap(layer.decode)(hidden))
    take = jax.jit(lambda table, ids: jnp.take(table, ids, axis=0))
    matmul = jax.jit(lambda table, hidden: hidden @ table.T)
    ours_rope = jax.jit(lambda rope, x: jax.vmap(rope)(x))
    reference_rope = jax.jit(
        lambda x, cos, sin: hand_fused_reference(x.astype(cos.dtype), cos, sin).astype(
            x.dtype
        )
    )
    for (tokens, width, vocab, model), (batch, seq, heads, head_dim) in zip(
        sizes.losses, sizes.rope, strict=True
    ):
        table, hidden, ids = _arrays(tokens, width, vocab)
        layer = eqx_embed.ReversibleEmbedding(weight=table)
        label = f"({vocab}, {width}) bfloat16 table, {tokens} tokens ({model})"
        section.rows += timed(
            f"lookup, {label}",
            {
                "eqx_embed.ReversibleEmbedding (vmap)": partial(
                    ours_lookup, layer, ids
                ),
                "jnp.take(W, ids, axis=0)": partial(take, table, ids),
            },
            "jnp.take(W, ids, axis=0)",
            sizes.rounds,
        )
        section.rows += timed(
            f"decode, {label}",
            {
                "eqx_embed decode (vmap)": partial(ours_decode, layer, hidden),
                "h @ W.T": partial(matmul, table, hidden),
            },
            "h @ W.T",
            sizes.rounds,
        )
        rope = eqx_embed.RotaryPositionalEmbedding(head_dim, max_seq_len=seq)
        queries = jax.random.normal(
            jax.random.key(1), (batch, seq, heads, head_dim), jnp.bfloat16
        )
        section.rows += timed(
            f"RoPE, bfloat16 queries {(batch, seq, heads, head_dim)} ({model})",
            {
                "eqx_embed (vmap)": partial(ours_rope, rope, queries),
                "hand-fused reference": partial(
                    reference_rope, queries, rope.cos, rope.sin
                ),
            },
            "hand-fused reference",
            sizes.rounds,
        )
    return section


def transformer_section(sizes: Sizes, model: eqx_embed.TransformerLM) -> Section:
    config = sizes.model
    section = Section(
        "TransformerLM training step",
        f"Llama, tied: {config.num_layers} layers, width {config.hidden_size}, "
        f"{config.num_heads} heads / {config.num_kv_heads} kv heads, MLP "
        f"{config.intermediate_size}, vocabulary {config.vocab_size}; batch "
        f"{sizes.batch} x seq {sizes.seq}, float32 (the GPU's default matmul "
        "precision). One `optax.adamw` step against the `equinox.nn` twin of "
        "`benchmarks/bench_transformer.py` (its layers unrolled, logits, optax's "
        "loss), and XLA's temporaries of each step.",
    )
    peer = equinox_copy(model)
    data = jax.random.randint(
        jax.random.key(2), (sizes.batch, sizes.seq + 1), 0, config.vocab_size
    )
    tokens, targets = data[:, :-1], data[:, 1:]

    def mean_loss(model, tokens, targets):
        return model.mean_loss(tokens, targets)

    baseline = "equinox.nn, logits + optax"
    steps = {
        "eqx_embed, model.mean_loss": (mean_loss, model),
        baseline: (logits_loss, peer),
    }
    cases, temps = {}, {}
    for name, (loss, network) in steps.items():
        state = OPTIMISER.init(eqx.filter(network, eqx.is_inexact_array))
        arguments = (network, state, tokens, targets)
        step, temps[name] = compiled(make_train_step(loss), *arguments)
        cases[name] = partial(step, *arguments)
        print(f"  {name}: loss {float(cases[name]()[2]):.4f}")
    benchmark = f"training step, {sizes.batch * sizes.seq} tokens"
    section.rows += timed(benchmark, cases, baseline, sizes.rounds)
    section.goals.append(
        check_ratio_goal(
            section.rows, "eqx_embed, model.mean_loss", 1.0, source="issue 5"
        )
    )
    print("\nXLA temporaries of one training step")
    section.rows += memory_rows("training step temp_mib", temps, baseline)
    return section


def generate_section(sizes: Sizes, model: eqx_embed.TransformerLM) -> Section:
    context, new = sizes.context, sizes.new_tokens
    section = Section(
        "generate",
        f"Greedy `generate` of {new} tokens after a prompt of {context} (one row, "
        "the same model), against re-running the model over the "
        f"{context}-token window for one token (what a sampler without a cache "
        "does per token).",
    )
    prompts = jax.random.randint(
        jax.random.key(3), (1, context), 0, sizes.model.vocab_size
    )
    rerun = eqx.filter_jit(lambda model, window: model(window)[-1])
    generate_case = f"generate, {new} tokens"
    rerun_case = "re-run window, 1 token"
    rows = timed(
        f"generate after {context} tokens",
        {
            generate_case: lambda: model.generate(prompts, max_new_tokens=new),
            rerun_case: lambda: rerun(model, prompts[0]),
        },
        rerun_case,
        sizes.rounds,
    )
    section.rows += rows
    per_second = {
        row.case: (new if row.case == generate_case else 1) / (row.median_ms * 1e-3)
        for row in rows
    }
    speedup = per_second[generate_case] / per_second[rerun_case]
    section.notes.append(
        f"Tokens per second (medians): `generate` {per_second[generate_case]:,.0f}, "
        f"re-running the window {per_second[rerun_case]:,.0f}: {speedup:.1f}x."
    )
    print(f"  {section.notes[-1]}")
    return section


def page_markdown(
    checks: list[Check], sections: list[Section], commit: str, seconds: float, smoke
) -> str:
    passed = sum(check.passed for check in checks)
    failed = len(checks) - passed
    parts = [
        "# Performance on a GPU",
        "",
        "Written by `benchmarks/accelerator/run.sh`: correctness on the device "
        "against float64 NumPy references, then each measured case side by side "
        "with its baseline in one process, interleaved (each round times every "
        "case once), min/median/max over the rounds and the medians' ratios (below "
        "1: faster than the baseline). Memory is XLA's temporary buffers from "
        "`memory_analysis()` of the very compilation that is timed.",
        "",
        f"- Commit: `{commit}`",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC",
        f"- Machine: {machine_description()}",
        f"- Run time: {seconds / 60:.1f} min",
    ]
    if smoke:
        parts.append(
            "- **A smoke run** (`--smoke`): tiny shapes on the CPU, to check that "
            "the script runs; these are not figures to quote"
        )
    parts += [
        "",
        "## Correctness",
        "",
        f"{passed} of the {len(checks)} items PASS"
        + (f"; **{failed} FAIL**." if failed else "."),
        "",
        "| item | result | worst error |",
        "| --- | --- | --- |",
        *(
            f"| {c.item} | {'PASS' if c.passed else '**FAIL**'} | {c.detail} |"
            for c in checks
        ),
        "",
        *goals_section(
            Results(goals={"gpu_check": [g for s in sections for g in s.goals]})
        ),
    ]
    for section in sections:
        parts += [f"## {section.title}", "", section.summary, ""]
        for benchmark in dict.fromkeys(row.benchmark for row in section.rows):
            rows = [row for row in section.rows if row.benchmark == benchmark]
            title = benchmark.removesuffix(" temp_mib")
            if benchmark.endswith("temp_mib"):
                title = f"XLA temporaries, {title}"
            parts += [f"### {title}", "", markdown_table(rows), ""]
        parts += [*(f"- {note}" for note in section.notes), ""]
    parts += [
        "## How to read and rerun",
        "",
        "A FAIL above is a wrong result on this device: the script exits non-zero. "
        "A goal MISSED is a measured figure short of its goal; the profile explains "
        "it, the page only reports it. Times are per call, after compilation; the "
        "spread between min and max is the noise. Rerun with "
        "`benchmarks/accelerator/run.sh` on the GPU machine (its header gives the "
        "exact call), or `python benchmarks/accelerator/gpu_check.py --smoke "
        "--page /tmp/p.md` anywhere, to check that it runs.",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument(
        "--page", type=pathlib.Path, default=ROOT / "docs" / "performance-gpu.md"
    )
    parser.add_argument("--json", type=pathlib.Path, help="raw figures, as JSON")
    args = parser.parse_args(argv)
    if args.smoke:
        jax.config.update("jax_platforms", "cpu")
    sizes = SMOKE if args.smoke else FULL
    start = time.perf_counter()
    # The GPU machine gets the files without `.git`: run.sh passes the commit on.
    commit = os.environ.get("EQX_EMBED_COMMIT") or git_commit(ROOT)
    print(f"{machine_description()}; commit {commit}\n\ncorrectness", flush=True)
    checks = run_checks()
    model = eqx_embed.TransformerLM(sizes.model, key=jax.random.key(0))
    sections = [
        fused_loss_section(sizes),
        layers_section(sizes),
        transformer_section(sizes, model),
        generate_section(sizes, model),
    ]
    seconds = time.perf_counter() - start
    page = page_markdown(checks, sections, commit, seconds, args.smoke)
    args.page.parent.mkdir(parents=True, exist_ok=True)
    args.page.write_text(page)
    print(f"\nwrote {args.page} ({seconds / 60:.1f} min)")
    if args.json is not None:
        goals = [g for section in sections for g in section.goals]
        figures = {
            "commit": commit,
            "machine": machine_description(),
            "seconds": seconds,
            "checks": [dataclasses.asdict(check) for check in checks],
            "goals": [{**dataclasses.asdict(g), "met": g.met} for g in goals],
            "rows": [dataclasses.asdict(r) for s in sections for r in s.rows],
            "samples_seconds": SAMPLES,
        }
        args.json.write_text(json.dumps(figures, indent=1))
        print(f"wrote {args.json}")
    failed = [check.item for check in checks if not check.passed]
    if failed:
        print(f"FAIL: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
