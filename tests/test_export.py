"""Nothing CPU-only: every public entry point exports, with `jax.export`, for CUDA and
TPU (which needs no accelerator: the program is lowered for those platforms, not run).
A host callback or a custom call that only the CPU has would fail here.

Each export is checked for its platforms, for the absence of host callbacks, and for
its serialized program (MLIR bytecode; `Exported.serialize()` wraps it in a
flatbuffer, which needs the `flatbuffers` package). What cannot be exported is
tested as such:
`out_of_range="error"` with traced ids checks them in a host callback
(`equinox.branched_error_if`), which JAX cannot lower for several platforms at once
(nor export for another machine); the default `"nan"` policy exports.
"""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_embed import (
    Embedding,
    EmbeddingDecode,
    PositionEmbedding,
    ReversibleEmbedding,
    RotaryPositionalEmbedding,
    SinusoidalPositionalEncoding,
    TransformerConfig,
    TransformerLM,
)
from eqx_embed.models.families import FAMILY_SPECS

PLATFORMS = ("cuda", "tpu")
VOCAB, WIDTH, TOKENS = 40, 16, 12
rng = np.random.default_rng(0)
TOKEN_IDS = rng.integers(0, VOCAB, TOKENS).astype(np.int32)
HIDDEN = rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)
WHERE = rng.random(TOKENS) > 0.3
# Host callbacks: what a program that runs only where Python runs calls.
CALLBACK = re.compile(r"callback", re.IGNORECASE)
MLIR_BYTECODE_MAGIC = b"ML\xefR"


def export(function, *args) -> jax.export.Exported:
    """`function(*args)` exported for `PLATFORMS`, after the checks every export
    gets: the platforms, no host callback, and a serialized program."""
    exported = jax.export.export(jax.jit(function), platforms=PLATFORMS)(*args)
    assert exported.platforms == PLATFORMS
    assert not CALLBACK.search(exported.mlir_module())
    assert exported.mlir_module_serialized.startswith(MLIR_BYTECODE_MAGIC)
    return exported


def exported_with_model(module, method, *args):
    """`method(module, *args)` exported with the module's arrays as inputs (not baked
    into the program as constants), as a training or serving program takes them."""
    arrays, static = eqx.partition(module, eqx.is_array)

    def run(arrays, *args):
        return method(eqx.combine(arrays, static), *args)

    return export(run, arrays, *args)


def output_shapes(exported: jax.export.Exported) -> list[tuple[int, ...]]:
    return [aval.shape for aval in exported.out_avals]


def decoder() -> EmbeddingDecode:
    return EmbeddingDecode(
        Embedding(VOCAB, WIDTH, key=jax.random.key(0)), logit_soft_cap=5.0
    )


def test_lookup_and_decode():
    tied = ReversibleEmbedding(VOCAB, WIDTH, key=jax.random.key(0))
    lookup = exported_with_model(tied, lambda m, t: jax.vmap(m)(t), TOKEN_IDS)
    assert output_shapes(lookup) == [(TOKENS, WIDTH)]
    decode = exported_with_model(tied, lambda m, h: jax.vmap(m.decode)(h), HIDDEN)
    assert output_shapes(decode) == [(TOKENS, VOCAB)]
    attend = exported_with_model(decoder(), lambda m, h: jax.vmap(m)(h), HIDDEN)
    assert output_shapes(attend) == [(TOKENS, VOCAB)]


FUSED_LOSSES = {
    "cross_entropy": lambda m, h, t, w: jnp.sum(
        m.cross_entropy(h, t, where=w, z_loss=1e-3, block_size=16)
    ),
    "mean_cross_entropy": lambda m, h, t, w: m.mean_cross_entropy(
        h, t, where=w, z_loss=1e-3, chunk_size=5
    ),
    "log_sum_exp": lambda m, h, t, w: jnp.sum(m.log_sum_exp(h, block_size=16)),
}


@pytest.mark.parametrize("name", FUSED_LOSSES)
def test_fused_losses_and_their_gradients(name):
    loss = FUSED_LOSSES[name]
    exported = exported_with_model(
        decoder(),
        jax.value_and_grad(loss, argnums=(0, 1)),
        HIDDEN,
        TOKEN_IDS,
        WHERE,
    )
    # The loss, the table's gradient and the hidden states'.
    assert output_shapes(exported) == [(), (VOCAB, WIDTH), (TOKENS, WIDTH)]


def test_out_of_range_error_cannot_be_exported():
    """The `"error"` policy checks traced ids in a host callback: it runs wherever
    Python does, but it is no part of a program exported for another machine."""
    strict = Embedding(VOCAB, WIDTH, out_of_range="error", key=jax.random.key(0))
    with pytest.raises(NotImplementedError, match="python_callback"):
        exported_with_model(strict, lambda m, t: jax.vmap(m)(t), TOKEN_IDS)


def test_rotary_embedding_direct_and_vmapped_over_heads():
    heads, head_dim = 3, 8
    rope = RotaryPositionalEmbedding(head_dim, max_seq_len=TOKENS)
    queries = rng.standard_normal((TOKENS, heads, head_dim)).astype(np.float32)
    direct = exported_with_model(rope, lambda m, x: m(x), queries)
    # equinox's pattern: the module applied to each head's `(seq, head_dim)`.
    per_head = exported_with_model(
        rope, lambda m, x: jax.vmap(m, in_axes=1, out_axes=1)(x), queries
    )
    at_positions = exported_with_model(
        rope,
        lambda m, x, p: m.rotation(TOKENS, positions=p)(x),
        queries,
        np.arange(TOKENS, dtype=np.int32)[::-1],
    )
    for exported in (direct, per_head, at_positions):
        assert output_shapes(exported) == [queries.shape]


