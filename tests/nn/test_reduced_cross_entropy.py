"""The reduced fused loss (`mean_cross_entropy`, gradients in the forward pass)
against NumPy float64: the value and both gradients of `sum(weights * losses)`, with
the weights of a mean over `where` or given by the caller."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from test_cross_entropy import TOKENS, assert_close, decoder, make_inputs, reference

import eqx_embed


def mean_weights(where, tokens=TOKENS):
    mask = np.ones(tokens) if where is None else np.asarray(where, np.float64)
    return mask / max(mask.sum(), 1)


def reduced_and_grads(table, hidden, targets, *, cap=None, dtype=None, **kwargs):
    @eqx.filter_jit
    def run(table, hidden):
        def total(table, hidden):
            module = decoder(table, logit_soft_cap=cap, dtype=dtype)
            return module.mean_cross_entropy(hidden, targets, **kwargs)

        return jax.value_and_grad(total, argnums=(0, 1))(table, hidden)

    return run(table, hidden)


def check(table, hidden, targets, reference_weights, *, tol=2e-5, **kwargs):
    """The reduced loss and its gradients against the float64 reference for
    `sum(weights * losses)`."""
    value, (d_table, d_hidden) = reduced_and_grads(table, hidden, targets, **kwargs)
    where, cap, z_loss = kwargs.get("where"), kwargs.get("cap"), kwargs.get("z_loss")
    losses, _, expected_d_table, expected_d_hidden = reference(
        table,
        hidden,
        targets,
        where=where,
        z_loss=z_loss or 0.0,
        cap=cap,
        weights=reference_weights,
    )
    assert value.shape == () and value.dtype == jnp.float32
    expected = np.sum(np.asarray(reference_weights, np.float64) * losses)
    assert_close(value, expected, tol=tol)
    assert_close(d_table, expected_d_table, tol=tol)
    assert_close(d_hidden, expected_d_hidden, tol=tol)


# Chunks smaller than, equal to and larger than the tokens, and not dividing them
# (the last chunk overlaps the one before).
@pytest.mark.parametrize("chunk_size", [1, 5, 12, 64, None])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_mean_and_both_gradients_match_float64(chunk_size, cap):
    table, hidden, targets, _ = make_inputs(37)
    check(table, hidden, targets, mean_weights(None), cap=cap, chunk_size=chunk_size)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_mean_over_where_with_z_loss(cap):
    table, hidden, targets, _ = make_inputs(23)
    where = np.arange(TOKENS) % 3 != 0
    weights = mean_weights(where)
    check(
        table, hidden, targets, weights, where=where, z_loss=1e-2, cap=cap, chunk_size=5
    )


def test_weighted_sum_and_the_weights_gradient():
    table, hidden, targets, weights = make_inputs(31)
    where = np.arange(TOKENS) % 4 != 1
    check(table, hidden, targets, weights, where=where, weights=weights, chunk_size=7)
    # d sum(weights * losses) / d weights = the per-token losses (0 where masked).
    module = decoder(table)
    d_weights = jax.grad(
        lambda w: module.mean_cross_entropy(hidden, targets, where=where, weights=w)
    )(weights)
    losses, *_ = reference(table, hidden, targets, where=where, weights=weights)
    assert_close(d_weights, losses)


@settings(max_examples=8, deadline=None)
@given(
    vocab=st.integers(1, 50),
    chunk_size=st.integers(1, 20),
    tokens=st.integers(1, 13),
    seed=st.integers(0, 2**16),
)
def test_any_vocabulary_tokens_and_chunk(vocab, chunk_size, tokens, seed):
    table, hidden, targets, _ = make_inputs(vocab, tokens=tokens, seed=seed)
    weights = mean_weights(None, tokens)
    check(table, hidden, targets, weights, chunk_size=chunk_size)


def test_equals_the_mean_of_the_per_token_loss_and_its_gradients():
    table, hidden, targets, _ = make_inputs(29)
    where = np.arange(TOKENS) % 2 == 0

    def per_token(table, hidden):
        losses = decoder(table).cross_entropy(hidden, targets, where=where)
        return losses.sum() / where.sum()

    expected = jax.value_and_grad(per_token, argnums=(0, 1))(table, hidden)
    actual = reduced_and_grads(table, hidden, targets, where=where, chunk_size=4)
    tol = 8 * np.finfo(np.float32).eps * 29
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


def test_all_masked_gives_zero_not_nan():
    table, hidden, targets, _ = make_inputs(11)
    where = np.zeros(TOKENS, bool)
    value, (d_table, d_hidden) = reduced_and_grads(table, hidden, targets, where=where)
    assert float(value) == 0.0
    assert not np.any(np.asarray(d_table)) and not np.any(np.asarray(d_hidden))


def test_the_backward_pass_scales_by_the_cotangent():
    table, hidden, targets, _ = make_inputs(19)
    module = decoder(table)
    grads = jax.grad(
        lambda h: 3.0 * module.mean_cross_entropy(h, targets, chunk_size=5)
    )(hidden)
    _, _, _, expected = reference(
        table, hidden, targets, weights=3.0 * mean_weights(None)
    )
    assert_close(grads, expected)


@pytest.mark.parametrize("table_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_accumulates_in_float32(table_dtype):
    table, hidden, targets, _ = make_inputs(45)
    table = table.astype(table_dtype)
    hidden = hidden.astype(jnp.bfloat16)
    value, (d_table, d_hidden) = reduced_and_grads(
        table, hidden, targets, dtype=jnp.bfloat16, chunk_size=5
    )
    table_bf16 = np.asarray(table.astype(jnp.bfloat16), np.float64)
    weights = mean_weights(None)
    losses, _, expected_d_table, expected_d_hidden = reference(
        table_bf16, hidden, targets, weights=weights
    )
    assert value.dtype == jnp.float32
    assert d_table.dtype == table_dtype and d_hidden.dtype == jnp.bfloat16
    # Only the bfloat16 rounding of the logits' gradient before its two products
    # is left: the sums are in float32.
    assert_close(value, np.sum(weights * losses), tol=1e-4)
    pairs = [(d_table, expected_d_table), (d_hidden, expected_d_hidden)]
    for actual, expected in pairs:
        scale = np.max(np.abs(expected))
        np.testing.assert_allclose(
            np.asarray(actual, np.float64), expected, atol=2e-2 * scale
        )


def test_out_of_range_policies():
    table, hidden, targets, _ = make_inputs(11)
    bad_targets = targets.at[2].set(11).at[5].set(-100)
    assert np.isnan(decoder(table).mean_cross_entropy(hidden, bad_targets))
    # Masked out, a bad target is ignored under either policy.
    where = ~np.isin(np.arange(TOKENS), [2, 5])
    for policy in ["nan", "error"]:
        module = eqx_embed.EmbeddingDecode(
            eqx_embed.Embedding(weight=table, out_of_range=policy)
        )
        value = eqx.filter_jit(
            lambda m: m.mean_cross_entropy(hidden, bad_targets, where=where)
        )(module)
        losses, *_ = reference(
            table, hidden, targets, where=where, weights=mean_weights(where)
        )
        assert_close(value, np.sum(mean_weights(where) * losses))
    module = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=table, out_of_range="error")
    )
    message = "target 11 is out of range for a table of 11 rows"
    with pytest.raises(ValueError, match=message):
        module.mean_cross_entropy(hidden, bad_targets.at[5].set(0))
    with pytest.raises(Exception, match=message):
        jax.block_until_ready(
            eqx.filter_jit(lambda m, t: m.mean_cross_entropy(hidden, t))(
                module, bad_targets.at[5].set(0)
            )
        )


def test_bad_arguments_are_named():
    table, hidden, targets, _ = make_inputs(11)
    module = decoder(table)
    with pytest.raises(ValueError, match="z_loss must be non-negative"):
        module.mean_cross_entropy(hidden, targets, z_loss=-1.0)
    with pytest.raises(ValueError, match="chunk_size must be positive, got 0"):
        module.mean_cross_entropy(hidden, targets, chunk_size=0)
    with pytest.raises(ValueError, match="hidden"):
        module.mean_cross_entropy(hidden[:, :3], targets)


def test_tied_reversible_embedding_gets_both_gradients():
    table, hidden, targets, _ = make_inputs(13)
    tokens = targets[::-1]
    module = eqx_embed.ReversibleEmbedding(weight=table)

    def loss(module):
        embedded = jax.vmap(module)(tokens) + hidden
        return module.mean_cross_entropy(embedded, targets, chunk_size=5)

    grads = eqx.filter_grad(loss)(module)
    embedded = np.asarray(table)[np.asarray(tokens)] + np.asarray(hidden)
    _, _, d_table, d_embedded = reference(
        table, embedded, targets, weights=mean_weights(None)
    )
    np.add.at(d_table, np.asarray(tokens), d_embedded)
    assert_close(grads.embedding.weight, d_table)


def test_non_finite_masked_rows_are_inert():
    table, hidden, targets, _ = make_inputs(17)
    where = np.arange(TOKENS) % 3 != 2
    poisoned = hidden.at[2].set(jnp.nan).at[5].set(jnp.inf)
    value, (d_table, d_hidden) = reduced_and_grads(
        table, poisoned, targets, where=where, chunk_size=5
    )
    losses, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, where=where, weights=mean_weights(where)
    )
    assert_close(value, np.sum(mean_weights(where) * losses))
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)
