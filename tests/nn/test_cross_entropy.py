"""The fused decode cross-entropy against the plain loss, computed in NumPy float64
from the logits (and its gradients from the softmax formula, not from autodiff)."""

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import eqx_embed

WIDTH = 8
TOKENS = 12
BLOCK = 16


def reference(table, hidden, targets, *, where=None, z_loss=0.0, cap=None, weights):
    """Per-token losses, log-sum-exps, and the gradients of `sum(weights * losses)`
    with respect to the table and the hidden states, in float64."""
    table = np.asarray(table, np.float64)
    hidden = np.asarray(hidden, np.float64)
    targets = np.asarray(targets)
    raw = hidden @ table.T
    logits = raw if cap is None else cap * np.tanh(raw / cap)
    top = logits.max(axis=1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]
    picked = logits[np.arange(len(targets)), targets]
    losses = lse - picked + z_loss * lse**2
    mask = np.ones(len(targets)) if where is None else np.asarray(where, np.float64)
    losses = losses * mask
    coefficient = np.asarray(weights, np.float64) * mask
    softmax = np.exp(logits - lse[:, None])
    one_hot = np.eye(table.shape[0])[targets]
    d_logits = coefficient[:, None] * (
        softmax * (1 + 2 * z_loss * lse[:, None]) - one_hot
    )
    if cap is not None:
        d_logits = d_logits * (1 - np.tanh(raw / cap) ** 2)
    return losses, lse, d_logits.T @ hidden, d_logits @ table


def make_inputs(vocab, *, tokens=TOKENS, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    table = jax.random.normal(keys[0], (vocab, WIDTH), dtype)
    hidden = 2 * jax.random.normal(keys[1], (tokens, WIDTH), dtype)
    targets = jax.random.randint(keys[2], (tokens,), 0, vocab)
    weights = jax.random.uniform(keys[3], (tokens,), minval=0.5, maxval=1.5)
    return table, hidden, targets, weights


def decoder(table, **kwargs):
    return eqx_embed.EmbeddingDecode(eqx_embed.Embedding(weight=table), **kwargs)


def fused_loss_and_grads(table, hidden, targets, weights, *, cap, dtype=None, **kwargs):
    """The fused losses and the gradients of `sum(weights * losses)`, jitted."""

    @eqx.filter_jit
    def run(table, hidden):
        def total(table, hidden):
            module = decoder(table, logit_soft_cap=cap, dtype=dtype)
            losses = module.cross_entropy(hidden, targets, **kwargs)
            return jnp.sum(weights * losses), losses

        grads, losses = jax.grad(total, argnums=(0, 1), has_aux=True)(table, hidden)
        return losses, grads

    return run(table, hidden)


def assert_close(actual, expected, *, tol=2e-5):
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=tol, atol=tol
    )


# Vocabularies smaller than, equal to and larger than the block, multiples of it and
# primes (where the last block overlaps the one before).
@pytest.mark.parametrize("vocab", [1, 2, 7, 16, 31, 32, 97])
@pytest.mark.parametrize("cap", [None, 3.0])
def test_losses_and_both_gradients_match_float64(vocab, cap):
    table, hidden, targets, weights = make_inputs(vocab)
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, hidden, targets, weights, cap=cap, block_size=BLOCK
    )
    expected, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, cap=cap, weights=weights
    )
    assert losses.dtype == jnp.float32
    assert_close(losses, expected)
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)


@settings(max_examples=8)
@given(
    vocab=st.integers(1, 70),
    block_size=st.integers(1, 80),
    tokens=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_any_vocabulary_and_block_size(vocab, block_size, tokens, seed):
    table, hidden, targets, weights = make_inputs(vocab, tokens=tokens, seed=seed)
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, hidden, targets, weights, cap=None, block_size=block_size
    )
    expected, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, weights=weights
    )
    assert_close(losses, expected)
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)


@pytest.mark.parametrize("cap", [None, 5.0])
def test_z_loss_and_mask(cap):
    table, hidden, targets, weights = make_inputs(37)
    where = jnp.arange(TOKENS) % 3 != 0
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, hidden, targets, weights, cap=cap, where=where, z_loss=1e-2, block_size=8
    )
    expected, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, where=where, z_loss=1e-2, cap=cap, weights=weights
    )
    assert_close(losses, expected)
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)
    assert np.all(np.asarray(losses)[~np.asarray(where)] == 0)
    assert np.all(np.asarray(d_hidden)[~np.asarray(where)] == 0)


