"""Eager calls of `TransformerLM` run a compiled program, compiled once per shape: the
same results as the user's own `eqx.filter_jit` (the same program, so bit for bit) and
as a call with jit disabled (primitive by primitive, within float32 rounding); no
compilation on a second call; the `"error"` policy still raises at once."""

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_embed import TransformerConfig, TransformerLM

CONFIG = TransformerConfig(
    "llama",
    vocab_size=40,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=16,
)
TOKENS = jnp.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
TARGETS = jnp.array([1, 4, 1, 5, 9, 2, 6, 5, 3, 5])


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return TransformerLM(CONFIG, key=jax.random.key(0))


def calls(model):
    return {
        "__call__": lambda m: m(TOKENS),
        "hidden_states": lambda m: m.hidden_states(TOKENS),
        "loss": lambda m: m.loss(TOKENS, TARGETS, z_loss=1e-3),
        "score": lambda m: m.score(TOKENS, TARGETS),
    }


@pytest.mark.parametrize("name", ["__call__", "hidden_states", "loss", "score"])
def test_eager_call_is_the_users_jitted_program(model, name):
    call = calls(model)[name]
    eager = call(model)
    jitted = eqx.filter_jit(call)(model)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


@pytest.mark.parametrize("name", ["__call__", "hidden_states", "loss", "score"])
def test_eager_call_matches_a_call_with_jit_disabled(model, name):
    call = calls(model)[name]
    eager = np.asarray(call(model), np.float64)
    with jax.disable_jit():
        reference = np.asarray(call(model), np.float64)
    # Two differently fused float32 programs: rounding grows with the longest
    # reduction (the MLP's 48 inputs) and with depth; 64 eps covers it, and a real
    # difference (a wrong token, a missing layer) is orders larger.
    tolerance = 64 * np.finfo(np.float32).eps * max(1.0, np.abs(reference).max())
    np.testing.assert_allclose(eager, reference, rtol=0, atol=tolerance)


def test_a_second_eager_call_of_a_shape_compiles_nothing(model, caplog):
    model(TOKENS)  # the first call of this shape compiles
    other_tokens = (TOKENS + 1) % CONFIG.vocab_size  # same shape and dtype
    with caplog.at_level(logging.WARNING), jax.log_compiles():
        caplog.clear()
        logits = model(other_tokens)
    compiled = [r.getMessage() for r in caplog.records if "ompil" in r.getMessage()]
    assert not compiled, compiled
    assert logits.shape == (TOKENS.shape[0], CONFIG.vocab_size)


def test_the_users_transformations_still_apply(model):
    batch = jnp.stack([TOKENS, TOKENS[::-1]])
    batched = np.asarray(jax.vmap(model)(batch), np.float64)
    # A batched program against an unbatched one: float32 rounding apart.
    one_by_one = np.stack([np.asarray(model(tokens), np.float64) for tokens in batch])
    tolerance = 64 * np.finfo(np.float32).eps * np.abs(one_by_one).max()
    np.testing.assert_allclose(batched, one_by_one, rtol=0, atol=tolerance)
    grads = eqx.filter_grad(lambda m: m.loss(TOKENS, TARGETS).mean())(model)
    leaves = jax.tree.leaves(eqx.filter(grads, eqx.is_inexact_array))
    assert all(jnp.all(jnp.isfinite(leaf)) for leaf in leaves)
    assert all(jnp.any(leaf != 0) for leaf in leaves)


def test_the_error_policy_still_raises_at_once_on_concrete_ids():
    strict = TransformerLM(
        TransformerConfig(**{**CONFIG.to_dict(), "out_of_range": "error"}),
        key=jax.random.key(0),
    )
    with pytest.raises(ValueError, match="token id 40 is out of range"):
        strict(TOKENS.at[2].set(40))


def test_shape_errors_still_name_the_argument(model):
    too_long = jnp.zeros(CONFIG.max_position_embeddings + 1, dtype=jnp.int32)
    with pytest.raises(ValueError, match="max_position_embeddings=16"):
        model(too_long)


def test_known_positions_still_raise_at_once(model):
    too_far = jnp.arange(len(TOKENS)) + 10  # the tables hold 16 positions
    with pytest.raises(ValueError, match="position 16 is out of range"):
        model(TOKENS, token_positions=too_far)
    logits = eqx.filter_jit(model)(TOKENS, token_positions=too_far)
    assert np.isnan(logits[6:]).all()  # traced: the "nan" policy
