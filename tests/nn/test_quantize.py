"""Weight-only int8 and int4 tables (`Embedding.quantize`, `quantize_table`) against
keras' `ReversibleEmbedding.quantize` on the same float weights (the same integers
and scales, the same lookup and reverse projection), the fused losses and their
gradients against NumPy in float64 on the dequantized table, the compiled programs
(no float array of the table's size), serialisation and bad input."""

import io
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import keras
import numpy as np
import pytest
from _tolerances import matmul_tolerance, tolerance
from keras.quantizers import Int4QuantizationConfig, Int8QuantizationConfig
from test_cross_entropy import reference

import eqx_embed

VOCAB, WIDTH, TOKENS = 300, 32, 10
# (mode, group_size): keras' int8; int4 in groups of 16 and by default (the whole
# row of 32, narrower than keras' 128: keras pads it with zeros, which changes
# nothing for a row of both signs).
MODES = [("int8", None), ("int4", 16), ("int4", None)]


def float_table(seed=0, vocab=VOCAB):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((vocab, WIDTH)).astype(np.float32)


def keras_quantized(table, mode, group_size, *, reverse_table=None):
    """keras' layer on `table`, weight-only quantized (no activation quantizer)."""
    layer = keras.layers.ReversibleEmbedding(
        *table.shape, tie_weights=reverse_table is None
    )
    layer.build()
    layer.embeddings.assign(table)
    if reverse_table is not None:
        layer.reverse_embeddings.assign(reverse_table.T)
    if mode == "int8":
        config = Int8QuantizationConfig(activation_quantizer=None)
    else:
        config = Int4QuantizationConfig(block_size=group_size or WIDTH)
    layer.quantize(mode, config=config)
    return layer


def dequantized_in_numpy(values, scale, zero):
    """keras' arrays read back in float64: `q / scale` (int8); for int4, nibbles
    unpacked low first, `(q - zero) * scale` per group."""
    values, scale = np.asarray(values), np.asarray(scale, np.float64)
    if zero is None:
        return values / scale[:, None]
    low = (values.astype(np.int16) << 12 >> 12).astype(np.float64)
    high = (values.astype(np.int16) >> 4).astype(np.float64)
    unpacked = np.stack([low, high], axis=-1).reshape(len(values), -1)
    groups = unpacked.reshape(*scale.shape, -1)
    zero = np.asarray(zero, np.float64)[..., None]
    return ((groups - zero) * scale[..., None]).reshape(len(values), -1)


@pytest.mark.parametrize("mode, group_size", MODES)
def test_integers_scales_lookup_and_reverse_match_keras(mode, group_size):
    table = float_table()
    theirs = keras_quantized(table, mode, group_size)
    ours = eqx_embed.ReversibleEmbedding(weight=jnp.asarray(table)).quantize(
        mode, group_size=group_size
    )
    weight = ours.weight
    assert isinstance(weight, eqx_embed.QuantizedTable)
    assert weight.values.dtype == jnp.int8 and weight.scale.dtype == jnp.float32
    np.testing.assert_array_equal(weight.values, theirs._embeddings)
    np.testing.assert_array_equal(weight.scale, theirs.embeddings_scale)
    if mode == "int4":
        np.testing.assert_array_equal(weight.zero, theirs.embeddings_zero)
    else:
        assert weight.zero is None
    ids = np.array([0, 7, 299, 150, 150])
    np.testing.assert_allclose(
        jax.vmap(ours)(jnp.asarray(ids)),
        theirs(ids),
        **tolerance(np.float32, 2),
    )
    hidden = np.random.default_rng(1).standard_normal((4, WIDTH)).astype(np.float32)
    dequantized = dequantized_in_numpy(
        theirs._embeddings,
        theirs.embeddings_scale,
        theirs.embeddings_zero if mode == "int4" else None,
    )
    np.testing.assert_allclose(
        jax.vmap(ours.decode)(jnp.asarray(hidden)),
        theirs(hidden, reverse=True),
        **matmul_tolerance(hidden, dequantized, after=2),
    )


