"""`Embedding` against NumPy in float64, `equinox.nn.Embedding`, `flax.linen.Embed`,
`flax.nnx.Embed`, keras and PyTorch, on the same weights."""

import re

import equinox as eqx
import flax.linen
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import keras
import numpy as np
import pytest
import torch
from _tolerances import matmul_tolerance, tolerance
from flax import nnx
from hypothesis import given

import eqx_embed

LOW_PRECISION = [jnp.bfloat16, jnp.float16]


def reference_rows(table, ids, *, padding_idx=None):
    """`table[ids]` in float64: ids in [-n, 0) count from the end, others are NaN."""
    table = np.asarray(table, dtype=np.float64)
    ids = np.asarray(ids)
    n = table.shape[0]
    valid = (ids >= -n) & (ids < n)
    rows = table[np.where(valid, ids, 0)]
    rows[~valid] = np.nan
    if padding_idx is not None:
        rows[valid & (ids % n == padding_idx % n)] = 0
    return rows


def batched(fn, axes):
    """`fn` vmapped over `axes` leading axes."""
    for _ in range(axes):
        fn = jax.vmap(fn)
    return fn


def lookup(embedding, ids):
    """The documented way to look up many ids: vmap over every axis, under jit."""
    return eqx.filter_jit(lambda e, i: batched(e, i.ndim)(i))(embedding, ids)


def random_table(n, e, *, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, e)), dtype=dtype)


@st.composite
def tables_and_ids(draw, *, max_axes=3, min_rows=1):
    """A table and ids of 0 to `max_axes` batch axes, some out of range either way."""
    n = draw(st.integers(min_rows, 12))
    e = draw(st.integers(1, 6))
    shape = draw(hnp.array_shapes(min_dims=0, max_dims=max_axes, max_side=3))
    ids = draw(hnp.arrays(np.int32, shape, elements=st.integers(-n - 3, n + 2)))
    return random_table(n, e, seed=draw(st.integers(0, 2**16))), ids


# Construction


def test_same_key_gives_equinox_table():
    key = jax.random.key(3)
    ours = eqx_embed.Embedding(40, 7, key=key)
    theirs = eqx.nn.Embedding(40, 7, key=key)
    np.testing.assert_array_equal(ours.weight, theirs.weight)
    assert ours.num_embeddings == theirs.num_embeddings == 40
    assert ours.embedding_size == theirs.embedding_size == 7


@given(tables_and_ids(max_axes=1))
def test_rows_match_equinox(table_and_ids):
    table, ids = table_and_ids
    n = table.shape[0]
    ids = ids[(ids >= -n) & (ids < n)]  # equinox clamps the rest
    theirs = eqx.nn.Embedding(weight=table)
    expected = jax.vmap(theirs)(jnp.asarray(ids))
    np.testing.assert_array_equal(
        lookup(eqx_embed.Embedding(weight=table), ids), expected
    )


def test_init_is_called_with_key_shape_and_param_dtype():
    key = jax.random.key(5)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    embedding = eqx_embed.Embedding(30, 8, init=init, param_dtype=jnp.bfloat16, key=key)
    np.testing.assert_array_equal(embedding.weight, init(key, (30, 8), jnp.bfloat16))
    assert embedding.weight.dtype == jnp.bfloat16


def test_default_init_is_standard_normal():
    weight = eqx_embed.Embedding(512, 64, key=jax.random.key(0)).weight
    assert weight.dtype == jnp.float32
    assert abs(float(weight.mean())) < 0.02
    assert abs(float(weight.std()) - 1.0) < 0.02


def test_new_table_starts_with_padding_row_zeroed():
    embedding = eqx_embed.Embedding(6, 4, padding_idx=-2, key=jax.random.key(0))
    assert embedding.padding_idx == 4
    np.testing.assert_array_equal(embedding.weight[4], np.zeros(4))
    assert np.all(np.asarray(embedding.weight[:4]) != 0)


