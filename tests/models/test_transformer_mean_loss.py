"""`TransformerLM.mean_loss`, the batch's training loss through the reduced fused
loss, against the mean of the per-token `loss` over the batch."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from _tolerances import tolerance

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


def test_a_packed_batch_has_the_token_weighted_mean_loss_of_its_documents():
    """Rows of documents packed one after another, with `segment_ids`: the loss and
    its gradients are the token-weighted mean of each document's, run alone."""
    config = TransformerConfig(
        "llama",
        vocab_size=19,
        hidden_size=16,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=12,
    )
    model = TransformerLM(config, key=jax.random.key(0))
    rng = np.random.default_rng(0)
    # Two rows of 12 tokens; ids may repeat: a change of id starts a document.
    lengths = [[5, 4, 3], [2, 7, 1, 2]]
    documents = [[rng.integers(0, 19, size=n + 1) for n in row] for row in lengths]
    tokens = np.stack([np.concatenate([d[:-1] for d in row]) for row in documents])
    targets = np.stack([np.concatenate([d[1:] for d in row]) for row in documents])
    segment_ids = np.stack([np.repeat(np.arange(len(r)) % 2, r) for r in lengths])

    packed = eqx.filter_jit(
        eqx.filter_value_and_grad(
            lambda m: m.mean_loss(tokens, targets, segment_ids=segment_ids)
        )
    )(model)

    @eqx.filter_jit
    @eqx.filter_value_and_grad
    def alone(model, document):
        return model.mean_loss(document[None, :-1], document[None, 1:])

    results = [alone(model, d) for row in documents for d in row]
    shares = [(len(d) - 1) / tokens.size for row in documents for d in row]
    expected = jax.tree.map(
        lambda *xs: sum(x * s for x, s in zip(xs, shares, strict=True)), *results
    )
    # Sums over the width, the MLP and the attended tokens in every layer, then the
    # vocabulary's log-sum-exp and the mean over the batch.
    per_layer = config.hidden_size + config.intermediate_size + tokens.shape[1]
    reduction = config.num_layers * per_layer + config.vocab_size + tokens.size
    leaves = jax.tree.leaves(packed)
    for actual, want in zip(leaves, jax.tree.leaves(expected), strict=True):
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(
            actual, want, **tolerance(np.float32, reduction, scale=scale)
        )
    # Without the segments, attention crosses the documents: another loss.
    crossed = model.mean_loss(tokens, targets)
    assert abs(float(crossed) - float(leaves[0])) > 1e-3
