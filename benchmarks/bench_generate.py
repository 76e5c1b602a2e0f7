"""Decoding with the KV cache against re-running the window for every new token, the
cache's bytes against its formula, compile counts, and attention through
`jax.nn.dot_product_attention` against the einsum it replaced.

The model: Llama family, tied embeddings, 2 layers, width 128, 4 query heads sharing 2
key/value heads, MLP width 384, vocabulary 2048, float32, one sequence.

- `cached step`: `model.decode_step` on a cache holding `context - 1` tokens: the
  next token's logits.
- `re-run window`: `model(window)[-1]` over the `context` tokens, what the training
  example's sampler did before `generate`.
- `forward, dot_product_attention` / `forward, einsum`: the full forward at 512 tokens
  with this library's attention, and with the previous hand-written einsum attention
  patched in (same mask, same numbers).
- cache bytes: the same model as Llama, Mistral (every layer slides) and Gemma 2
  (sliding and full layers alternate), window 64, batch 2, from shapes alone.

Goal (issue 10): the cached step at least 10x the re-run's tokens per second at
context 512 on CPU.
"""

import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    machine_description,
    report,
    time_interleaved,
)

from eqx_embed import TransformerConfig, TransformerLM  # noqa: E402
from eqx_embed.models import _generate  # noqa: E402

CONTEXTS = (128, 512, 2048)
GOAL_CONTEXT, GOAL_RATIO = 512, 10.0
CONFIG = TransformerConfig(
    family="llama",
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=384,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=max(CONTEXTS),
)


