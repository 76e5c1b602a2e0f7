"""`EmbeddingDecode`, `ReversibleEmbedding` and weight tying, against NumPy in float64,
keras' `ReversibleEmbedding`, penzai, `flax.linen.Embed.attend`, `eqx.nn.Shared`
and hand-written functions of a single table."""

import re

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import keras
import numpy as np
import optax
import pytest
from _tolerances import matmul_tolerance, tolerance
from hypothesis import given
from penzai import pz

import eqx_embed

LOW_PRECISION = [jnp.bfloat16, jnp.float16]


def normal(*shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


def reference_logits(table, hidden, cap=None):
    """`hidden @ table.T` in float64, soft-capped as keras does."""
    logits = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T
    return logits if cap is None else cap * np.tanh(logits / cap)


def logit_tolerance(table, hidden, dtype=np.float32):
    """For logits of two programs: dot products of the embedding width, then the soft
    cap's divide, tanh and multiply."""
    return matmul_tolerance(hidden, table, dtype, after=4)


def apply_all(module, inputs):
    """The documented way to look up or decode many: vmap, under jit."""
    return eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(module, inputs)


def keras_reversible(table, *, reverse_table=None, logit_soft_cap=None, **kwargs):
    """keras' layer on our tables; keras stores an untied reverse kernel
    transposed, as `(embedding_size, num_embeddings)`."""
    n, e = table.shape
    layer = keras.layers.ReversibleEmbedding(
        n,
        e,
        tie_weights=reverse_table is None,
        logit_soft_cap=logit_soft_cap,
        **kwargs,
    )
    layer.build()
    layer.embeddings.assign(table)
    if reverse_table is not None:
        layer.reverse_embeddings.assign(jnp.asarray(reverse_table).T)
    return layer


# EmbeddingDecode


@given(
    st.integers(1, 12),
    st.integers(1, 8),
    st.one_of(st.none(), st.floats(0.5, 50.0)),
    st.integers(0, 2**16),
)
def test_decode_matches_float64(n, e, cap, seed):
    table, hidden = normal(n, e, seed=seed), normal(3, e, seed=seed + 1)
    decode = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=table), logit_soft_cap=cap
    )
    got = apply_all(decode, hidden)
    assert got.shape == (3, n)
    assert got.dtype == np.float32
    np.testing.assert_allclose(
        got, reference_logits(table, hidden, cap), **logit_tolerance(table, hidden)
    )


def test_decode_reads_the_embedding_leaf_and_equals_attend():
    embedding = eqx_embed.Embedding(11, 5, key=jax.random.key(0))
    decode = eqx_embed.EmbeddingDecode(embedding)
    assert decode.weight is embedding.weight
    hidden = normal(4, 5, seed=1)
    # A jitted and an eager program: equal up to their rounding.
    np.testing.assert_allclose(
        apply_all(decode, hidden),
        jax.vmap(embedding.attend)(hidden),
        **logit_tolerance(embedding.weight, hidden),
    )


@pytest.mark.parametrize("cap", [0.0, -1.0, float("nan")])
def test_decode_rejects_non_positive_soft_cap(cap):
    embedding = eqx_embed.Embedding(4, 3, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match=r"logit_soft_cap must be a positive finite number, got"
    ):
        eqx_embed.EmbeddingDecode(embedding, logit_soft_cap=cap)
    with pytest.raises(
        ValueError, match=r"logit_soft_cap must be a positive finite number, got"
    ):
        eqx_embed.ReversibleEmbedding(4, 3, logit_soft_cap=cap, key=jax.random.key(0))


@pytest.mark.parametrize("param_dtype", [jnp.float32, *LOW_PRECISION])
@pytest.mark.parametrize("dtype", [None, jnp.float32, *LOW_PRECISION])
def test_soft_capped_decode_dtypes_round_once(param_dtype, dtype):
    cap = 3.0
    table = normal(40, 128, dtype=param_dtype)
    hidden = normal(3, 128, seed=1, dtype=param_dtype)
    decode = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=table), logit_soft_cap=cap, dtype=dtype
    )
    got = apply_all(decode, hidden)
    compute = param_dtype if dtype is None else dtype
    assert got.dtype == compute
    # The operands cast to the compute dtype, then one rounding of the exact result:
    # accumulation and soft cap in float32 for low precision.
    reference = reference_logits(table.astype(compute), hidden.astype(compute), cap)
    if compute == jnp.float32:
        # Rounding in the float32 sum of 128 products dominates.
        close = logit_tolerance(table, hidden)
    else:
        epsilon = float(jnp.finfo(compute).eps)
        close = dict(rtol=epsilon, atol=epsilon)
    np.testing.assert_allclose(np.asarray(got, np.float64), reference, **close)
    if compute != jnp.float32:
        text = jax.jit(jax.vmap(decode)).lower(hidden).as_text()
        assert re.search(r"stablehlo\.dot_general.*-> tensor<3x40xf32>", text), text