@pytest.mark.parametrize("cap", [None, 2.0])
def test_log_sum_exp_and_its_gradients(cap):
    table, hidden, _, weights = make_inputs(29)
    module = decoder(table, logit_soft_cap=cap)
    lse = eqx.filter_jit(lambda m, h: m.log_sum_exp(h, block_size=8))(module, hidden)
    _, expected, _, _ = reference(table, hidden, np.zeros(TOKENS, int), weights=weights)
    if cap is None:
        assert_close(lse, expected)
    # d sum(c * lse) / d logits = c * softmax: the cross-entropy's gradient plus the
    # one-hot part, which is what an all-zero-weight target term leaves out.
    table64, hidden64 = np.asarray(table, np.float64), np.asarray(hidden, np.float64)
    raw = hidden64 @ table64.T
    logits = raw if cap is None else cap * np.tanh(raw / cap)
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    assert_close(lse, np.log(np.exp(logits).sum(1)))
    d_logits = np.asarray(weights)[:, None] * softmax
    if cap is not None:
        d_logits = d_logits * (1 - np.tanh(raw / cap) ** 2)
    d_table, d_hidden = jax.grad(
        lambda t, h: jnp.sum(
            weights * decoder(t, logit_soft_cap=cap).log_sum_exp(h, block_size=8)
        ),
        argnums=(0, 1),
    )(table, hidden)
    assert_close(d_table, d_logits.T @ hidden64)
    assert_close(d_hidden, d_logits @ table64)


def test_matches_optax_and_the_plain_decode():
    table, hidden, targets, _ = make_inputs(50)
    module = decoder(table, logit_soft_cap=4.0)
    logits = jax.vmap(module)(hidden)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    assert_close(module.cross_entropy(hidden, targets, block_size=16), expected)
    assert_close(
        module.log_sum_exp(hidden), jax.nn.logsumexp(logits, axis=-1), tol=2e-5
    )


@pytest.mark.parametrize("table_dtype", [jnp.bfloat16, jnp.float32])
def test_bfloat16_accumulates_in_float32(table_dtype):
    table, hidden, targets, weights = make_inputs(45)
    table = table.astype(table_dtype)
    hidden = hidden.astype(jnp.bfloat16)
    module = decoder(table, dtype=jnp.bfloat16)
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, hidden, targets, weights, cap=None, dtype=jnp.bfloat16, block_size=16
    )
    # The reference sees the same bfloat16 values, so only the accumulation and the
    # bfloat16 rounding of the softmax gradient are left.
    table_bf16 = np.asarray(table.astype(jnp.bfloat16), np.float64)
    expected, _, expected_d_table, expected_d_hidden = reference(
        table_bf16, hidden, targets, weights=weights
    )
    assert losses.dtype == jnp.float32
    assert d_table.dtype == table_dtype and d_hidden.dtype == jnp.bfloat16
    # Float32 accumulation: the losses are as exact as float32 allows, far better
    # than the bfloat16 logits of the plain decode.
    assert_close(losses, expected, tol=1e-4)
    plain = optax.softmax_cross_entropy_with_integer_labels(
        jax.vmap(module)(hidden).astype(jnp.float32), targets
    )
    assert np.max(np.abs(np.asarray(plain) - expected)) > np.max(
        np.abs(np.asarray(losses) - expected)
    )
    scale = np.max(np.abs(expected_d_table))
    np.testing.assert_allclose(
        np.asarray(d_table, np.float64), expected_d_table, atol=2e-2 * scale
    )
    scale = np.max(np.abs(expected_d_hidden))
    np.testing.assert_allclose(
        np.asarray(d_hidden, np.float64), expected_d_hidden, atol=2e-2 * scale
    )


@pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cap", [None, 5.0])
def test_masked_rows_with_non_finite_hidden_states_contribute_nothing(poison, cap):
    """A NaN or an infinity in a row that `where` masks out reaches neither the loss
    nor any gradient: the reference sees finite values in those rows, which the mask
    discards."""
    table, hidden, targets, weights = make_inputs(37)
    where = jnp.arange(TOKENS) % 3 != 0
    poisoned = jnp.where(where[:, None], hidden, poison)
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, poisoned, targets, weights, cap=cap, where=where, block_size=8
    )
    expected, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, where=where, cap=cap, weights=weights
    )
    assert_close(losses, expected)
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)


@pytest.mark.parametrize("poison", [None, np.nan, np.inf])
def test_vmap_over_sequences(poison):
    """With `poison`, the masked-out hidden states are NaN or infinite: they must
    reach neither the losses nor the gradients (the reference sees finite ones)."""
    table, _, _, _ = make_inputs(23)
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (3, 5, WIDTH))
    targets = jax.random.randint(keys[1], (3, 5), 0, 23)
    where = jax.random.bernoulli(keys[2], 0.7, (3, 5))
    assert not where.all()
    poisoned = hidden if poison is None else jnp.where(where[..., None], hidden, poison)
    weights = jnp.linspace(0.5, 2.0, 15).reshape(3, 5)

    @eqx.filter_jit
    def run(module, hidden):
        def total(pair):
            module, hidden = pair
            losses = jax.vmap(
                lambda h, t, w: module.cross_entropy(h, t, where=w, block_size=8)
            )(hidden, targets, where)
            return jnp.sum(weights * losses), losses

        return eqx.filter_grad(total, has_aux=True)((module, hidden))

    (d_module, d_hidden), losses = run(decoder(table), poisoned)
    expected, _, expected_d_table, expected_d_hidden = reference(
        table,
        hidden.reshape(15, WIDTH),
        targets.reshape(15),
        where=where.reshape(15),
        weights=weights.reshape(15),
    )
    assert_close(losses.reshape(15), expected)
    assert_close(d_module.weight, expected_d_table)
    assert_close(d_hidden.reshape(15, WIDTH), expected_d_hidden)


def test_vmap_over_two_axes_folds_into_one_table_gradient():
    table, _, _, _ = make_inputs(29)
    keys = jax.random.split(jax.random.key(5), 2)
    hidden = jax.random.normal(keys[0], (2, 3, 4, WIDTH))
    targets = jax.random.randint(keys[1], (2, 3, 4), 0, 29)
    weights = jnp.linspace(-1.0, 2.0, 24).reshape(2, 3, 4)

    def total(module, hidden):
        losses = jax.vmap(
            jax.vmap(lambda h, t: module.cross_entropy(h, t, block_size=8))
        )(hidden, targets)
        return jnp.sum(weights * losses)

    grad = eqx.filter_jit(eqx.filter_grad(lambda pair: total(*pair)))
    d_module, d_hidden = grad((decoder(table), hidden))
    _, _, expected_d_table, expected_d_hidden = reference(
        table,
        hidden.reshape(24, WIDTH),
        targets.reshape(24),
        weights=weights.reshape(24),
    )
    assert_close(d_module.weight, expected_d_table)
    assert_close(d_hidden.reshape(24, WIDTH), expected_d_hidden)
    # The backward pass runs once over all 24 tokens: no per-example table gradient.
    jaxpr = str(jax.make_jaxpr(jax.grad(total))(decoder(table), hidden))
    assert f"f32[2,3,{table.shape[0]},{WIDTH}]" not in jaxpr
    assert f"f32[3,{table.shape[0]},{WIDTH}]" not in jaxpr


def test_vmap_over_an_ensemble_of_tables():
    tables = jnp.stack([make_inputs(19, seed=seed)[0] for seed in range(3)])
    keys = jax.random.split(jax.random.key(6), 2)
    hidden = jax.random.normal(keys[0], (3, 6, WIDTH))
    targets = jax.random.randint(keys[1], (3, 6), 0, 19)
    weights = jnp.linspace(0.5, 1.5, 18).reshape(3, 6)

    def total(tables, hidden):
        losses = jax.vmap(
            lambda table, h, t: decoder(table).cross_entropy(h, t, block_size=8)
        )(tables, hidden, targets)
        return jnp.sum(weights * losses)

    d_tables, d_hidden = jax.jit(jax.grad(total, argnums=(0, 1)))(tables, hidden)
    for member in range(3):
        _, _, expected_d_table, expected_d_hidden = reference(
            tables[member], hidden[member], targets[member], weights=weights[member]
        )
        assert_close(d_tables[member], expected_d_table)
        assert_close(d_hidden[member], expected_d_hidden)


