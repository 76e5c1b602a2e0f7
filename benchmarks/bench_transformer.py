"""TransformerLM against the same Llama written with `equinox.nn` primitives: forward
and training-step throughput on CPU, and XLA's temporary memory for a training step.

The model: Llama family, tied embeddings, 4 layers, width 256, 8 query heads sharing
4 key/value heads, MLP width 768, vocabulary 8192, sequences of 256 tokens, batches of
8, float32.

The `equinox.nn` peer is what a user of Equinox writes: `eqx.nn.Embedding`, and an
`eqx.nn.Linear` output projection tied to it by `eqx.nn.Shared`; per layer
`eqx.nn.RMSNorm`, `eqx.nn.Linear` projections, `eqx.nn.RotaryPositionalEmbedding` over
each head, grouped-query attention written by hand (key/value heads repeated as
Hugging Face's `repeat_kv`); a Python loop over the layers (so XLA sees four copies of
the layer, where TransformerLM scans over one). It holds TransformerLM's own weights,
and the two are checked to give the same logits before anything is timed.

Cases (each sequence through `jax.vmap`, everything under `eqx.filter_jit`):

- forward: the logits `(batch, seq, vocab)`.
- training step: `eqx.filter_value_and_grad` of the mean next-token loss and an
  `optax.adamw` update. The loss is TransformerLM's fused `model.loss` (which never
  holds the logits), or the logits followed by
  `optax.softmax_cross_entropy_with_integer_labels`, for both models; the latter
  isolates the body from the loss. `fused, flattened batch` is the fused loss called
  once on the batch's hidden states flattened to `(batch * seq, hidden)`, rather than
  once per sequence under `jax.vmap`: under `vmap` the fused loss's backward pass is
  batched as a whole, so it builds one table-sized gradient per sequence and sums
  them, which flattening avoids.
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from _harness import (  # noqa: E402
    Goal,
    Row,
    check_ratio_goal,
    compiled_temp_bytes,
    machine_description,
    report,
    time_interleaved,
)

from eqx_embed import TransformerConfig, TransformerLM  # noqa: E402

BATCH, SEQ = 8, 256
CONFIG = TransformerConfig(
    family="llama",
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_layers=4,
    num_heads=8,
    num_kv_heads=4,
    max_position_embeddings=SEQ,
    tie_word_embeddings=True,
)


class EquinoxAttention(eqx.Module):
    query: eqx.nn.Linear
    key: eqx.nn.Linear
    value: eqx.nn.Linear
    output: eqx.nn.Linear
    rope: eqx.nn.RotaryPositionalEmbedding
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, *, key):
        query_key, key_key, value_key, output_key = jax.random.split(key, 4)
        linear = dict(use_bias=False)
        self.query = eqx.nn.Linear(
            hidden_size, num_heads * head_dim, key=query_key, **linear
        )
        self.key = eqx.nn.Linear(
            hidden_size, num_kv_heads * head_dim, key=key_key, **linear
        )
        self.value = eqx.nn.Linear(
            hidden_size, num_kv_heads * head_dim, key=value_key, **linear
        )
        self.output = eqx.nn.Linear(
            num_heads * head_dim, hidden_size, key=output_key, **linear
        )
        self.rope = eqx.nn.RotaryPositionalEmbedding(head_dim)
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads

    def __call__(self, x):
        seq_len = x.shape[0]
        rope_per_head = jax.vmap(self.rope, in_axes=1, out_axes=1)
        queries = rope_per_head(
            jax.vmap(self.query)(x).reshape(seq_len, self.num_heads, -1)
        )
        keys = rope_per_head(
            jax.vmap(self.key)(x).reshape(seq_len, self.num_kv_heads, -1)
        )
        values = jax.vmap(self.value)(x).reshape(seq_len, self.num_kv_heads, -1)
        groups = self.num_heads // self.num_kv_heads
        keys = jnp.repeat(keys, groups, axis=1)
        values = jnp.repeat(values, groups, axis=1)
        scores = jnp.einsum("qhd,khd->hqk", queries, keys) / np.sqrt(queries.shape[-1])
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
        weights = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)
        attended = jnp.einsum("hqk,khd->qhd", weights, values)
        return jax.vmap(self.output)(attended.reshape(seq_len, -1))


class EquinoxBlock(eqx.Module):
    attention_norm: eqx.nn.RMSNorm
    attention: EquinoxAttention
    mlp_norm: eqx.nn.RMSNorm
    gate: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(self, config: TransformerConfig, *, key):
        attention_key, gate_key, up_key, down_key = jax.random.split(key, 4)
        hidden, inner = config.hidden_size, config.intermediate_size
        self.attention_norm = eqx.nn.RMSNorm(hidden, eps=config.norm_eps)
        self.attention = EquinoxAttention(
            hidden,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
            key=attention_key,
        )
        self.mlp_norm = eqx.nn.RMSNorm(hidden, eps=config.norm_eps)
        self.gate = eqx.nn.Linear(hidden, inner, use_bias=False, key=gate_key)
        self.up = eqx.nn.Linear(hidden, inner, use_bias=False, key=up_key)
        self.down = eqx.nn.Linear(inner, hidden, use_bias=False, key=down_key)

    def __call__(self, x):
        x = x + self.attention(jax.vmap(self.attention_norm)(x))

        def mlp(y):
            return self.down(jax.nn.silu(self.gate(y)) * self.up(y))

        return x + jax.vmap(mlp)(jax.vmap(self.mlp_norm)(x))


class EquinoxLlama(eqx.Module):
    embedding_and_decode: eqx.nn.Shared
    blocks: list[EquinoxBlock]
    final_norm: eqx.nn.RMSNorm

    def __init__(self, config: TransformerConfig, *, key):
        embedding_key, decode_key, *block_keys = jax.random.split(
            key, 2 + config.num_layers
        )
        embedding = eqx.nn.Embedding(
            config.vocab_size, config.hidden_size, key=embedding_key
        )
        decode = eqx.nn.Linear(
            config.hidden_size, config.vocab_size, use_bias=False, key=decode_key
        )
        self.embedding_and_decode = eqx.nn.Shared(
            (embedding, decode),
            where=lambda pair: pair[1].weight,
            get=lambda pair: pair[0].weight,
        )
        self.blocks = [EquinoxBlock(config, key=k) for k in block_keys]
        self.final_norm = eqx.nn.RMSNorm(config.hidden_size, eps=config.norm_eps)

    def __call__(self, tokens):
        embedding, decode = self.embedding_and_decode()
        x = jax.vmap(embedding)(tokens)
        for block in self.blocks:
            x = block(x)
        return jax.vmap(decode)(jax.vmap(self.final_norm)(x))


def equinox_copy(model: TransformerLM) -> EquinoxLlama:
    """The `equinox.nn` Llama holding `model`'s weights."""
    peer = EquinoxLlama(model.config, key=jax.random.key(1))

    def copy_layer(block: EquinoxBlock, layer: int) -> EquinoxBlock:
        ours = jax.tree.map(lambda stacked: stacked[layer], model.blocks)
        return eqx.tree_at(
            lambda b: (
                b.attention_norm.weight,
                b.attention.query.weight,
                b.attention.key.weight,
                b.attention.value.weight,
                b.attention.output.weight,
                b.mlp_norm.weight,
                b.gate.weight,
                b.up.weight,
                b.down.weight,
            ),
            block,
            (
                ours.attention_norm.weight,
                ours.attention.query_proj.weight,
                ours.attention.key_proj.weight,
                ours.attention.value_proj.weight,
                ours.attention.output_proj.weight,
                ours.mlp_norm.weight,
                ours.mlp.gate.weight,
                ours.mlp.up.weight,
                ours.mlp.down.weight,
            ),
        )

    return eqx.tree_at(
        lambda m: (
            m.embedding_and_decode.pytree[0].weight,
            m.final_norm.weight,
            m.blocks,
        ),
        peer,
        (
            model.embedding.weight,
            model.final_norm.weight,
            [copy_layer(block, layer) for layer, block in enumerate(peer.blocks)],
        ),
    )