def test_decode_in_float64_under_x64():
    table = np.random.default_rng(0).normal(size=(9, 4))
    hidden = np.random.default_rng(1).normal(size=(3, 4))
    with jax.enable_x64(True):
        decode = eqx_embed.EmbeddingDecode(
            eqx_embed.Embedding(weight=jnp.asarray(table)), logit_soft_cap=2.0
        )
        got = apply_all(decode, jnp.asarray(hidden))
        assert got.dtype == np.float64
        np.testing.assert_allclose(
            got,
            reference_logits(table, hidden, 2.0),
            **logit_tolerance(table, hidden, np.float64),
        )
        reversible = eqx_embed.ReversibleEmbedding(9, 4, key=jax.random.key(0))
        assert reversible.embedding.weight.dtype == np.float64
    assert not jax.config.jax_enable_x64


# Parity with keras and penzai


@pytest.mark.parametrize("cap", [None, 1.5, 30.0])
def test_tied_matches_keras(cap):
    table = normal(13, 6)
    ours = eqx_embed.ReversibleEmbedding(weight=table, logit_soft_cap=cap)
    theirs = keras_reversible(table, logit_soft_cap=cap)
    ids = jnp.array([0, 12, -1, -13, 5])
    np.testing.assert_array_equal(apply_all(ours, ids), theirs(ids))
    hidden = normal(4, 6, seed=1) * 3
    np.testing.assert_allclose(
        apply_all(ours.decode, hidden),
        theirs(hidden, reverse=True),
        **logit_tolerance(table, hidden),
    )


@pytest.mark.parametrize("cap", [None, 2.0])
def test_untied_matches_keras(cap):
    table, reverse_table = normal(13, 6), normal(13, 6, seed=1)
    ours = eqx_embed.ReversibleEmbedding(
        weight=table,
        tie_weights=False,
        reverse_weight=reverse_table,
        logit_soft_cap=cap,
    )
    theirs = keras_reversible(table, reverse_table=reverse_table, logit_soft_cap=cap)
    ids = jnp.array([3, 12, -2])
    np.testing.assert_array_equal(apply_all(ours, ids), theirs(ids))
    hidden = normal(4, 6, seed=2) * 3
    expected = theirs(hidden, reverse=True)
    close = logit_tolerance(reverse_table, hidden)
    np.testing.assert_allclose(apply_all(ours.decode, hidden), expected, **close)
    np.testing.assert_allclose(
        expected, reference_logits(reverse_table, hidden, cap), **close
    )


@pytest.mark.parametrize("reverse_dtype", LOW_PRECISION)
def test_reverse_dtype_matches_keras_and_is_more_accurate(reverse_dtype):
    table = normal(64, 256)
    hidden = normal(8, 256, seed=1)
    ours = eqx_embed.ReversibleEmbedding(
        weight=table, logit_soft_cap=5.0, reverse_dtype=reverse_dtype
    )
    theirs = keras_reversible(
        table, logit_soft_cap=5.0, reverse_dtype=jnp.dtype(reverse_dtype).name
    )
    got = apply_all(ours.decode, hidden)
    expected = theirs(hidden, reverse=True)
    assert got.dtype == expected.dtype == reverse_dtype
    reference = reference_logits(
        table.astype(reverse_dtype), hidden.astype(reverse_dtype), 5.0
    )
    ours_error = np.abs(np.asarray(got, np.float64) - reference).max()
    keras_error = np.abs(np.asarray(expected, np.float64) - reference).max()
    # keras soft-caps in the low-precision dtype, we in float32 before one rounding.
    epsilon = float(jnp.finfo(reverse_dtype).eps)
    assert ours_error <= keras_error
    assert ours_error <= 5.0 * epsilon / 2
    np.testing.assert_allclose(
        np.asarray(got, np.float64), np.asarray(expected, np.float64), atol=5 * epsilon
    )


