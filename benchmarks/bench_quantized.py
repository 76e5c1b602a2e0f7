"""Weight-only int8 and int4 tables against float ones: table bytes, lookup, decode
and fused-loss time, and the held-out bits per byte of a small trained model.

- Bytes: a 32000 x 512 bfloat16 table and its int8 and int4 (groups of 128) forms,
  integers and scales together (goals, issue 23: int8 <= 0.51x, int4 <= 0.27x).
- Time, interleaved in this process: the lookup of 4096 ids, the decode of 256
  hidden states, and the fused losses with their gradient with respect to the hidden
  states (what QLoRA needs) on an 8192 x 256 float32 table, float against int8 and
  int4 (goal: the quantized mean loss, the training loss, at most 1.3x the float
  one's time on CPU).
- Bits per byte: a byte-level `TransformerLM` (2 layers, width 128) trained here for
  a few hundred steps on the Python standard library's source, scored on held-out
  modules float, int8 and int4 (goals: int8 at most +0.5%, int4 at most +3%). It is
  trained here because the main example's checkpoint (`examples/train_tiny_lm.py`)
  needs its BPE tokenizer to be scored.

Run: `python benchmarks/bench_quantized.py` (a few minutes on a small CPU).
"""

import math
import os
import pathlib
import sys
import sysconfig

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    machine_description,
    report,
    rounds_to_run,
    time_interleaved,
)

import eqx_embed  # noqa: E402

SOURCE = "issue 23"
MODES = [("int8", None), ("int4", 128)]


def nbytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


def bytes_benchmark() -> tuple[list[Row], list[Goal]]:
    table = jax.random.normal(jax.random.key(0), (32000, 512), jnp.bfloat16)
    plain = nbytes(table)
    rows = [Row("table_bytes_vs_bf16", "bfloat16", plain / 2**20, 1.0, "bfloat16")]
    goals = []
    for (mode, group_size), limit in zip(MODES, (0.51, 0.27), strict=True):
        quantized = eqx_embed.Embedding(weight=table).quantize(
            mode, group_size=group_size
        )
        ratio = nbytes(quantized) / plain
        rows.append(
            Row(
                "table_bytes_vs_bf16",
                mode,
                nbytes(quantized) / 2**20,
                ratio,
                "bfloat16",
            )
        )
        goals.append(
            check_goal(f"{mode} table bytes / bfloat16", ratio, limit, source=SOURCE)
        )
    return rows, goals


def time_benchmark() -> tuple[list[Row], list[Goal]]:
    vocab, width, tokens = 8192, 256, 512
    table = jax.random.normal(jax.random.key(0), (vocab, width)) / math.sqrt(width)
    ids = jax.random.randint(jax.random.key(1), (4096,), 0, vocab)
    hidden = jax.random.normal(jax.random.key(2), (tokens, width))
    targets = jax.random.randint(jax.random.key(3), (tokens,), 0, vocab)
    layers = {"float32": eqx_embed.ReversibleEmbedding(weight=table)}
    for mode, group_size in MODES:
        layers[mode] = layers["float32"].quantize(mode, group_size=group_size)

    @eqx.filter_jit
    def lookup(layer, ids):
        return jax.vmap(layer)(ids)

    @eqx.filter_jit
    def decode(layer, hidden):
        return jax.vmap(layer.decode)(hidden[:256])

    @eqx.filter_jit
    def per_token(layer, hidden):
        return jax.value_and_grad(lambda h: layer.cross_entropy(h, targets).mean())(
            hidden
        )

    @eqx.filter_jit
    def mean(layer, hidden):
        return jax.value_and_grad(lambda h: layer.mean_cross_entropy(h, targets))(
            hidden
        )

    rows, goals = [], []
    for name, function, argument in [
        ("lookup", lookup, ids),
        ("decode", decode, hidden),
        ("per_token_loss", per_token, hidden),
        ("mean_loss", mean, hidden),
    ]:
        cases = {
            kind: (lambda f=function, m=layer, a=argument: f(m, a))
            for kind, layer in layers.items()
        }
        medians = time_interleaved(cases, rounds=rounds_to_run(9))
        rows += report(f"quantized_{name}", medians, baseline="float32")
        if name == "mean_loss":
            for mode, _ in MODES:
                goals.append(
                    check_goal(
                        f"{mode} mean fused loss + gradient time / float32",
                        medians[mode] / medians["float32"],
                        1.3,
                        source=SOURCE,
                    )
                )
    return rows, goals


def stdlib_bytes() -> tuple[bytes, bytes]:
    """Training and held-out bytes: the standard library's top-level modules, every
    sixteenth held out."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"".join(path.read_bytes() for i, path in enumerate(files) if i % 16 != 8)
    held_out = b"".join(path.read_bytes() for path in files[8::16])
    return train[:2_000_000], held_out[:65_536]


def bits_per_byte_benchmark() -> tuple[list[Row], list[Goal]]:
    train, held_out = stdlib_bytes()
    seq, batch, steps = 128, 16, rounds_to_run(400)
    config = eqx_embed.TransformerConfig(
        "llama",
        vocab_size=256,
        hidden_size=128,
        intermediate_size=384,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=seq,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    optimiser = optax.adamw(optax.cosine_decay_schedule(3e-3, steps), weight_decay=0.1)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    stream = np.frombuffer(train, np.uint8).astype(np.int32)

    @eqx.filter_jit
    def step(model, state, windows):
        loss, grads = eqx.filter_value_and_grad(
            lambda m: m.mean_loss(windows[:, :-1], windows[:, 1:])
        )(model)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state, loss

    rng = np.random.default_rng(0)
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - seq - 1, batch)
        windows = jnp.asarray(stream[starts[:, None] + np.arange(seq + 1)])
        model, state, _ = step(model, state, windows)

    held = np.frombuffer(held_out, np.uint8).astype(np.int32)
    count = (len(held) - 1) // seq
    tokens = jnp.asarray(held[: count * seq].reshape(count, seq))
    targets = jnp.asarray(held[1 : count * seq + 1].reshape(count, seq))

    @eqx.filter_jit
    def bits_per_byte(model):
        # Byte tokens: the mean loss per token is per byte.
        return model.mean_loss(tokens, targets) / math.log(2)

    scores = {"float32": float(bits_per_byte(model))}
    for mode, group_size in MODES:
        quantized = eqx_embed.quantize(model, mode, group_size=group_size)
        scores[mode] = float(bits_per_byte(quantized))
    print(f"\nheld-out bits per byte after {steps} steps: {scores}")
    rows = [
        Row("held_out_bits_per_byte", kind, score, score / scores["float32"], "float32")
        for kind, score in scores.items()
    ]
    goals = [
        check_goal(
            f"{mode} held-out bits per byte / float32",
            scores[mode] / scores["float32"],
            limit,
            source=SOURCE,
        )
        for mode, limit in (("int8", 1.005), ("int4", 1.03))
    ]
    return rows, goals


def main() -> list[Row | Goal]:
    print(machine_description())
    results: list[Row | Goal] = []
    for benchmark in (bytes_benchmark, time_benchmark, bits_per_byte_benchmark):
        rows, goals = benchmark()
        results += rows + goals
    return results


if __name__ == "__main__":
    main()