def einsum_attention(query, key, value, mask=None, *, scale, is_causal=False, **_):
    """The attention this library computed before `jax.nn.dot_product_attention`."""
    seq, heads, dim = query.shape
    kv_heads = key.shape[1]
    grouped = query.reshape(seq, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum(
        "qkgd,skd->kgqs", grouped, key, preferred_element_type=jnp.float32
    )
    causal = jnp.tril(jnp.ones((seq, key.shape[0]), bool))
    mask = causal if mask is None else mask & causal
    scores = jnp.where(mask, scores * scale, -jnp.inf)
    weights = jax.nn.softmax(scores, axis=-1).astype(value.dtype)
    return jnp.einsum("kgqs,skd->qkgd", weights, value).reshape(seq, heads, dim)


def decoding_rows(model: TransformerLM) -> list[Row | Goal]:
    rows = []
    step = eqx.filter_jit(lambda model, cache, token: model.decode_step(cache, token))
    rerun = eqx.filter_jit(lambda model, window: model(window)[-1])
    for context in CONTEXTS:
        tokens = jax.random.randint(jax.random.key(context), (1, context), 0, 2048)
        _, cache = model.prefill(tokens[:, :-1], capacity=context)
        token = tokens[:, -1]
        medians = time_interleaved(
            {
                "re-run window": lambda tokens=tokens: rerun(model, tokens[0]),
                "cached step": lambda cache=cache, token=token: step(
                    model, cache, token
                ),
            },
            rounds=5,
        )
        name = f"next token at context {context}"
        rows += report(name, medians, baseline="re-run window")
        speedup = medians["re-run window"] / medians["cached step"]
        print(
            f"  tokens/s: cached {1 / medians['cached step']:,.0f}, re-run "
            f"{1 / medians['re-run window']:,.0f}: {speedup:.1f}x"
        )
        if context == GOAL_CONTEXT:
            rows.append(
                check_goal(
                    f"cached decoding / re-running the window, tokens/s at {context}",
                    speedup,
                    GOAL_RATIO,
                    source="issue 10",
                    at_least=True,
                )
            )
    return rows


def attention_rows(model: TransformerLM) -> list[Row]:
    tokens = jax.random.randint(jax.random.key(0), (512,), 0, 2048)

    def compiled():
        return (
            eqx.filter_jit(lambda model, tokens: model(tokens))
            .lower(model, tokens)
            .compile()
        )

    library = compiled()
    with mock.patch.object(jax.nn, "dot_product_attention", einsum_attention):
        einsum = compiled()
    np.testing.assert_allclose(
        library(model, tokens), einsum(model, tokens), rtol=0, atol=1e-4
    )
    medians = time_interleaved(
        {
            "forward, einsum": lambda: einsum(model, tokens),
            "forward, dot_product_attention": lambda: library(model, tokens),
        },
        rounds=5,
    )
    return report("forward at 512 tokens", medians, baseline="forward, einsum")


def cache_bytes(model: TransformerLM) -> None:
    """The cache's bytes against its formula, for every layer sliding (Mistral), none
    (Llama) and both (Gemma 2 alternates them), and against the layout before sliding
    layers kept only their window (one buffer of `capacity` slots in every layer as
    soon as one layer attends fully). Also XLA's temporary bytes for one compiled
    `decode_step` on a donated cache: Gemma 2's about Llama's at the same capacity,
    so its two stacks are written in place, not copied."""
    config = model.config
    print(
        "\ncache bytes (keys + values) against 2*B*K*D*itemsize*(full layers * "
        "capacity + sliding layers * min(capacity, window))"
    )
    common = {**config.to_dict(), "sliding_window": 64}
    models = {
        "llama": model,
        "mistral, window 64": TransformerLM(
            TransformerConfig(**{**common, "family": "mistral"}), key=jax.random.key(0)
        ),
        "gemma2, window 64": TransformerLM(
            TransformerConfig(**{**common, "family": "gemma2"}), key=jax.random.key(0)
        ),
    }
    batch = 2
    prompts = jnp.zeros((batch, 16), jnp.int32)
    row_bytes = 2 * batch * config.num_kv_heads * config.head_dim * 4
    for name, lm in models.items():
        windows = lm.config.layer_windows
        sliding = sum(window is not None for window in windows)
        for capacity in (512, 2048):
            cache = jax.eval_shape(
                lambda lm=lm, capacity=capacity: lm.prefill(prompts, capacity=capacity)
            )[1]
            window_slots = min(capacity, 64) if sliding else 0
            formula = row_bytes * (
                (len(windows) - sliding) * capacity + sliding * window_slots
            )
            actual = sum(
                array.size * 4
                for array in (cache.keys, cache.values)
                + (cache.sliding_keys, cache.sliding_values)
            )
            before = row_bytes * len(windows)
            before *= capacity if None in windows else window_slots
            parameters, static = eqx.partition(lm, eqx.is_array)
            step = jax.jit(
                lambda p, c, t, static=static: eqx.combine(p, static).decode_step(c, t),
                donate_argnums=1,
            )
            token = jax.ShapeDtypeStruct((batch,), jnp.int32)
            temp = step.lower(parameters, cache, token).compile().memory_analysis()
            print(
                f"  {name:<20} capacity {capacity:5}: slots {cache.slots:5} + "
                f"{cache.sliding_slots:3}, {actual:>10,} B, formula {formula:>10,} B, "
                f"before {before:>10,} B ({actual / before:.2f}x); "
                f"decode_step temporaries {temp.temp_size_in_bytes:>10,} B"
            )


def compiles(model: TransformerLM) -> None:
    traces = {"count": 0}
    original = _generate.decode_step

    def counted(*args):
        traces["count"] += 1
        return original(*args)

    with mock.patch.object(_generate, "decode_step", counted):
        for prompts in (jnp.zeros((2, 16), jnp.int32), jnp.ones((2, 16), jnp.int32)):
            model.generate(prompts, max_new_tokens=32)
        first = traces["count"]
        model.generate(jnp.zeros((2, 24), jnp.int32), max_new_tokens=32)
    print(
        f"\ncompiles: 2 calls of generate (32 tokens each), one shape: {first}; "
        f"after a third call with a new prompt width: {traces['count']}"
    )


def main() -> list[Row | Goal]:
    print(machine_description())
    model = TransformerLM(CONFIG, key=jax.random.key(0))
    rows = decoding_rows(model)
    rows += attention_rows(model)
    cache_bytes(model)
    compiles(model)
    return rows


if __name__ == "__main__":
    main()
