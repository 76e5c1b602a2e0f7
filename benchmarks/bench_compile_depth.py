"""Compile time against depth: `TransformerLM` scans one stacked layer, so compiling
its forward pass (and a training step) should cost about the same at 2, 8 and 32
layers, where the same model with its layers unrolled in a Python loop grows with
depth. Tracing, lowering and compiling are timed (`jit(...).lower(...).compile()` on
shapes, no weights allocated, caches cleared); each case is compiled a few times, for
the minimum, median and maximum.

    python benchmarks/bench_compile_depth.py
"""

import dataclasses
import time
from statistics import median

import equinox as eqx
import jax
import jax.numpy as jnp
from _harness import Row, machine_description, rounds_to_run

from eqx_embed import TransformerConfig, TransformerLM

DEPTHS = (2, 8, 32)
SEQ = 128
CONFIG = TransformerConfig(
    "gemma2",  # the alternating sliding window exercises the scanned per-layer data
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_layers=DEPTHS[0],
    num_heads=8,
    num_kv_heads=4,
    head_dim=32,
    max_position_embeddings=SEQ,
    sliding_window=32,
    attention_logit_soft_cap=50.0,
    final_logit_soft_cap=30.0,
)


def scanned_forward(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    return model(tokens)


def unrolled_forward(model: TransformerLM, tokens: jax.Array) -> jax.Array:
    """The same computation with one traced copy of the layer per layer."""
    x = jax.vmap(model.embedding)(tokens)
    x = x * jnp.asarray(model.config.hidden_size**0.5, x.dtype)
    rotation = model.rope.rotation(tokens.shape[0])
    for layer, window in enumerate(model.config.layer_windows):
        block = jax.tree.map(lambda array, i=layer: array[i], model.blocks)
        x = block(x, rotation=rotation, window=window)
    return jax.vmap(model.embedding.decode)(model.final_norm(x))


def training_step(model: TransformerLM, tokens: jax.Array) -> TransformerLM:
    def loss(model):
        return model.loss(tokens, jnp.roll(tokens, -1)).mean()

    return eqx.filter_grad(loss)(model)


def compile_seconds(fn, model, tokens, repeats: int) -> list[float]:
    """Seconds to lower and compile `fn(model, tokens)`, `repeats` times, where the
    arrays of `model` and `tokens` are `jax.ShapeDtypeStruct`s."""
    shapes, structure = eqx.partition(
        model, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct)
    )

    def call(shapes, tokens):
        return fn(eqx.combine(shapes, structure), tokens)

    times = []
    for _ in range(repeats):
        jax.clear_caches()  # or the repeats would find the first compilation cached
        start = time.perf_counter()
        jax.jit(call).lower(shapes, tokens).compile()
        times.append(time.perf_counter() - start)
    return times


def main(repeats: int = 3) -> list[Row]:
    print(f"\nCompile time against depth; {machine_description()}")
    tokens = jax.ShapeDtypeStruct((SEQ,), jnp.int32)
    cases = {
        "forward, scanned": scanned_forward,
        "forward, unrolled": unrolled_forward,
        "training step, scanned": training_step,
    }
    rows = []
    for case, fn in cases.items():
        seconds = {}
        for depth in DEPTHS:
            config = dataclasses.replace(CONFIG, num_layers=depth)
            model = eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))
            seconds[depth] = compile_seconds(fn, model, tokens, rounds_to_run(repeats))
        base = median(seconds[DEPTHS[0]])
        print(f"  {case}  (ratio: median compile time / that at {DEPTHS[0]} layers)")
        for depth, times in seconds.items():
            value = median(times)
            print(
                f"    {depth:3d} layers  min {min(times):8.2f}  median {value:8.2f}"
                f"  max {max(times):8.2f} s  {value / base:6.2f}x"
            )
            rows.append(
                Row(
                    "compile_depth",
                    f"{case}, {depth} layers",
                    value * 1e3,
                    value / base,
                    f"{case}, {DEPTHS[0]} layers",
                    min(times) * 1e3,
                    max(times) * 1e3,
                )
            )
    return rows


if __name__ == "__main__":
    main()