def fused_loss(model: TransformerLM, tokens, targets):
    return jax.vmap(model.loss)(tokens, targets).mean()


def flattened_fused_loss(model: TransformerLM, tokens, targets):
    hidden = jax.vmap(model.hidden_states)(tokens)
    return model.embedding.cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    ).mean()


def logits_loss(model, tokens, targets):
    logits = jax.vmap(model)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


OPTIMISER = optax.adamw(1e-3)


def make_train_step(loss_fn):
    @eqx.filter_jit
    def step(model, state, tokens, targets):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model, tokens, targets)
        updates, state = OPTIMISER.update(
            grads, state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), state, loss

    return step


def train_step_temp_bytes(step, model, tokens, targets) -> int:
    """XLA's temporary bytes for one training step, compiled from shapes alone."""
    state = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
    arrays, static = eqx.partition((model, state), eqx.is_array)

    def run(arrays, tokens, targets):
        model, state = eqx.combine(arrays, static)
        return eqx.filter(step(model, state, tokens, targets), eqx.is_array)

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)
    return compiled_temp_bytes(run, shapes, tokens, targets)


def main() -> list[Row | Goal]:
    print(machine_description())
    print(
        f"Llama, tied: {CONFIG.num_layers} layers, width {CONFIG.hidden_size}, "
        f"{CONFIG.num_heads} heads / {CONFIG.num_kv_heads} kv heads, MLP "
        f"{CONFIG.intermediate_size}, vocab {CONFIG.vocab_size}; batch {BATCH} x "
        f"seq {SEQ}, float32"
    )
    ours = TransformerLM(CONFIG, key=jax.random.key(0))
    peer = equinox_copy(ours)
    data = jax.random.randint(jax.random.key(2), (BATCH, SEQ + 1), 0, CONFIG.vocab_size)
    tokens, targets = data[:, :-1], data[:, 1:]
    tokens_per_call = BATCH * SEQ

    forward = eqx.filter_jit(lambda model, tokens: jax.vmap(model)(tokens))
    our_logits, peer_logits = forward(ours, tokens), forward(peer, tokens)
    np.testing.assert_allclose(our_logits, peer_logits, rtol=1e-4, atol=1e-4)
    peer_loss = eqx.filter_jit(logits_loss)(peer, tokens, targets)
    for loss in (fused_loss, flattened_fused_loss):
        our_loss = eqx.filter_jit(loss)(ours, tokens, targets)
        np.testing.assert_allclose(our_loss, peer_loss, rtol=1e-5)
    print("same logits and loss: checked")

    rows = report(
        f"TransformerLM forward, {tokens_per_call} tokens",
        time_interleaved(
            {
                "eqx_embed logits": lambda: forward(ours, tokens),
                "equinox.nn logits": lambda: forward(peer, tokens),
            }
        ),
        baseline="equinox.nn logits",
    )

    state = OPTIMISER.init(eqx.filter(ours, eqx.is_inexact_array))
    peer_state = OPTIMISER.init(eqx.filter(peer, eqx.is_inexact_array))
    baseline = "equinox.nn, logits + optax"
    steps = {
        "eqx_embed, fused model.loss": (make_train_step(fused_loss), ours, state),
        "eqx_embed, fused, flattened batch": (
            make_train_step(flattened_fused_loss),
            ours,
            state,
        ),
        "eqx_embed, logits + optax": (make_train_step(logits_loss), ours, state),
        baseline: (make_train_step(logits_loss), peer, peer_state),
    }
    rows += report(
        f"TransformerLM training step (adamw), {tokens_per_call} tokens",
        time_interleaved(
            {
                name: functools.partial(step, model, state, tokens, targets)
                for name, (step, model, state) in steps.items()
            },
            rounds=7,
        ),
        baseline=baseline,
    )

    # Issue 5: TransformerLM at least as fast as the `equinox.nn` model.
    goals = [
        check_ratio_goal(rows, case, 1.0, source="issue 5")
        for case in ("eqx_embed logits", "eqx_embed, fused model.loss")
    ]
    print("\ntokens/s")
    for row in rows:
        print(f"  {row.case:<34}  {tokens_per_call / row.median_ms * 1e3:10,.0f}")

    # run_all.py reads a benchmark named *_mib as MiB of XLA temporaries.
    memory = "transformer_training_step_temp_mib"
    mebibytes = {
        name: train_step_temp_bytes(step, model, tokens, targets) / 2**20
        for name, (step, model, _) in steps.items()
    }
    print(f"\n{memory}  (XLA temporaries of one training step)")
    for name, value in mebibytes.items():
        ratio = value / mebibytes[baseline]
        print(f"  {name:<34}  {value:8.1f} MiB  {ratio:6.2f}x")
        rows.append(Row(memory, name, value, ratio, baseline))
    return rows + goals


if __name__ == "__main__":
    main()
