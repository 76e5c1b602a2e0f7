"""The fused losses' controls against torch's `F.cross_entropy` in float64:
`label_smoothing` (a mix with the uniform distribution over the real vocabulary, a
padded table's padding rows excluded) and `ignore_index`, values and both gradients;
the controls' bad values, refused by name before anything compiles; no tokens."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from _tolerances import tolerance

import eqx_embed
from eqx_embed.nn._loss import fused_cross_entropy, fused_weighted_cross_entropy

VOCAB, WIDTH, TOKENS, IGNORE = 13, 8, 11, -100


def inputs(rows):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((rows, WIDTH))
    hidden = 2 * rng.standard_normal((TOKENS, WIDTH))
    targets = rng.integers(0, VOCAB, TOKENS)
    targets[[2, 7]] = IGNORE
    where = np.arange(TOKENS) != 4
    return table, hidden, targets, where


def torch_reference(table, hidden, targets, where, *, smoothing, cap, reduction):
    """torch's loss and its gradients with respect to the vocabulary's rows and the
    hidden states, in float64 (`where` applied as a second ignored id)."""
    rows = torch.tensor(table[:VOCAB], requires_grad=True)
    states = torch.tensor(hidden, requires_grad=True)
    logits = states @ rows.T
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    labels = torch.tensor(np.where(where, targets, IGNORE))
    loss = torch.nn.functional.cross_entropy(
        logits,
        labels,
        label_smoothing=smoothing,
        ignore_index=IGNORE,
        reduction=reduction,
    )
    loss.sum().backward()
    grads = rows.grad.numpy(), states.grad.numpy()
    return loss.detach().numpy(), grads


# A table padded past the vocabulary (its padding rows outside the uniform part and
# with no gradient), a block size and a chunk size that do not divide.
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    "method, cap", [("cross_entropy", None), ("mean_cross_entropy", 3.0)]
)
def test_label_smoothing_and_ignore_index_match_torch(padded, method, cap):
    rows = 16 if padded else VOCAB
    table, hidden, targets, where = inputs(rows)
    with jax.enable_x64(True):
        template = eqx_embed.Embedding(weight=jnp.asarray(table[:VOCAB]))
        if padded:
            template = eqx_embed.pad_vocabulary(template, rows)

        def loss(table, hidden):
            # Padding rows of random values: only their exclusion hides them.
            embedding = eqx.tree_at(lambda e: e.weight, template, table)
            decode = eqx_embed.EmbeddingDecode(embedding, logit_soft_cap=cap)
            controls = dict(where=where, label_smoothing=0.2, ignore_index=IGNORE)
            if method == "cross_entropy":
                losses = decode.cross_entropy(hidden, targets, block_size=5, **controls)
                return losses.sum(), losses
            value = decode.mean_cross_entropy(hidden, targets, chunk_size=4, **controls)
            return value, value

        grad = jax.grad(loss, argnums=(0, 1), has_aux=True)
        (d_table, d_hidden), value = jax.jit(grad)(table, hidden)
        assert value.dtype == jnp.float64
    reduction = "none" if method == "cross_entropy" else "mean"
    want, (want_d_rows, want_d_hidden) = torch_reference(
        table, hidden, targets, where, smoothing=0.2, cap=cap, reduction=reduction
    )
    tol = tolerance(np.float64, VOCAB + WIDTH + 8, scale=10.0)
    np.testing.assert_allclose(value, want, **tol)
    np.testing.assert_allclose(d_table[:VOCAB], want_d_rows, **tol)
    np.testing.assert_allclose(d_hidden, want_d_hidden, **tol)
    assert not np.any(d_table[VOCAB:])


def test_module_free_functions_take_the_controls():
    table, hidden, targets, where = inputs(VOCAB)
    with jax.enable_x64(True):
        settings = dict(dtype=None, logit_soft_cap=None, z_loss=0.0)
        controls = dict(label_smoothing=0.1, ignore_index=IGNORE)
        per_token = fused_cross_entropy(
            jnp.asarray(table),
            jnp.asarray(hidden),
            jnp.asarray(targets),
            where=None,
            block_size=4,
            **settings,
            **controls,
        )
        weights = np.where(targets != IGNORE, 1 / np.sum(targets != IGNORE), 0)
        mean = fused_weighted_cross_entropy(
            jnp.asarray(table),
            jnp.asarray(hidden),
            jnp.asarray(targets),
            jnp.asarray(weights),
            chunk_size=3,
            **settings,
            **controls,
        )
    everywhere = np.ones(TOKENS, bool)
    for value, reduction in ((per_token, "none"), (mean, "mean")):
        want, _ = torch_reference(
            table,
            hidden,
            targets,
            everywhere,
            smoothing=0.1,
            cap=None,
            reduction=reduction,
        )
        np.testing.assert_allclose(value, want, **tolerance(np.float64, VOCAB + WIDTH))


def test_without_the_controls_the_results_are_unchanged():
    """`label_smoothing=0` and an `ignore_index` that no target equals give the
    very results of the call without them (the same program)."""
    table, hidden, targets, _ = inputs(VOCAB)
    targets = np.abs(targets) % VOCAB
    decode = eqx_embed.EmbeddingDecode(
        eqx_embed.Embedding(weight=jnp.asarray(table, jnp.float32))
    )
    hidden = jnp.asarray(hidden, jnp.float32)
    plain = decode.cross_entropy(hidden, targets, block_size=4)
    controlled = decode.cross_entropy(
        hidden, targets, block_size=4, label_smoothing=0.0, ignore_index=IGNORE
    )
    np.testing.assert_array_equal(plain, controlled)


# Values out of range are a ValueError naming the argument; values of the wrong type
# are refused by the signature's annotations (jaxtyping), also naming it.
@pytest.mark.parametrize(
    "controls, error, message",
    [
        (
            dict(label_smoothing=1.0),
            ValueError,
            r"label_smoothing must be in \[0, 1\), got 1.0",
        ),
        (dict(label_smoothing=-0.1), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing=float("nan")), ValueError, "label_smoothing must be in"),
        (dict(label_smoothing=True), jaxtyping.TypeCheckError, "label_smoothing"),
        (
            dict(z_loss=float("inf")),
            ValueError,
            "z_loss must be non-negative and finite, got inf",
        ),
        (
            dict(ignore_index=0),
            ValueError,
            r"ignore_index must not be an id of .*\[0, 13\)",
        ),
        (dict(ignore_index=12), ValueError, "ignore_index must not be an id"),
        (dict(ignore_index=1.5), jaxtyping.TypeCheckError, "ignore_index"),
    ],
)
@pytest.mark.parametrize("method", ["cross_entropy", "mean_cross_entropy"])
def test_bad_controls_are_refused_by_name_before_compiling(
    controls, error, message, method
):
    table, hidden, targets, _ = inputs(VOCAB)
    module = eqx_embed.ReversibleEmbedding(
        weight=jnp.asarray(table, jnp.float32), tie_weights=True
    )
    call = eqx.filter_jit(lambda m, h, t: getattr(m, method)(h, t, **controls))
    with pytest.raises(error, match=message):
        call(module, jnp.asarray(hidden, jnp.float32), jnp.abs(jnp.asarray(targets)))


@pytest.mark.parametrize(
    "build",
    [
        lambda e: eqx_embed.EmbeddingDecode(e, logit_soft_cap=1e39),
        lambda e: eqx_embed.ReversibleEmbedding(
            weight=e.weight, tie_weights=True, logit_soft_cap=1e39
        ),
        lambda e: fused_cross_entropy(
            e.weight,
            jnp.ones((2, 4)),
            jnp.zeros(2, int),
            where=None,
            z_loss=0.0,
            dtype=None,
            logit_soft_cap=1e39,
            block_size=None,
        ),
        lambda e: fused_cross_entropy(
            e.weight,
            jnp.ones((2, 4)),
            jnp.zeros(2, int),
            where=None,
            z_loss=float("inf"),
            dtype=None,
            logit_soft_cap=None,
            block_size=None,
        ),
    ],
)
def test_a_soft_cap_infinite_in_float32_or_an_infinite_z_loss_is_refused(build):
    embedding = eqx_embed.Embedding(5, 4, key=jax.random.key(0))
    with pytest.raises(
        ValueError, match="(logit_soft_cap must be finite in float32|z_loss)"
    ):
        build(embedding)


def test_no_tokens_give_zero_and_no_gradient_as_no_kept_tokens():
    table, hidden, targets, _ = inputs(VOCAB)
    table = jnp.asarray(table, jnp.float32)

    def mean(table, hidden, targets, where=None):
        decode = eqx_embed.EmbeddingDecode(eqx_embed.Embedding(weight=table))
        return decode.mean_cross_entropy(hidden, targets, where=where)

    grad = jax.value_and_grad(mean, argnums=(0, 1))
    none, (d_table, d_hidden) = grad(table, jnp.zeros((0, WIDTH)), jnp.zeros(0, int))
    masked, (masked_d_table, _) = grad(
        table,
        jnp.asarray(hidden, jnp.float32),
        np.abs(targets),
        np.zeros(TOKENS, bool),
    )
    assert none == masked == 0
    assert d_hidden.shape == (0, WIDTH)
    np.testing.assert_array_equal(d_table, np.zeros_like(table))
    np.testing.assert_array_equal(masked_d_table, np.zeros_like(table))