def test_an_untied_decode_table_is_quantized_as_keras_does():
    table, reverse = float_table(0), float_table(1)
    theirs = keras_quantized(table, "int8", None, reverse_table=reverse)
    ours = eqx_embed.ReversibleEmbedding(
        weight=jnp.asarray(table),
        tie_weights=False,
        reverse_weight=jnp.asarray(reverse),
    ).quantize("int8")
    head = ours.reverse_embedding.weight
    np.testing.assert_array_equal(head.values, np.asarray(theirs.reverse_embeddings).T)
    np.testing.assert_array_equal(head.scale, theirs.reverse_embeddings_scale)
    hidden = np.random.default_rng(2).standard_normal((3, WIDTH)).astype(np.float32)
    np.testing.assert_allclose(
        jax.vmap(ours.decode)(jnp.asarray(hidden)),
        theirs(hidden, reverse=True),
        **matmul_tolerance(hidden, reverse, after=2),
    )


@pytest.fixture(scope="module")
def quantized_layers():
    """A tied layer per mode, soft-capped, and its table dequantized in float64."""
    layers = {}
    for mode, group_size in MODES[:2]:
        layer = eqx_embed.ReversibleEmbedding(
            weight=jnp.asarray(float_table(3)), logit_soft_cap=5.0
        ).quantize(mode, group_size=group_size)
        weight = layer.weight
        layers[mode] = (
            layer,
            dequantized_in_numpy(weight.values, weight.scale, weight.zero),
        )
    return layers


def loss_and_gradients(layer, hidden, targets, weights, *, mean):
    """The loss and its gradients with respect to the hidden states and the
    scales: `sum(weights * losses)` per token in blocks of 64, or the weighted mean
    loss."""

    def loss(layer, hidden):
        if mean:
            return layer.mean_cross_entropy(hidden, targets, weights=weights)
        return jnp.sum(weights * layer.cross_entropy(hidden, targets, block_size=64))

    def loss_of_both(both):
        return loss(*both)

    value, (d_layer, d_hidden) = eqx.filter_value_and_grad(loss_of_both)(
        (layer, hidden)
    )
    return value, d_hidden, d_layer.weight.scale


COMPILED = {
    mean: eqx.filter_jit(lambda *args, mean=mean: loss_and_gradients(*args, mean=mean))
    for mean in (False, True)
}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("mean", [False, True])
def test_fused_losses_and_gradients_match_the_dequantized_table(
    quantized_layers, mode, mean
):
    layer, table = quantized_layers[mode]
    rng = np.random.default_rng(4)
    hidden = rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)
    targets = rng.integers(0, VOCAB, TOKENS)
    weights = rng.uniform(0.5, 1.5, TOKENS).astype(np.float32)
    value, d_hidden, d_scale = COMPILED[mean](
        layer, jnp.asarray(hidden), jnp.asarray(targets), jnp.asarray(weights)
    )
    losses, _, d_table, expected_d_hidden = reference(
        table, hidden, targets, cap=5.0, weights=weights
    )
    scale = float(np.max(np.abs(table) @ np.abs(hidden).T))
    tol = tolerance(np.float32, WIDTH + VOCAB + TOKENS + 8, scale=scale)
    np.testing.assert_allclose(value, np.sum(weights * losses), **tol)
    np.testing.assert_allclose(d_hidden, expected_d_hidden, **tol)
    # The rows are `q / s` (int8) or `(q - z) * s` (int4): d/ds of the loss is
    # the row gradient times `-row / s` or `row / s`, summed over each scale's
    # columns.
    d_rows = d_table
    weight = layer.weight
    s = np.asarray(weight.scale, np.float64)
    if mode == "int8":
        expected_d_scale = -np.sum(d_rows * table, axis=1) / s
    else:
        per_group = (d_rows * table).reshape(*s.shape, -1).sum(axis=-1)
        expected_d_scale = per_group / s
    np.testing.assert_allclose(d_scale, expected_d_scale, **tol)