def test_tied_training_matches_the_plain_loss():
    vocab, steps = 41, 4
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    model = eqx_embed.ReversibleEmbedding(
        vocab, WIDTH, logit_soft_cap=6.0, init=init, key=jax.random.key(3)
    )
    keys = jax.random.split(jax.random.key(4), 2)
    inputs = jax.random.randint(keys[0], (32,), 0, vocab)
    targets = jax.random.randint(keys[1], (32,), 0, vocab)
    where = jnp.arange(32) < 27

    def fused(model):
        hidden = jnp.tanh(jax.vmap(model)(inputs))
        losses = model.cross_entropy(hidden, targets, where=where, z_loss=1e-3)
        return losses.sum() / where.sum()

    def plain(model):
        hidden = jnp.tanh(jax.vmap(model)(inputs))
        logits = jax.vmap(model.decode)(hidden)
        lse = jax.nn.logsumexp(logits, axis=-1)
        losses = lse - jnp.take_along_axis(logits, targets[:, None], 1)[:, 0]
        losses = jnp.where(where, losses + 1e-3 * lse**2, 0)
        return losses.sum() / where.sum()

    def train(loss):
        optimiser = optax.adam(3e-2)
        params = model
        state = optimiser.init(eqx.filter(params, eqx.is_inexact_array))

        @eqx.filter_jit
        def step(params, state):
            value, grads = eqx.filter_value_and_grad(loss)(params)
            updates, state = optimiser.update(grads, state)
            return eqx.apply_updates(params, updates), state, value

        values = []
        for _ in range(steps):
            params, state, value = step(params, state)
            values.append(value)
        return params, np.array(values)

    fused_model, fused_values = train(fused)
    plain_model, plain_values = train(plain)
    assert fused_model.tie_weights and fused_model.reverse_embedding is None
    np.testing.assert_allclose(fused_values, plain_values, rtol=1e-5)
    assert fused_values[-1] < fused_values[0]
    moved = np.abs(np.asarray(fused_model.embedding.weight - model.embedding.weight))
    assert moved.max() > 1e-2
    np.testing.assert_allclose(
        fused_model.embedding.weight, plain_model.embedding.weight, atol=1e-5
    )


def test_untied_reversible_embedding_uses_its_reverse_table():
    model = eqx_embed.ReversibleEmbedding(
        19, WIDTH, tie_weights=False, key=jax.random.key(5)
    )
    _, hidden, targets, weights = make_inputs(19)
    losses = model.cross_entropy(hidden, targets, block_size=4)
    expected, *_ = reference(
        model.reverse_embedding.weight, hidden, targets, weights=weights
    )
    assert_close(losses, expected)
    assert_close(
        model.log_sum_exp(hidden),
        reference(model.reverse_embedding.weight, hidden, targets, weights=weights)[1],
    )


# Bad targets.


def test_out_of_range_target_gives_nan_loss_for_that_token_only():
    table, hidden, targets, weights = make_inputs(11)
    bad = np.isin(np.arange(TOKENS), [2, 5])
    bad_targets = targets.at[2].set(11).at[5].set(-100)
    # The bad tokens get a zero cotangent, so the others' gradients must be exact.
    weights = jnp.where(bad, 0.0, weights)
    losses, (d_table, d_hidden) = fused_loss_and_grads(
        table, hidden, bad_targets, weights, cap=None
    )
    expected, _, expected_d_table, expected_d_hidden = reference(
        table, hidden, targets, weights=weights
    )
    assert np.all(np.isnan(np.asarray(losses)[bad]))
    assert_close(np.asarray(losses)[~bad], expected[~bad])
    assert_close(d_table, expected_d_table)
    assert_close(d_hidden, expected_d_hidden)