KEY = jax.random.key(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_embeddings=4, embedding_size=3), r"either `weight=...`.*key=None"),
        (
            dict(num_embeddings=0, embedding_size=3, key=KEY),
            r"num_embeddings must be a positive integer, got 0",
        ),
        (
            dict(num_embeddings=4, embedding_size=-1, key=KEY),
            r"embedding_size must be a positive integer, got -1",
        ),
        # Caught by the annotation when jaxtyping's import hook instruments the package
        # (as in this test suite), by the ValueError on a default install.
        (dict(weight=jnp.ones(4)), r"(?s)weight.*(got shape \(4,\)|f32\[4\])"),
        (
            dict(weight=jnp.ones((4, 3)), num_embeddings=5),
            r"weight has shape \(4, 3\) but num_embeddings=5",
        ),
        (
            dict(num_embeddings=4, embedding_size=3, padding_idx=4, key=KEY),
            r"padding_idx must be in \[-4, 4\), got 4",
        ),
        (
            dict(weight=jnp.ones((4, 3)), out_of_range="clip"),
            r"(?s)out_of_range.*(got 'clip'|Literal\['nan', 'error'\])",
        ),
        (
            dict(
                num_embeddings=4,
                embedding_size=3,
                init=lambda key, shape, dtype: jnp.ones((2, 3), dtype),
                key=KEY,
            ),
            r"init returned shape \(2, 3\), expected \(4, 3\)",
        ),
    ],
)
def test_bad_construction_names_the_argument(kwargs, message):
    with pytest.raises((ValueError, jaxtyping.TypeCheckError), match=message):
        eqx_embed.Embedding(**kwargs)


# Lookup: values, batching, policy


@given(tables_and_ids())
def test_lookup_over_zero_to_three_batch_axes(table_and_ids):
    table, ids = table_and_ids
    got = lookup(eqx_embed.Embedding(weight=table), ids)
    assert got.shape == (*ids.shape, table.shape[1])
    np.testing.assert_array_equal(got, reference_rows(table, ids).astype(np.float32))


@given(tables_and_ids(), st.data())
def test_padding_row_reads_zeros(table_and_ids, data):
    table, ids = table_and_ids
    n = table.shape[0]
    padding_idx = data.draw(st.integers(-n, n - 1))
    # The given table's padding row is not zero: the lookup still returns zeros.
    embedding = eqx_embed.Embedding(weight=table, padding_idx=padding_idx)
    expected = reference_rows(table, ids, padding_idx=padding_idx)
    np.testing.assert_array_equal(lookup(embedding, ids), expected.astype(np.float32))


def test_python_and_numpy_scalar_tokens():
    table = random_table(5, 3)
    embedding = eqx_embed.Embedding(weight=table)
    np.testing.assert_array_equal(embedding(2), table[2])
    np.testing.assert_array_equal(embedding(np.int64(-1)), table[4])
    np.testing.assert_array_equal(embedding(jnp.uint8(3)), table[3])


def test_nan_policy_under_jit_needs_no_host_callback():
    embedding = eqx_embed.Embedding(weight=random_table(5, 3))
    ids = jnp.array([0, 5, -6, 2**30, -(2**30), -5])
    fn = eqx.filter_jit(lambda e, i: jax.vmap(e)(i))
    np.testing.assert_array_equal(
        fn(embedding, ids), reference_rows(embedding.weight, ids)
    )
    assert "callback" not in jax.jit(jax.vmap(embedding)).lower(ids).as_text()


ERROR_MESSAGE = r"token id {id} is out of range for a table of 5 rows"


@pytest.mark.parametrize("bad", [5, -6, 1000])
def test_error_policy_raises_at_once_for_concrete_ids(bad):
    embedding = eqx_embed.Embedding(weight=random_table(5, 3), out_of_range="error")
    with pytest.raises(ValueError, match=ERROR_MESSAGE.format(id=bad)):
        embedding(bad)
    with pytest.raises(ValueError, match=ERROR_MESSAGE.format(id=bad)):
        embedding(jnp.asarray(bad))


