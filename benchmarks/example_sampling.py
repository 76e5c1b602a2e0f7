"""The training example's sampling, as its defaults run it (3 samples of 200 tokens
after a 40-token prompt, windows of 64 tokens, temperature 0.7, the default model's
shape), through `TransformerLM.generate` and its KV cache, against the sampler it
replaced, which re-ran the model over the whole window for every new token. Each is
compiled once, then timed in interleaved rounds (min, median, max).

    python benchmarks/example_sampling.py

Not part of `run_all.py`: its figure is the README's.
"""

import pathlib
import statistics
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "examples"))
import train_tiny_lm  # noqa: E402

import eqx_embed  # noqa: E402

WINDOW, LENGTH, SAMPLES, PROMPT, TEMPERATURE = 64, 200, 3, 40, 0.7
ROUNDS = 7


@eqx.filter_jit
def rerun_the_window(model, window, key):
    """The former sampler: every token runs the model over the (sliding) window."""
    windows = jnp.tile(window, (SAMPLES, 1))

    def step(carry, key):
        windows, filled = carry
        logits = jax.vmap(model)(windows)[:, jnp.minimum(filled, WINDOW) - 1]
        token = jax.random.categorical(key, logits / TEMPERATURE)
        windows = jnp.where(filled >= WINDOW, jnp.roll(windows, -1, axis=1), windows)
        windows = windows.at[:, jnp.minimum(filled, WINDOW - 1)].set(token)
        return (windows, filled + 1), token

    carry = (windows, jnp.asarray(PROMPT))
    _, tokens = jax.lax.scan(step, carry, jax.random.split(key, LENGTH))
    return tokens.T


def main() -> None:
    config = eqx_embed.TransformerConfig(
        family="llama",
        vocab_size=2048,
        hidden_size=96,
        intermediate_size=288,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=WINDOW,
        tie_word_embeddings=True,
        scan_unroll=2,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 2048, WINDOW).astype(np.int32)
    window = jnp.asarray(tokens)
    keys = jax.random.split(jax.random.key(1), SAMPLES)
    cases = {
        "generate (KV cache)": lambda: train_tiny_lm.sample_continuations(
            model,
            window,
            jnp.asarray(PROMPT),
            keys,
            length=LENGTH,
            temperature=TEMPERATURE,
        ),
        "re-running the window": lambda: rerun_the_window(model, window, keys[0]),
    }
    for case in cases.values():
        jax.block_until_ready(case())
    seconds = {name: [] for name in cases}
    for round_ in range(ROUNDS):
        names = list(cases) if round_ % 2 == 0 else list(cases)[::-1]
        for name in names:
            start = time.perf_counter()
            jax.block_until_ready(cases[name]())
            seconds[name].append(time.perf_counter() - start)
    for name, values in seconds.items():
        low, middle, high = min(values), statistics.median(values), max(values)
        print(f"{name:<22} min {low:.3f}  median {middle:.3f}  max {high:.3f} s")
    cached, rerun = (statistics.median(v) for v in seconds.values())
    print(f"speed-up of the medians: {rerun / cached:.1f}x")


if __name__ == "__main__":
    main()
