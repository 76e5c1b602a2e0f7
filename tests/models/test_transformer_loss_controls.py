"""`TransformerLM.loss` and `mean_loss`: a masked bad id stays in its own position
(values and gradients), a batch of no tokens gives 0 as one of masked tokens, and
the fused losses' controls (label smoothing, ignore_index) equal torch's on the
model's logits."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _tolerances import tolerance

from eqx_embed import TransformerConfig, TransformerLM

VOCAB = 23
CONFIG = TransformerConfig(
    "llama",
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    max_position_embeddings=8,
)


@pytest.fixture(scope="module")
def model():
    return TransformerLM(CONFIG, key=jax.random.key(0))


def finite(tree):
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_a_masked_bad_id_stays_in_its_own_position(model):
    """A bad id (NaN embedding row) read at a masked position: earlier positions
    are untouched (values equal those with a good id there), later ones are NaN;
    after the last kept position it is not read at all (finite gradients)."""
    good = jnp.array([1, 2, 5, 3, 4])
    targets = jnp.array([3, 4, 5, 6, 7])
    middle = jnp.array([True, True, False, True, True])
    last = jnp.array([True, True, False, False, False])

    def total(model, tokens):
        return model.loss(tokens, targets, where=last).sum()

    def mean(model, tokens):
        return model.mean_loss(tokens[None], targets[None], where=last[None])

    @eqx.filter_jit  # one program for both ids
    def run(model, tokens):
        losses = model.loss(tokens, targets, where=middle)
        gradients = [eqx.filter_value_and_grad(f)(model, tokens) for f in (total, mean)]
        return losses, gradients

    losses, gradients = run(model, good.at[2].set(VOCAB + 7))
    want_losses, want_gradients = run(model, good)
    np.testing.assert_array_equal(losses[:3], want_losses[:3])
    assert np.all(np.isnan(losses[3:]))
    assert finite(gradients)
    tol = tolerance(np.float32, 64)
    for got, want in zip(
        jax.tree.leaves(gradients), jax.tree.leaves(want_gradients), strict=True
    ):
        np.testing.assert_allclose(got, want, **tol)


@pytest.mark.parametrize("shape", [(0, 3), (2, 0)])
def test_no_tokens_give_zero_and_no_gradient(model, shape):
    tokens = np.zeros(shape, np.int32)
    value, grads = eqx.filter_value_and_grad(lambda m: m.mean_loss(tokens, tokens))(
        model
    )
    masked = model.mean_loss(
        np.ones((2, 3), np.int32),
        np.ones((2, 3), np.int32),
        where=np.zeros((2, 3), bool),
    )
    assert value == masked == 0
    assert not any(np.any(g) for g in jax.tree.leaves(grads))


def test_label_smoothing_and_ignore_index_equal_torch_on_the_logits(model):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, VOCAB, (2, 6))
    targets = np.roll(tokens, -1, axis=1)
    targets[:, -1] = -100
    targets[1, 2] = -100
    controls = dict(label_smoothing=0.1, ignore_index=-100)

    @eqx.filter_jit
    def run(model):
        per_token = jax.vmap(lambda t, y: model.loss(t, y, **controls))(tokens, targets)
        mean = model.mean_loss(tokens, targets, **controls)
        return per_token, mean, jax.vmap(model)(tokens)

    per_token, mean, logits = run(model)
    logits = torch.tensor(np.asarray(logits, np.float64))
    want = torch.nn.functional.cross_entropy(
        logits.reshape(-1, VOCAB),
        torch.tensor(targets.reshape(-1)),
        reduction="none",
        **controls,
    ).numpy()
    tol = tolerance(np.float32, 64, scale=10.0)
    np.testing.assert_allclose(per_token.reshape(-1), want, **tol)
    np.testing.assert_allclose(mean, want.sum() / np.sum(targets != -100), **tol)


@pytest.mark.parametrize(
    "method",
    [
        lambda m, t, **c: m.loss(t[0], t[0], **c),
        lambda m, t, **c: m.mean_loss(t, t, **c),
    ],
)
@pytest.mark.parametrize(
    "controls, message",
    [
        (dict(label_smoothing=1.5), "label_smoothing must be in"),
        (dict(ignore_index=3), "ignore_index must not be an id"),
        (dict(z_loss=float("inf")), "z_loss must be non-negative and finite"),
    ],
)
def test_bad_controls_are_refused_by_name(model, method, controls, message):
    with pytest.raises(ValueError, match=message):
        method(model, np.ones((1, 3), np.int32), **controls)