@pytest.mark.parametrize("axes", [1, 2, 3])
def test_error_policy_raises_under_jit_and_vmap(axes):
    embedding = eqx_embed.Embedding(weight=random_table(5, 3), out_of_range="error")
    ids = np.zeros((2,) * axes, dtype=np.int32)
    ids[(1,) * axes] = 7
    fn = eqx.filter_jit(lambda e, i: batched(e, axes)(i))
    with pytest.raises(eqx.EquinoxRuntimeError, match=ERROR_MESSAGE.format(id=7)):
        jax.block_until_ready(fn(embedding, jnp.asarray(ids)))
    # Under vmap without jit too.
    with pytest.raises(eqx.EquinoxRuntimeError, match=ERROR_MESSAGE.format(id=7)):
        jax.block_until_ready(batched(embedding, axes)(jnp.asarray(ids)))


def test_error_policy_passes_valid_ids_through_under_jit():
    table = random_table(5, 3)
    embedding = eqx_embed.Embedding(weight=table, out_of_range="error")
    ids = jnp.array([[0, -5], [4, -1]])
    np.testing.assert_array_equal(lookup(embedding, ids), reference_rows(table, ids))


def test_error_policy_names_the_largest_bad_id_of_the_whole_batch():
    """Traced ids are checked in the compiled program, which reports one bad id."""
    embedding = eqx_embed.Embedding(weight=random_table(5, 3), out_of_range="error")
    ids = np.array([[1, -6], [2, 9]])
    fn = eqx.filter_jit(lambda e, i: jax.vmap(jax.vmap(e))(i))
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"token id 9 is out of range"):
        jax.block_until_ready(fn(embedding, jnp.asarray(ids)))


# Peers: flax, keras, PyTorch


# flax broadcasts a one-row table to every id; the one-row test covers that case.
@given(tables_and_ids(min_rows=2))
def test_lookup_matches_flax_linen_embed(table_and_ids):
    table, ids = table_and_ids
    n, e = table.shape
    flax_embed = flax.linen.Embed(n, e)
    expected = flax_embed.apply({"params": {"embedding": table}}, jnp.asarray(ids))
    # Negative ids from the end, NaN for out-of-range, both ways.
    np.testing.assert_array_equal(
        lookup(eqx_embed.Embedding(weight=table), ids), expected
    )


def test_lookup_and_attend_match_flax_nnx_embed():
    table = random_table(9, 4)
    flax_embed = nnx.Embed(9, 4, rngs=nnx.Rngs(0))
    flax_embed.embedding[...] = table
    ours = eqx_embed.Embedding(weight=table)
    ids = jnp.array([[0, 8, -9, 9], [-10, 3, -1, 100]])
    np.testing.assert_array_equal(lookup(ours, ids), flax_embed(ids))
    queries = random_table(3, 4, seed=1)
    np.testing.assert_allclose(
        jax.vmap(ours.attend)(queries),
        flax_embed.attend(queries),
        **matmul_tolerance(queries, table),
    )


@given(tables_and_ids(max_axes=1))
def test_attend_matches_flax_and_float64(table_and_ids):
    table, _ = table_and_ids
    n, e = table.shape
    queries = random_table(4, e, seed=n)
    ours = jax.vmap(eqx_embed.Embedding(weight=table).attend)(queries)
    theirs = flax.linen.Embed(n, e).apply(
        {"params": {"embedding": table}}, queries, method="attend"
    )
    reference = np.asarray(queries, np.float64) @ np.asarray(table, np.float64).T
    close = matmul_tolerance(queries, table)
    np.testing.assert_allclose(ours, theirs, **close)
    np.testing.assert_allclose(ours, reference, **close)


