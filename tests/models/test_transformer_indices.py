"""`TransformerLM`'s token ids follow the same policy as `Embedding`'s: every integer
dtype and Python sequences of ints are accepted, and an id is checked in its own
dtype, so that no id past the vocabulary (a wide int64, an unsigned id) reads a valid
row. The reference is the model on the same ids given as int32."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tolerance

from eqx_embed import TransformerConfig, TransformerLM

VOCAB = 16
CONFIG = TransformerConfig(
    "llama",
    vocab_size=VOCAB,
    hidden_size=8,
    intermediate_size=16,
    num_layers=1,
    num_heads=2,
    max_position_embeddings=8,
)
TOKENS = [3, 15, 0, 7, 9]
# Jitted and batched against eager: one layer's chains of roundings (attention over
# 5 tokens, widths 8 and 16, the norms' and softmax's elementwise steps), plus the
# decode over the width 8, with every value of order one.
CLOSE = tolerance(np.float32, 64, scale=4.0)


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    return TransformerLM(CONFIG, key=jax.random.key(0))


@pytest.fixture(scope="module")
def strict(model) -> TransformerLM:
    config = CONFIG.__class__(**{**CONFIG.__dict__, "out_of_range": "error"})
    skeleton = eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))
    return jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(model))


@pytest.mark.parametrize(
    "as_input",
    [
        lambda t: np.asarray(t, np.uint8),
        lambda t: jnp.asarray(t, jnp.uint8),
        lambda t: jnp.asarray(t, jnp.uint32),
        lambda t: np.asarray(t, np.int64),
        lambda t: list(t),
        lambda t: tuple(t),
    ],
    ids=["numpy-uint8", "uint8", "uint32", "numpy-int64", "list", "tuple"],
)
def test_every_integer_dtype_and_python_sequences_are_accepted(model, as_input):
    expected = model(jnp.asarray(TOKENS, jnp.int32))
    # Each id dtype compiles a program of its own: on Python 3.13 with NumPy 2.5 they
    # round differently (2e-7, the ceiling job of `.ci/version_jobs`).
    np.testing.assert_allclose(model(as_input(TOKENS)), expected, **CLOSE)
    np.testing.assert_allclose(
        model.loss(as_input(TOKENS), as_input(TOKENS[1:] + [0])),
        model.loss(jnp.asarray(TOKENS), jnp.asarray(TOKENS[1:] + [0])),
        **CLOSE,
    )
    if not isinstance(as_input(TOKENS), list | tuple):
        batch = jnp.stack([jnp.asarray(as_input(TOKENS))] * 2)
        np.testing.assert_allclose(
            eqx.filter_jit(lambda m, b: jax.vmap(m)(b))(model, batch)[1],
            expected,
            **CLOSE,
        )


@pytest.mark.parametrize(
    "bad, dtype",
    [(200, jnp.uint8), (2**32 - 1, jnp.uint32), (VOCAB, jnp.uint32)],
)
def test_unsigned_ids_past_the_vocabulary_are_out_of_range(model, strict, bad, dtype):
    tokens = jnp.asarray(TOKENS, dtype).at[2].set(bad)
    logits = np.asarray(eqx.filter_jit(model)(tokens))
    assert np.isnan(logits[2:]).all()  # from the bad id on
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        strict(tokens)
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {bad} is out of"):
        jax.block_until_ready(eqx.filter_jit(strict)(tokens))
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {bad} is out of"):
        jax.block_until_ready(jax.vmap(strict)(jnp.stack([tokens, tokens])))


def test_wide_int64_tokens_never_wrap(model, strict):
    wide = 2**32 + 7
    tokens = np.asarray(TOKENS, np.int64)
    tokens[1] = wide
    logits = np.asarray(model(tokens))
    assert np.isnan(logits[1:]).all()  # from the bad id on
    with pytest.raises(ValueError, match=f"token id {wide} is out of range"):
        strict(tokens)
    with jax.enable_x64(True):
        traced = jnp.asarray(tokens)
        logits = np.asarray(eqx.filter_jit(model)(traced))
        assert np.isnan(logits[1:]).all()  # from the bad id on
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {wide} is"):
            jax.block_until_ready(eqx.filter_jit(strict)(traced))