def test_learned_and_sinusoidal_positions():
    positions = np.arange(TOKENS, dtype=np.int32)
    for module in (
        PositionEmbedding(TOKENS, WIDTH, key=jax.random.key(0)),
        SinusoidalPositionalEncoding(WIDTH, max_seq_len=TOKENS),
    ):
        exported = exported_with_model(module, lambda m, p: jax.vmap(m)(p), positions)
        assert output_shapes(exported) == [(TOKENS, WIDTH)]


SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=WIDTH,
    intermediate_size=24,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=16,
)
BATCH, SEQ, NEW = 2, 5, 3


@pytest.mark.parametrize("family", FAMILY_SPECS)
def test_transformer_forward_training_and_generation(family):
    model = TransformerLM(TransformerConfig(family, **SMALL), key=jax.random.key(0))
    prompts = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
    lengths = np.array([SEQ, 2], np.int32)

    forward = exported_with_model(model, lambda m, t: m(t), prompts[0])
    assert output_shapes(forward) == [(SEQ, VOCAB)]

    def mean_loss(model, tokens):
        return model.mean_loss(tokens[:, :-1], tokens[:, 1:])

    arrays, static = eqx.partition(model, eqx.is_inexact_array)
    training = export(
        jax.value_and_grad(lambda a, t: mean_loss(eqx.combine(a, static), t)),
        arrays,
        prompts,
    )
    gradient_shapes = [x.shape for x in jax.tree.leaves(arrays)]
    assert output_shapes(training) == [(), *gradient_shapes]

    capacity = SEQ + NEW
    prefill = exported_with_model(
        model,
        lambda m, p, n: m.prefill(p, prompt_lengths=n, capacity=capacity),
        prompts,
        lengths,
    )
    # The cache's shapes and dtypes: nothing needs to run.
    _, cache = jax.eval_shape(
        lambda m: m.prefill(prompts, prompt_lengths=lengths, capacity=capacity), model
    )
    cache_shapes = [x.shape for x in jax.tree.leaves(cache)]
    assert output_shapes(prefill) == [(BATCH, VOCAB), *cache_shapes]

    step = exported_with_model(
        model, lambda m, c, t: m.decode_step(c, t), cache, prompts[:, 0]
    )
    assert output_shapes(step) == [(BATCH, VOCAB), *cache_shapes]

    generate = exported_with_model(
        model,
        lambda m, p, n, k: m.generate(
            p, prompt_lengths=n, max_new_tokens=NEW, temperature=0.7, top_k=5, key=k
        ),
        prompts,
        lengths,
        jax.random.key(1),
    )
    assert output_shapes(generate) == [(BATCH, NEW)]


def test_vocab_parallel_loss_and_gradients_on_eight_devices(run_on_devices):
    """The fused losses with the table split over a `vocab` mesh axis and the tokens
    over `data`, exported for 8 devices of each platform."""
    result = run_on_devices(
        f"""
        import json

        import jax
        import jax.numpy as jnp
        import numpy as np
        from jax.sharding import PartitionSpec as P

        import eqx_embed as ee

        rng = np.random.default_rng(0)
        table = rng.standard_normal(({VOCAB * 2}, {WIDTH})).astype(np.float32)
        hidden = rng.standard_normal(({TOKENS * 2}, {WIDTH})).astype(np.float32)
        targets = rng.integers(0, {VOCAB * 2}, {TOKENS * 2}).astype(np.int32)


        def per_token(table, hidden, targets):
            decoder = ee.EmbeddingDecode(ee.Embedding(weight=table))
            return jnp.sum(decoder.cross_entropy(hidden, targets, block_size=8))


        def reduced(table, hidden, targets):
            decoder = ee.EmbeddingDecode(ee.Embedding(weight=table))
            return decoder.mean_cross_entropy(hidden, targets)


        results = {{}}
        mesh = jax.make_mesh((2, 4), ("data", "vocab"))
        with jax.set_mesh(mesh):
            args = (
                jax.device_put(table, P("vocab", None)),
                jax.device_put(hidden, P("data")),
                jax.device_put(targets, P("data")),
            )
            for name, loss in (("per_token", per_token), ("reduced", reduced)):
                program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
                exported = jax.export.export(program, platforms={PLATFORMS!r})(*args)
                results[name] = dict(
                    platforms=list(exported.platforms),
                    devices=exported.nr_devices,
                    outputs=[list(a.shape) for a in exported.out_avals],
                    table_spec=list(exported.in_shardings_jax(mesh)[0].spec),
                    table_gradient_spec=list(exported.out_shardings_jax(mesh)[1].spec),
                    callbacks="callback" in exported.mlir_module(),
                    serialized=exported.mlir_module_serialized.startswith(
                        {MLIR_BYTECODE_MAGIC!r}
                    ),
                )
        print(json.dumps(results))
        """
    )
    for name in ("per_token", "reduced"):
        exported = result[name]
        assert exported["platforms"] == list(PLATFORMS)
        assert exported["devices"] == 8
        assert exported["outputs"] == [[], [VOCAB * 2, WIDTH], [TOKENS * 2, WIDTH]]
        # The table and its gradient stay split over the vocabulary shards.
        assert exported["table_spec"] == ["vocab", None], exported
        assert exported["table_gradient_spec"] == exported["table_spec"]
        assert not exported["callbacks"]
        assert exported["serialized"]