def test_one_row_table_matches_flax_and_needs_no_gather():
    table = random_table(1, 5)
    ours = eqx_embed.Embedding(weight=table)
    flax_embed = flax.linen.Embed(1, 5)
    ids = jnp.array([[0, -1], [0, 0]])
    expected = flax_embed.apply({"params": {"embedding": table}}, ids)
    np.testing.assert_array_equal(lookup(ours, ids), expected)
    # flax returns its one row for any id; ours never reads a row for a bad one.
    bad = jnp.array([1, -2, 7])
    np.testing.assert_array_equal(lookup(ours, bad), np.full((3, 5), np.nan))
    assert "gather" not in str(jax.make_jaxpr(jax.vmap(jax.vmap(ours)))(ids))


def test_mask_matches_keras_mask_zero():
    tokens = jnp.array([[0, 3, 0, 7], [5, 0, 1, 2]])
    keras_embed = keras.layers.Embedding(8, 4, mask_zero=True)
    expected = keras_embed.compute_mask(tokens)
    embedding = eqx_embed.Embedding(8, 4, padding_idx=0, key=jax.random.key(0))
    np.testing.assert_array_equal(embedding.mask(tokens), expected)
    np.testing.assert_array_equal(eqx.filter_jit(embedding.mask)(tokens), expected)


def test_mask_with_negative_padding_idx_and_without_one():
    embedding = eqx_embed.Embedding(8, 4, padding_idx=-1, key=jax.random.key(0))
    np.testing.assert_array_equal(
        embedding.mask(jnp.array([7, -1, 0, 6])), [False, False, True, True]
    )
    with pytest.raises(ValueError, match="mask needs an Embedding with a padding_idx"):
        eqx_embed.Embedding(8, 4, key=jax.random.key(0)).mask(jnp.array([1]))


@pytest.mark.parametrize("padding_idx", [None, 0, 3, -2])
def test_gradient_matches_torch_and_padding_row_gets_none(padding_idx):
    table = random_table(6, 4, dtype=np.float32)
    ids = np.array([[0, 3, 3, 5], [1, 0, -2, 4], [-1, 6, -7, 3]])
    cotangent = np.random.default_rng(1).normal(size=(*ids.shape, 4))
    embedding = eqx_embed.Embedding(weight=table, padding_idx=padding_idx)

    @eqx.filter_jit
    @eqx.filter_grad
    def gradient(embedding):
        rows = jax.vmap(jax.vmap(embedding))(jnp.asarray(ids))
        # Out-of-range ids read NaN rows; they must give no gradient either.
        return jnp.nansum(rows * cotangent)

    # PyTorch in float64, on the in-range ids (it raises on the others).
    valid = (ids >= -6) & (ids < 6)
    weight = torch.tensor(np.asarray(table, np.float64), requires_grad=True)
    rows = torch.nn.functional.embedding(
        torch.tensor(ids[valid] % 6), weight, padding_idx=padding_idx
    )
    (rows * torch.tensor(cotangent[valid])).sum().backward()
    expected = weight.grad.numpy()
    got = gradient(embedding).weight
    # Sums of the cotangents of the ids that read each row.
    close = tolerance(np.float32, ids.size, scale=np.abs(cotangent).sum())
    np.testing.assert_allclose(got, expected, **close)
    if padding_idx is not None:
        np.testing.assert_array_equal(got[padding_idx], np.zeros(4))


# Dtypes