def test_lookup_and_decode_match_penzai():
    table = normal(10, 4)
    penzai_table = pz.nn.EmbeddingTable(
        embeddings=pz.Parameter(
            value=pz.nx.wrap(table).tag("vocabulary", "embedding"), label="table"
        ),
        vocabulary_axis="vocabulary",
    )
    ours = eqx_embed.ReversibleEmbedding(weight=table)
    # penzai clamps out-of-range ids, so only in-range ones (negatives included).
    ids = jnp.array([[0, 9, -1], [-10, 4, 4]])
    expected = pz.nn.EmbeddingLookup(penzai_table)(pz.nx.wrap(ids).tag("b", "s"))
    np.testing.assert_array_equal(
        apply_all(ours, ids.ravel()).reshape(2, 3, 4),
        expected.untag("b", "s", "embedding").unwrap(),
    )
    hidden = normal(5, 4, seed=1)
    expected = pz.nn.EmbeddingDecode(penzai_table)(
        pz.nx.wrap(hidden).tag("s", "embedding")
    )
    np.testing.assert_allclose(
        apply_all(ours.decode, hidden),
        expected.untag("s", "vocabulary").unwrap(),
        **logit_tolerance(table, hidden),
    )


# ReversibleEmbedding construction


def test_reversible_lookup_is_the_embedding_lookup():
    table = normal(8, 3)
    ours = eqx_embed.ReversibleEmbedding(weight=table, padding_idx=2)
    reference = eqx_embed.Embedding(weight=table, padding_idx=2)
    ids = jnp.array([0, 2, 7, -1, 8])
    np.testing.assert_array_equal(jax.vmap(ours)(ids), jax.vmap(reference)(ids))
    assert ours.tie_weights
    assert ours.reverse_embedding is None
    assert ours.decoder.weight is ours.embedding.weight


def test_reversible_lookup_follows_the_out_of_range_policy_under_jit():
    table = normal(8, 3)
    ids = jnp.array([1, 8, -9])
    nan = eqx_embed.ReversibleEmbedding(weight=table)
    np.testing.assert_array_equal(np.isnan(apply_all(nan, ids)).all(1), [0, 1, 1])
    error = eqx_embed.ReversibleEmbedding(weight=table, out_of_range="error")
    with pytest.raises(
        eqx.EquinoxRuntimeError, match="token id 8 is out of range for a table of 8"
    ):
        jax.block_until_ready(apply_all(error, ids))


def test_untied_draws_its_own_table():
    ours = eqx_embed.ReversibleEmbedding(
        6, 4, tie_weights=False, param_dtype=jnp.bfloat16, key=jax.random.key(0)
    )
    assert not ours.tie_weights
    assert ours.decoder.weight is ours.reverse_embedding.weight
    assert ours.reverse_embedding.weight.shape == (6, 4)
    assert ours.reverse_embedding.weight.dtype == jnp.bfloat16
    assert not np.array_equal(ours.embedding.weight, ours.reverse_embedding.weight)
    # A drawn decode table takes the dtype of a given lookup table.
    given = eqx_embed.ReversibleEmbedding(
        weight=normal(6, 4, dtype=jnp.float16), tie_weights=False, key=jax.random.key(0)
    )
    assert given.reverse_embedding.weight.dtype == jnp.float16


def test_param_dtype_casts_both_given_tables():
    ours = eqx_embed.ReversibleEmbedding(
        weight=normal(6, 4),
        tie_weights=False,
        reverse_weight=normal(6, 4, seed=1),
        param_dtype=jnp.bfloat16,
    )
    assert ours.embedding.weight.dtype == jnp.bfloat16
    assert ours.reverse_embedding.weight.dtype == jnp.bfloat16


def test_reversible_construction_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"reverse_weight is only for tie_weights"):
        eqx_embed.ReversibleEmbedding(weight=normal(6, 4), reverse_weight=normal(6, 4))
    with pytest.raises(ValueError, match=r"tie_weights=False needs .*reverse_weight"):
        eqx_embed.ReversibleEmbedding(weight=normal(6, 4), tie_weights=False)
    # Caught by the annotation under jaxtyping's import hook (as in this test suite),
    # by the ValueError on a default install.
    with pytest.raises(
        (ValueError, jaxtyping.TypeCheckError),
        match=r"(?s)reverse_weight.*(\(6, 4\), got \(5, 4\)|f32\[5,4\])",
    ):
        eqx_embed.ReversibleEmbedding(
            weight=normal(6, 4), tie_weights=False, reverse_weight=normal(5, 4)
        )


# Tying


class TinyLM(eqx.Module):
    """A model built the documented way: it stores the tied module once and decodes
    through it."""

    embed: eqx_embed.ReversibleEmbedding
    mix: eqx.nn.Linear

    def __init__(self, table, *, key, **kwargs):
        embed_key, mix_key = jax.random.split(key)
        self.embed = eqx_embed.ReversibleEmbedding(
            weight=table, key=embed_key, **kwargs
        )
        self.mix = eqx.nn.Linear(table.shape[1], table.shape[1], key=mix_key)

    def __call__(self, token):
        return self.embed.decode(jnp.tanh(self.mix(self.embed(token))))


