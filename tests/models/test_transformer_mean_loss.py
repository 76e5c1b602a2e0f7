"""`TransformerLM.mean_loss`, the batch's training loss through the reduced fused
loss, against the mean of the per-token `loss` over the batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from eqx_embed import TransformerConfig, TransformerLM


def test_transformer_mean_loss_is_the_mean_over_the_batch():
    config = TransformerConfig(
        "llama",
        vocab_size=17,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=8,
    )
    model = TransformerLM(config, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 6), 0, 17)
    targets = jnp.roll(tokens, -1, axis=1)
    where = jnp.arange(6)[None, :] < jnp.array([[6], [2], [4]])

    def per_token(model):
        losses = jax.vmap(lambda t, y, w: model.loss(t, y, where=w))(
            tokens, targets, where
        )
        return losses.sum() / where.sum()

    expected = eqx.filter_value_and_grad(per_token)(model)
    actual = eqx.filter_value_and_grad(
        lambda m: m.mean_loss(tokens, targets, where=where, chunk_size=4)
    )(model)
    tol = 64 * np.finfo(np.float32).eps
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)