@pytest.mark.parametrize("param_dtype", [jnp.float32, *LOW_PRECISION])
@pytest.mark.parametrize("dtype", [None, jnp.float32, *LOW_PRECISION])
def test_dtype_and_param_dtype(param_dtype, dtype):
    table = random_table(7, 4)
    embedding = eqx_embed.Embedding(weight=table, param_dtype=param_dtype, dtype=dtype)
    assert embedding.weight.dtype == param_dtype
    ids = jnp.array([[0, -1, 7], [3, 3, 2]])
    got = lookup(embedding, ids)
    assert got.dtype == (param_dtype if dtype is None else dtype)
    # A lookup is exact: the stored row, cast once to the compute dtype.
    expected = reference_rows(table.astype(param_dtype), ids)
    np.testing.assert_array_equal(
        np.asarray(got, np.float64), expected.astype(got.dtype).astype(np.float64)
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_compute_dtype_is_applied_after_the_gather(dtype):
    embedding = eqx_embed.Embedding(300, 16, dtype=dtype, key=jax.random.key(0))
    ids = jnp.arange(40).reshape(5, 8)
    text = jax.jit(jax.vmap(jax.vmap(embedding))).lower(ids).as_text()
    converts = re.findall(r"stablehlo\.convert.*?: \((tensor<[^>]*>)\)", text)
    assert converts, "expected the rows to be converted"
    assert all("300x16" not in operand for operand in converts), converts


def test_float64_under_x64():
    table = np.random.default_rng(0).normal(size=(6, 3))
    with jax.enable_x64(True):
        assert (
            eqx_embed.Embedding(6, 3, key=jax.random.key(0)).weight.dtype == np.float64
        )
        embedding = eqx_embed.Embedding(weight=jnp.asarray(table))
        ids = jnp.array([[0, -6, 6], [5, 2, -7]])
        got = lookup(embedding, ids)
        assert got.dtype == np.float64
        np.testing.assert_array_equal(got, reference_rows(table, ids))
        queries = np.random.default_rng(1).normal(size=(2, 3))
        attended = jax.vmap(embedding.attend)(jnp.asarray(queries))
        assert attended.dtype == np.float64
        np.testing.assert_allclose(
            attended, queries @ table.T, **matmul_tolerance(queries, table, np.float64)
        )
    assert not jax.config.jax_enable_x64


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_attend_accumulates_in_float32(dtype):
    table = random_table(50, 256, dtype=np.float32)
    queries = random_table(3, 256, seed=1)
    embedding = eqx_embed.Embedding(weight=table, param_dtype=dtype)
    got = jax.vmap(embedding.attend)(queries.astype(dtype))
    assert got.dtype == dtype
    rounded = np.asarray(queries.astype(dtype), np.float64)
    reference = rounded @ np.asarray(table.astype(dtype), np.float64).T
    # The final rounding to `dtype` (one half-ulp, relative) after a float32 sum,
    # whose own error is absolute, of the size of its terms.
    np.testing.assert_allclose(
        np.asarray(got, np.float64),
        reference,
        rtol=float(jnp.finfo(dtype).eps),
        atol=matmul_tolerance(rounded, table.astype(dtype))["atol"],
    )
    text = jax.jit(jax.vmap(embedding.attend)).lower(queries.astype(dtype)).as_text()
    assert re.search(r"stablehlo\.dot_general.*-> tensor<3x50xf32>", text)


def test_numpy_tables_are_taken_as_equinox_and_flax_take_them():
    """`Embedding(weight=<NumPy array>)`, and any module whose tables became NumPy
    arrays (`jax.tree.map(np.asarray, ...)`), look up eagerly and under `jax.vmap`
    as equinox's and flax's embeddings do with the same NumPy table: where
    `table.at` raised an `AttributeError`."""
    table = np.asarray(random_table(7, 5))
    ids = np.array([0, 3, -1, 6])
    theirs = eqx.nn.Embedding(weight=table)
    flax_rows = flax.linen.Embed(7, 5).apply({"params": {"embedding": table}}, ids)
    ours = eqx_embed.Embedding(weight=table)
    converted = jax.tree.map(np.asarray, eqx_embed.Embedding(weight=jnp.asarray(table)))
    assert isinstance(converted.weight, np.ndarray)
    for embedding in (ours, converted):
        for token in ids:
            np.testing.assert_array_equal(embedding(token), theirs(token))
        np.testing.assert_array_equal(jax.vmap(embedding)(ids), flax_rows)
        assert np.isnan(np.asarray(embedding(7))).all()  # out of range, as ever
    reversible = eqx_embed.ReversibleEmbedding(weight=table)
    np.testing.assert_array_equal(jax.vmap(reversible)(ids), flax_rows)