class TinyLMFromEmbedding(eqx.Module):
    """The other documented way: an `Embedding` field, and an `EmbeddingDecode` built
    from it where it is needed."""

    embedding: eqx_embed.Embedding

    def __call__(self, token):
        decode = eqx_embed.EmbeddingDecode(self.embedding, logit_soft_cap=4.0)
        return decode(jnp.tanh(self.embedding(token)))


def table_leaves(model, shape):
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    return [leaf for leaf in leaves if leaf.shape == shape]


def test_tied_table_is_one_leaf():
    table = normal(10, 4)
    tied = eqx_embed.ReversibleEmbedding(weight=table, logit_soft_cap=3.0)
    assert len(jax.tree.leaves(eqx.filter(tied, eqx.is_inexact_array))) == 1
    untied = eqx_embed.ReversibleEmbedding(
        weight=table, tie_weights=False, key=jax.random.key(0)
    )
    assert len(jax.tree.leaves(eqx.filter(untied, eqx.is_inexact_array))) == 2
    model = TinyLM(table, key=jax.random.key(0))
    assert len(jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))) == 3
    assert len(table_leaves(model, (10, 4))) == 1
    other = TinyLMFromEmbedding(eqx_embed.Embedding(weight=table))
    assert len(table_leaves(other, (10, 4))) == 1


TOKENS = jnp.array([0, 3, 3, 7, 9, 1, 7])


def lookup_decode_loss(lookup_table, decode_table, cotangent, cap=None):
    """The model written out by hand: lookup, a nonlinearity, decode."""
    logits = jnp.tanh(lookup_table[TOKENS]) @ decode_table.T
    if cap is not None:
        logits = cap * jnp.tanh(logits / cap)
    return jnp.sum(cotangent * logits)


def gradient_tolerance(table, cotangent):
    """For table gradients of two programs: sums over the tokens and the vocabulary
    of products of the width, through tanh; every term is bounded by the cotangent
    times (1 + the largest table entry), as |tanh| and its slope are at most 1."""
    cotangent = np.abs(np.asarray(cotangent, np.float64))
    scale = cotangent.sum() * (1 + np.abs(np.asarray(table, np.float64)).max())
    reduction = sum(cotangent.shape) + table.shape[1] + 8
    return tolerance(table.dtype, reduction, scale=scale)


def test_gradient_is_the_sum_of_lookup_and_decode_contributions():
    with jax.enable_x64(True):
        table = normal(10, 4, dtype=np.float64)
        cotangent = normal(len(TOKENS), 10, seed=1, dtype=np.float64)
        model = TinyLMFromEmbedding(eqx_embed.Embedding(weight=table))

        @eqx.filter_jit
        @eqx.filter_grad
        def gradient(model):
            return jnp.sum(cotangent * jax.vmap(model)(TOKENS))

        got = gradient(model).embedding.weight
        assert got.dtype == np.float64

        def single_table(table):
            return lookup_decode_loss(table, table, cotangent, 4.0)

        from_lookup, from_decode = jax.grad(lookup_decode_loss, argnums=(0, 1))(
            table, table, cotangent, 4.0
        )
        close = gradient_tolerance(table, cotangent)
        np.testing.assert_allclose(got, jax.grad(single_table)(table), **close)
        np.testing.assert_allclose(got, from_lookup + from_decode, **close)
        # Both contributions are there: neither alone is the gradient.
        assert not np.allclose(got, from_lookup)
        assert not np.allclose(got, from_decode)
    assert not jax.config.jax_enable_x64


def test_tied_gradient_matches_equinox_shared():
    table = normal(10, 4)
    cotangent = normal(len(TOKENS), 10, seed=1)
    ours = eqx_embed.ReversibleEmbedding(weight=table)

    def our_loss(model):
        logits = jax.vmap(lambda t: model.decode(jnp.tanh(model(t))))(TOKENS)
        return jnp.sum(cotangent * logits)

    linear = eqx.nn.Linear(4, 10, use_bias=False, key=jax.random.key(0))
    shared = eqx.nn.Shared(
        (eqx.nn.Embedding(weight=table), linear),
        lambda pair: pair[1].weight,
        lambda pair: pair[0].weight,
    )

    def shared_loss(shared):
        embedding, linear = shared()
        logits = jax.vmap(lambda t: linear(jnp.tanh(embedding(t))))(TOKENS)
        return jnp.sum(cotangent * logits)

    got = eqx.filter_jit(eqx.filter_grad(our_loss))(ours).embedding.weight
    expected = eqx.filter_jit(eqx.filter_grad(shared_loss))(shared).pytree[0].weight
    np.testing.assert_allclose(got, expected, **gradient_tolerance(table, cotangent))