def test_masked_out_bad_target_is_ignored():
    table, hidden, targets, weights = make_inputs(11)
    bad_targets = targets.at[2].set(11).at[5].set(-100)
    where = ~np.isin(np.arange(TOKENS), [2, 5])
    for policy in ["nan", "error"]:
        module = eqx_embed.EmbeddingDecode(
            eqx_embed.Embedding(weight=table, out_of_range=policy)
        )

        @eqx.filter_jit
        def run(module, hidden):
            def total(module, hidden):
                losses = module.cross_entropy(hidden, bad_targets, where=where)
                return jnp.sum(weights * losses), losses

            return eqx.filter_grad(total, has_aux=True)(module, hidden)

        grads, losses = run(module, hidden)
        expected, _, expected_d_table, _ = reference(
            table, hidden, targets, where=where, weights=weights
        )
        assert_close(losses, expected)
        assert_close(grads.weight, expected_d_table)
        eager = module.cross_entropy(hidden, bad_targets, where=where)
        assert_close(eager, expected)


@pytest.mark.parametrize("bad", [11, -1, -100])
def test_error_policy_raises_eagerly_under_jit_and_vmap(bad):
    table, hidden, targets, _ = make_inputs(11)
    module = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=table, out_of_range="error")
    )
    targets = targets.at[3].set(bad)
    message = rf"target {bad} is out of range for a table of 11 rows"
    with pytest.raises(ValueError, match=message):
        module.cross_entropy(hidden, targets)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(
            eqx.filter_jit(lambda m, h, t: m.cross_entropy(h, t))(
                module, hidden, targets
            )
        )
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(
            jax.vmap(lambda h, t: module.cross_entropy(h, t))(
                jnp.stack([hidden, hidden]), jnp.stack([targets, targets])
            )
        )


def test_error_policy_passes_valid_targets_under_jit():
    table, hidden, targets, weights = make_inputs(11)
    module = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=table, out_of_range="error")
    )
    losses = eqx.filter_jit(lambda m, h: m.cross_entropy(h, targets))(module, hidden)
    assert_close(losses, reference(table, hidden, targets, weights=weights)[0])


# Bad shapes and arguments.


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda m, h, t: m.cross_entropy(h[:, :5], t), ValueError, "hidden must have"),
        (lambda m, h, t: m.log_sum_exp(h[:, :5]), ValueError, "hidden must have"),
        (lambda m, h, t: m.cross_entropy(h, t[:5]), jaxtyping.TypeCheckError, "tokens"),
        (lambda m, h, t: m.cross_entropy(h[0], t), jaxtyping.TypeCheckError, "hidden"),
        (
            lambda m, h, t: m.cross_entropy(h, t, where=jnp.ones(3, bool)),
            jaxtyping.TypeCheckError,
            "where",
        ),
        (
            lambda m, h, t: m.cross_entropy(h, t.astype(float)),
            jaxtyping.TypeCheckError,
            "targets",
        ),
        (
            lambda m, h, t: m.cross_entropy(h, t, block_size=0),
            ValueError,
            "block_size must be a positive integer, got 0",
        ),
        (
            lambda m, h, t: m.log_sum_exp(h, block_size=-4),
            ValueError,
            "block_size must be a positive integer, got -4",
        ),
        (
            lambda m, h, t: m.cross_entropy(h, t, z_loss=-1.0),
            ValueError,
            "z_loss must be non-negative",
        ),
    ],
)
@pytest.mark.parametrize("transform", ["eager", "filter_jit", "vmap"])
def test_bad_input_names_the_argument(call, error, message, transform):
    table, hidden, targets, _ = make_inputs(11)
    module = decoder(table)
    if transform == "eager":
        fn = call
    elif transform == "filter_jit":
        fn = eqx.filter_jit(call)
    else:
        hidden, targets = jnp.stack([hidden, hidden]), jnp.stack([targets, targets])
        fn = jax.vmap(call, in_axes=(None, 0, 0))
    with pytest.raises(error, match=message):
        fn(module, hidden, targets)


def test_reversible_embedding_methods_check_shapes_too():
    model = eqx_embed.ReversibleEmbedding(11, WIDTH, key=jax.random.key(0))
    _, hidden, targets, _ = make_inputs(11)
    with pytest.raises(ValueError, match="hidden must have"):
        model.cross_entropy(hidden[:, :3], targets)
    with pytest.raises(jaxtyping.TypeCheckError):
        model.cross_entropy(hidden, targets[:4])
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        model.log_sum_exp(hidden, block_size=0)
