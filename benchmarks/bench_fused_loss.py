"""The fused decode cross-entropy against the plain one: memory and time of loss plus
gradients with respect to the hidden states and the table.

- Memory: XLA's temporaries of `jax.jit(jax.value_and_grad(loss))`, in MiB (in the
  rows' `median_ms` field), from compilation alone (`ShapeDtypeStruct` inputs,
  nothing allocated or run).
- Time: all run side by side in this process, interleaved, min/median/max and the
  medians' ratios.
- Block sizes: the per-token loss over vocabulary block sizes and the reduced one over
  token chunk sizes, at 2048 x 512 x 32000 float32 (the sweep behind the defaults).

The plain loss is `logsumexp(logits) - logits[target]` on
`logits = jax.vmap(decoder)(hidden)`, reduced by a mean, as a user would write it; the
fused one is `decoder.cross_entropy(hidden, targets).mean()` (per-token losses, four
matmuls); the reduced one is `decoder.mean_cross_entropy(hidden, targets)` (gradients
in the forward pass, three matmuls; goal: within 1.05x of plain).

Run: `python benchmarks/bench_fused_loss.py` (several minutes on a small CPU);
`--sweep-block-size` runs the block sizes only.
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    compiled_temp_bytes,
    machine_description,
    report,
    time_interleaved,
)

import eqx_embed  # noqa: E402

MEMORY_SIZES = [
    # tokens, width, vocabulary, dtype
    (8192, 2048, 128256, jnp.bfloat16),  # issue 14's goal: <= 180 MiB fused
    (8192, 2048, 128256, jnp.float32),
    (2048, 512, 32000, jnp.float32),
    (4096, 2304, 256000, jnp.bfloat16),  # a Gemma-2-sized vocabulary
    (16384, 4096, 151936, jnp.float32),
]

TIME_SIZES = [
    (2048, 512, 32000, jnp.float32),  # issue 14's goal: reduced within 1.05x of plain
    (1024, 256, 50257, jnp.float32),  # a prime-ish vocabulary, not a block multiple
    (4096, 256, 8192, jnp.float32),
]


def _decoder(table):
    return eqx_embed.EmbeddingDecode(eqx_embed.Embedding(weight=table))


def plain_loss(table, hidden, targets):
    logits = jax.vmap(_decoder(table))(hidden).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jnp.mean(lse - picked)


def fused_loss(table, hidden, targets):
    return jnp.mean(_decoder(table).cross_entropy(hidden, targets))


def reduced_loss(table, hidden, targets):
    return _decoder(table).mean_cross_entropy(hidden, targets)


REDUCED_GOAL = 1.05
FUSED_MEMORY_GOAL_MIB = 180


def _loss_and_grads(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def _label(tokens, width, vocab, dtype):
    return f"{tokens} x {width} x {vocab} {jnp.dtype(dtype).name}"


def memory() -> list[Row | Goal]:
    rows = []
    print("\nXLA temporaries of loss + grads (compile only)")
    print(
        f"  {'tokens x width x vocab dtype':<34} {'plain':>10} {'fused':>10} ratio"
        f" {'reduced':>10}"
    )
    for tokens, width, vocab, dtype in MEMORY_SIZES:
        args = (
            jax.ShapeDtypeStruct((vocab, width), dtype),
            jax.ShapeDtypeStruct((tokens, width), dtype),
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
        )
        plain = compiled_temp_bytes(_loss_and_grads(plain_loss), *args) / 2**20
        fused = compiled_temp_bytes(_loss_and_grads(fused_loss), *args) / 2**20
        reduced = compiled_temp_bytes(_loss_and_grads(reduced_loss), *args) / 2**20
        label = _label(tokens, width, vocab, dtype)
        print(
            f"  {label:<34} {plain:7.0f} MiB {fused:6.0f} MiB {plain / fused:5.1f}x"
            f" {reduced:6.0f} MiB"
        )
        rows.append(Row("fused_loss_temp_mib", label + " plain", plain, 1.0, "plain"))
        for name, mib in [("fused", fused), ("reduced", reduced)]:
            rows.append(
                Row("fused_loss_temp_mib", f"{label} {name}", mib, mib / plain, "plain")
            )
        if (tokens, width, vocab, dtype) == MEMORY_SIZES[0]:
            rows.append(
                check_goal(
                    f"fused loss + grads temporaries, {label}",
                    fused,
                    FUSED_MEMORY_GOAL_MIB,
                    source="issue 14",
                    unit=" MiB",
                )
            )
    return rows


def _inputs(tokens, width, vocab, dtype):
    keys = jax.random.split(jax.random.key(0), 3)
    table = (0.05 * jax.random.normal(keys[0], (vocab, width))).astype(dtype)
    hidden = jax.random.normal(keys[1], (tokens, width), dtype)
    targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
    return table, hidden, targets


def timing(*, rounds: int = 9) -> list[Row | Goal]:
    rows = []
    for tokens, width, vocab, dtype in TIME_SIZES:
        args = _inputs(tokens, width, vocab, dtype)
        compiled = {
            name: jax.jit(_loss_and_grads(loss))
            for name, loss in [
                ("plain", plain_loss),
                ("fused", fused_loss),
                ("reduced", reduced_loss),
            ]
        }
        medians = time_interleaved(
            {name: lambda fn=fn, args=args: fn(*args) for name, fn in compiled.items()},
            rounds=rounds,
        )
        label = _label(tokens, width, vocab, dtype)
        rows += report(f"loss + grads, {label}", medians, baseline="plain")
        if (tokens, width, vocab, dtype) == TIME_SIZES[0]:
            rows.append(
                check_goal(
                    f"reduced loss + grads / plain, {label}",
                    medians["reduced"] / medians["plain"],
                    REDUCED_GOAL,
                    source="issue 14",
                )
            )
    return rows


def sweep_block_size(*, rounds: int = 5) -> list[Row]:
    """Times loss + gradients over block sizes, interleaved, at one modest size."""
    tokens, width, vocab, dtype = TIME_SIZES[0]
    args = _inputs(tokens, width, vocab, dtype)
    cases = {"plain": jax.jit(_loss_and_grads(plain_loss))}
    for block_size in [512, 1024, 2048, 4096, 8192]:

        def per_token(table, hidden, targets, block_size=block_size):
            losses = _decoder(table).cross_entropy(
                hidden, targets, block_size=block_size
            )
            return jnp.mean(losses)

        cases[f"cross_entropy block_size={block_size}"] = jax.jit(
            _loss_and_grads(per_token)
        )
    for chunk_size in [64, 128, 256, 512]:

        def reduced(table, hidden, targets, chunk_size=chunk_size):
            decoder = _decoder(table)
            return decoder.mean_cross_entropy(hidden, targets, chunk_size=chunk_size)

        cases[f"mean_cross_entropy chunk_size={chunk_size}"] = jax.jit(
            _loss_and_grads(reduced)
        )
    medians = time_interleaved(
        {name: lambda fn=fn: fn(*args) for name, fn in cases.items()},
        rounds=rounds,
    )
    label = _label(tokens, width, vocab, dtype)
    return report(f"block sizes, loss + grads, {label}", medians, baseline="plain")


def main() -> list[Row | Goal]:
    print(machine_description())
    return memory() + timing() + sweep_block_size()


if __name__ == "__main__":
    if "--sweep-block-size" in sys.argv[1:]:
        print(machine_description())
        sweep_block_size()
    else:
        main()
