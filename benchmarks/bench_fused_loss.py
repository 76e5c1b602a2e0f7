"""The fused decode cross-entropy against the plain one: memory and time of loss plus
gradients with respect to the hidden states and the table.

- Memory: XLA's temporaries of `jax.jit(jax.value_and_grad(loss))`, in MiB (in the
  rows' `median_ms` field), from compilation alone (`ShapeDtypeStruct` inputs,
  nothing allocated or run).
- Time: both run side by side in this process, interleaved, medians and ratios.

The plain loss is `logsumexp(logits) - logits[target]` on
`logits = jax.vmap(decoder)(hidden)`, reduced by a mean, as a user would write it; the
fused one is `decoder.cross_entropy(hidden, targets).mean()`.

Run: `python benchmarks/bench_fused_loss.py` (several minutes on a small CPU).
"""

import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    Row,
    compiled_temp_bytes,
    machine_description,
    report,
    time_interleaved,
)

import eqx_embed  # noqa: E402

MEMORY_SIZES = [
    # tokens, width, vocabulary, dtype
    (8192, 2048, 128256, jnp.bfloat16),  # the goal: <= 180 MiB, >= 50x less
    (8192, 2048, 128256, jnp.float32),
    (2048, 512, 32000, jnp.float32),
    (4096, 2304, 256000, jnp.bfloat16),  # a Gemma-2-sized vocabulary
    (16384, 4096, 151936, jnp.float32),
]

TIME_SIZES = [
    (2048, 512, 32000, jnp.float32),  # the goal: within 1.10x of plain
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


def _loss_and_grads(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def _label(tokens, width, vocab, dtype):
    return f"{tokens} x {width} x {vocab} {jnp.dtype(dtype).name}"


def memory() -> list[Row]:
    rows = []
    print("\nXLA temporaries of loss + grads (compile only)")
    print(f"  {'tokens x width x vocab dtype':<34} {'plain':>10} {'fused':>10} ratio")
    for tokens, width, vocab, dtype in MEMORY_SIZES:
        args = (
            jax.ShapeDtypeStruct((vocab, width), dtype),
            jax.ShapeDtypeStruct((tokens, width), dtype),
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
        )
        plain = compiled_temp_bytes(_loss_and_grads(plain_loss), *args) / 2**20
        fused = compiled_temp_bytes(_loss_and_grads(fused_loss), *args) / 2**20
        label = _label(tokens, width, vocab, dtype)
        print(f"  {label:<34} {plain:7.0f} MiB {fused:6.0f} MiB {plain / fused:5.1f}x")
        rows.append(Row("fused_loss_temp_mib", label + " plain", plain, 1.0, "plain"))
        rows.append(
            Row("fused_loss_temp_mib", label + " fused", fused, fused / plain, "plain")
        )
    return rows


def timing(*, rounds: int = 9) -> list[Row]:
    rows = []
    for tokens, width, vocab, dtype in TIME_SIZES:
        keys = jax.random.split(jax.random.key(0), 3)
        table = (0.05 * jax.random.normal(keys[0], (vocab, width))).astype(dtype)
        hidden = jax.random.normal(keys[1], (tokens, width), dtype)
        targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
        args = (table, hidden, targets)
        plain = jax.jit(_loss_and_grads(plain_loss))
        fused = jax.jit(_loss_and_grads(fused_loss))
        medians = time_interleaved(
            {
                "plain": lambda plain=plain, args=args: plain(*args),
                "fused": lambda fused=fused, args=args: fused(*args),
            },
            rounds=rounds,
        )
        label = _label(tokens, width, vocab, dtype)
        rows += report(f"loss + grads, {label}", medians, baseline="plain")
    return rows


def main() -> list[Row]:
    print(machine_description())
    return memory() + timing()


if __name__ == "__main__":
    main()