def test_untied_gradients_are_the_separate_contributions():
    table, reverse_table = normal(10, 4), normal(10, 4, seed=2)
    cotangent = normal(len(TOKENS), 10, seed=1)
    model = eqx_embed.ReversibleEmbedding(
        weight=table, tie_weights=False, reverse_weight=reverse_table
    )

    @eqx.filter_grad
    def gradient(model):
        logits = jax.vmap(lambda t: model.decode(jnp.tanh(model(t))))(TOKENS)
        return jnp.sum(cotangent * logits)

    grads = gradient(model)
    from_lookup, from_decode = jax.grad(lookup_decode_loss, argnums=(0, 1))(
        table, reverse_table, cotangent
    )
    close = gradient_tolerance(table, cotangent)
    np.testing.assert_allclose(grads.embedding.weight, from_lookup, **close)
    np.testing.assert_allclose(grads.reverse_embedding.weight, from_decode, **close)


def train(model, loss, steps):
    optimiser = optax.adamw(1e-2, weight_decay=1e-3)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(loss)(model)
        updates, state = optimiser.update(grads, state, model)
        return eqx.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = step(model, state)
    return model


def reads(model):
    """The table as the lookup reads it, and as the decode reads it (the logits of
    the unit vectors are the table's columns, exactly)."""
    n, e = model.embed.embedding.weight.shape
    looked_up = jax.vmap(model.embed)(jnp.arange(n))
    decoded = jax.vmap(model.embed.decode)(jnp.eye(e, dtype=looked_up.dtype)).T
    return looked_up, decoded


@pytest.mark.parametrize("tie_weights", [True, False])
def test_adamw_keeps_lookup_and_decode_on_one_table(tie_weights):
    table = normal(12, 4)
    targets = jnp.array([1, 4, 4, 8, 0, 2, 11])
    model = TinyLM(table, tie_weights=tie_weights, key=jax.random.key(0))

    def loss(model):
        logits = jax.vmap(model)(TOKENS)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    trained = train(model, loss, steps=60)
    looked_up, decoded = reads(trained)
    assert float(loss(trained)) < 0.5 * float(loss(model))
    if tie_weights:
        assert len(table_leaves(trained, (12, 4))) == 1
        np.testing.assert_array_equal(looked_up, trained.embed.embedding.weight)
        np.testing.assert_array_equal(decoded, looked_up)
        # The same steps on a hand-written model of one table.
        np.testing.assert_allclose(
            looked_up, train_by_hand(model, targets, steps=60), rtol=1e-4, atol=1e-5
        )
    else:
        assert not np.allclose(decoded, looked_up, atol=1e-2)


def train_by_hand(model, targets, steps):
    """`train` on the parameters of `TinyLM` (tied) as plain arrays."""
    params = (model.embed.embedding.weight, model.mix.weight, model.mix.bias)

    def loss(params):
        table, mix_weight, mix_bias = params
        hidden = jnp.tanh(table[TOKENS] @ mix_weight.T + mix_bias)
        logits = hidden @ table.T
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    optimiser = optax.adamw(1e-2, weight_decay=1e-3)
    state = optimiser.init(params)

    @jax.jit
    def step(params, state):
        updates, state = optimiser.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = step(params, state)
    return params[0]


@pytest.mark.parametrize("tie_weights", [True, False])
def test_serialisation_round_trips_and_stores_the_table_once(tmp_path, tie_weights):
    table = normal(64, 32)
    model = TinyLM(
        table, tie_weights=tie_weights, logit_soft_cap=5.0, key=jax.random.key(0)
    )
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    like = TinyLM(
        normal(64, 32, seed=9),
        tie_weights=tie_weights,
        logit_soft_cap=5.0,
        key=jax.random.key(1),
    )
    loaded = eqx.tree_deserialise_leaves(path, like)
    for got, expected in zip(
        jax.tree.leaves(loaded), jax.tree.leaves(model), strict=True
    ):
        np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(jax.vmap(loaded)(TOKENS), jax.vmap(model)(TOKENS))
    tables = 1 if tie_weights else 2
    assert len(table_leaves(loaded, (64, 32))) == tables
    table_bytes = table.size * table.dtype.itemsize
    mix_bytes = (32 * 32 + 32) * 4
    assert tables * table_bytes + mix_bytes <= path.stat().st_size
    assert path.stat().st_size < tables * table_bytes + mix_bytes + 1024