def float_shapes(text):
    """The element counts of every float array in compiled HLO text."""
    shapes = re.findall(r"\b(?:f64|f32|bf16|f16)\[([\d,]+)\]", text)
    return [int(np.prod([int(d) for d in shape.split(",")])) for shape in shapes]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_no_compiled_program_holds_a_float_copy_of_the_table(mode):
    """Over a table of more rows than the decode's and the mean loss's blocks (2048
    rows: one block may be dequantized whole)."""
    vocab = 4500
    layer = eqx_embed.ReversibleEmbedding(
        weight=jnp.asarray(float_table(vocab=vocab))
    ).quantize(mode)
    hidden = jnp.ones((TOKENS, WIDTH))
    targets = jnp.arange(TOKENS)
    weights = jnp.ones(TOKENS)
    arrays, structure = eqx.partition(layer, eqx.is_array)
    programs = dict(
        lookup=lambda m: jax.vmap(m)(targets),
        decode=lambda m: jax.vmap(m.decode)(hidden),
        per_token=lambda m: loss_and_gradients(m, hidden, targets, weights, mean=False),
        mean=lambda m: loss_and_gradients(m, hidden, targets, weights, mean=True),
    )
    for name, function in programs.items():

        def program(arrays, function=function):
            return function(eqx.combine(arrays, structure))

        text = jax.jit(program).lower(arrays).compile().as_text()
        sizes = float_shapes(text)
        assert sizes, name
        assert max(sizes) < vocab * WIDTH, (name, max(sizes))


def test_a_quantized_table_serialises_and_loads_bitwise():
    layer = eqx_embed.ReversibleEmbedding(weight=jnp.asarray(float_table())).quantize(
        "int4", group_size=8
    )
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, layer)
    buffer.seek(0)
    skeleton = eqx_embed.ReversibleEmbedding(weight=jnp.zeros((VOCAB, WIDTH))).quantize(
        "int4", group_size=8
    )
    loaded = eqx.tree_deserialise_leaves(buffer, skeleton)
    for leaf, back in zip(jax.tree.leaves(layer), jax.tree.leaves(loaded), strict=True):
        assert leaf.dtype == back.dtype
        np.testing.assert_array_equal(leaf, back)


def test_the_integers_are_not_trainable_and_a_filter_freezes_the_scales():
    layer = eqx_embed.Embedding(weight=jnp.asarray(float_table())).quantize("int8")
    trainable = jax.tree.leaves(eqx.filter(layer, eqx.is_inexact_array))
    assert [leaf.dtype for leaf in trainable] == [jnp.float32]  # the scales only
    assert jax.tree.leaves(eqx.filter(layer, eqx_embed.unquantized_filter(layer))) == []


def test_bad_modes_group_sizes_and_tables_are_refused():
    embedding = eqx_embed.Embedding(weight=jnp.asarray(float_table()))
    with pytest.raises(
        ValueError, match=r"mode must be one of \('int8', 'int4'\), got 'int2'"
    ):
        embedding.quantize("int2")
    with pytest.raises(
        ValueError,
        match=r"group_size must be a positive divisor of the width \(32\), got 12",
    ):
        embedding.quantize("int4", group_size=12)
    with pytest.raises(ValueError, match="group_size is for mode 'int4' only"):
        embedding.quantize("int8", group_size=16)
    quantized = embedding.quantize("int8")
    with pytest.raises(ValueError, match="pad the vocabulary before quantizing"):
        eqx_embed.pad_vocabulary(quantized, quantized.num_embeddings + 1)
    # A vocabulary that the multiple divides already needs no padding: unchanged.
    assert eqx_embed.pad_vocabulary(quantized, 1) is quantized
    odd = eqx_embed.Embedding(weight=jnp.ones((4, 5)))
    with pytest.raises(ValueError, match="the width must be even, got 5"):
        odd.quantize("int4")
    with pytest.raises(
        ValueError, match="weight must be a float array, got a QuantizedTable"
    ):
        embedding.quantize("int8").quantize("int8")
