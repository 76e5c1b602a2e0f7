"""Writes docs/generated/fused_loss_memory.md: the temporary memory XLA allocates for
the loss and its gradient, plain versus fused, from compilation alone (nothing runs).

    python docs/scripts/fused_loss_memory.py
"""

import pathlib
import sys

import jax
import jax.numpy as jnp

import eqx_embed

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _harness import compiled_temp_bytes, machine_description  # noqa: E402

HIDDEN = 1024
SIZES = [(4096, 32_000), (8192, 32_000), (8192, 128_256), (8192, 256_000)]


def plain_loss(table, hidden, targets):
    logits = hidden @ table.T
    picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
    return jnp.sum(jax.nn.logsumexp(logits, axis=1) - picked)


def fused_loss(table, hidden, targets):
    decode = eqx_embed.EmbeddingDecode(eqx_embed.Embedding(weight=table))
    return jnp.sum(decode.cross_entropy(hidden, targets))


def gradient_of(loss):
    return jax.value_and_grad(loss, argnums=(0, 1))


def mebibytes(size: int) -> str:
    return f"{size / 2**20:,.0f} MiB"


def main() -> None:
    lines = [
        "| tokens | vocabulary | logits (float32) | plain: temporaries | "
        "fused: temporaries | fused / plain |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for tokens, vocabulary in SIZES:
        args = (
            jax.ShapeDtypeStruct((vocabulary, HIDDEN), jnp.float32),
            jax.ShapeDtypeStruct((tokens, HIDDEN), jnp.float32),
            jax.ShapeDtypeStruct((tokens,), jnp.int32),
        )
        plain = compiled_temp_bytes(gradient_of(plain_loss), *args)
        fused = compiled_temp_bytes(gradient_of(fused_loss), *args)
        lines.append(
            f"| {tokens:,} | {vocabulary:,} | {mebibytes(4 * tokens * vocabulary)} | "
            f"{mebibytes(plain)} | {mebibytes(fused)} | {fused / plain:.3f} |"
        )
        print(lines[-1], flush=True)
    lines.append("")
    lines.append(
        f"Loss and gradient with respect to the table and the hidden states, hidden "
        f"size {HIDDEN:,}, float32; XLA's `memory_analysis().temp_size_in_bytes` "
        f"after compilation on {machine_description()}."
    )
    path = ROOT / "docs" / "generated" / "fused_loss_memory.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
