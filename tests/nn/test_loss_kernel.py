"""The table kind's plug-in point of the fused losses (`table_rows`): a table read
through a plug-in of its own (int8 codes times a scale, a tiny quantized table) gives
the per-token, mean and log-sum-exp losses of the plain table those rows make,
against NumPy in float64, and their gradients with respect to the hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tolerance
from test_cross_entropy import WIDTH, reference

from eqx_embed.nn._loss import (
    fused_cross_entropy,
    fused_log_sum_exp,
    fused_weighted_cross_entropy,
)
from eqx_embed.nn._loss_kernel import table_rows

ROWS, VOCAB, TOKENS = 37, 33, 12  # 4 padding rows; blocks of 8 leave one uneven
SCALE = 0.0625


def int8_rows(codes, start, size, dtype):
    """A quantized table's plug-in: its rows are its int8 codes times `SCALE`."""
    return table_rows(codes, start, size, dtype) * jnp.asarray(SCALE, dtype)


def make_inputs(seed=0):
    rng = np.random.default_rng(seed)
    codes = rng.integers(-127, 128, (ROWS, WIDTH)).astype(np.int8)
    hidden = rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)
    targets = rng.integers(0, VOCAB, TOKENS).astype(np.int32)
    weights = rng.uniform(0.5, 1.5, TOKENS).astype(np.float32)
    return tuple(jnp.asarray(x) for x in (codes, hidden, targets, weights))


def assert_matches(actual, expected, scale):
    # A dot product of WIDTH terms, a soft cap, a log-sum-exp over the vocabulary
    # and a sum over the tokens (for the mean) behind each value.
    np.testing.assert_allclose(
        np.asarray(actual, np.float64),
        expected,
        **tolerance(np.float32, WIDTH + VOCAB + TOKENS + 8, scale=scale),
    )


@pytest.mark.parametrize("cap", [None, 3.0])
def test_losses_through_a_plug_in_match_the_dequantized_table(cap):
    codes, hidden, targets, weights = make_inputs()
    common = dict(
        dtype=jnp.dtype(jnp.float32), logit_soft_cap=cap, num_rows=VOCAB, rows=int8_rows
    )
    losses = jax.jit(
        lambda c, h, t: fused_cross_entropy(
            c, h, t, where=None, z_loss=1e-2, block_size=8, **common
        )
    )(codes, hidden, targets)
    lse = jax.jit(lambda c, h: fused_log_sum_exp(c, h, block_size=8, **common))(
        codes, hidden
    )
    total = jax.jit(
        lambda c, h, t, w: fused_weighted_cross_entropy(
            c, h, t, w, z_loss=1e-2, chunk_size=5, **common
        )
    )(codes, hidden, targets, weights)

    dequantized = np.asarray(codes[:VOCAB], np.float64) * SCALE
    expected, expected_lse, _, _ = reference(
        dequantized, hidden, targets, z_loss=1e-2, cap=cap, weights=weights
    )
    # The terms behind a logit, then behind a loss (the z-loss scales the
    # log-sum-exp's error by 2 * z_loss * lse) and behind the weighted sum.
    logit_terms = float(np.max(np.abs(dequantized) @ np.abs(np.asarray(hidden)).T))
    loss_terms = logit_terms * (2 + 2e-2 * np.max(np.abs(expected_lse)))
    assert losses.dtype == lse.dtype == total.dtype == jnp.float32
    assert_matches(losses, expected, loss_terms)
    assert_matches(lse, expected_lse, logit_terms)
    assert_matches(
        total,
        np.sum(np.asarray(weights) * expected),
        loss_terms * float(np.sum(weights)),
    )
    # Read as a plain table, the codes give other losses: the plug-in was used.
    plain = fused_log_sum_exp(
        codes, hidden, block_size=8, **common | dict(rows=table_rows)
    )
    assert not np.allclose(plain, lse, rtol=1e-2)


def test_a_gradient_through_a_plug_in_reaches_the_hidden_states():
    """Both losses differentiate through a plug-in: the hidden states get the
    gradient of the dequantized table's loss (the int8 codes none: not floats)."""
    codes, hidden, targets, weights = make_inputs()
    common = dict(
        dtype=jnp.dtype(jnp.float32),
        logit_soft_cap=None,
        num_rows=VOCAB,
        rows=int8_rows,
    )

    def per_token(h):
        losses = fused_cross_entropy(
            codes, h, targets, where=None, z_loss=0.0, block_size=8, **common
        )
        return jnp.sum(weights * losses)

    def mean(h):
        return fused_weighted_cross_entropy(
            codes, h, targets, weights, z_loss=0.0, chunk_size=5, **common
        )

    dequantized = np.asarray(codes[:VOCAB], np.float64) * SCALE
    *_, d_hidden = reference(dequantized, hidden, targets, weights=weights)
    logit_terms = float(np.max(np.abs(dequantized) @ np.abs(np.asarray(hidden)).T))
    for loss in (per_token, mean):
        assert_matches(jax.jit(jax.grad(loss))(hidden), d_hidden, logit_terms)
