"""Bad indices: token ids, RoPE positions and loss targets that are out of range only
in their own dtype (int64 ids past 2**32 that an int32 cast would wrap onto a valid
row, unsigned ids past the table), and the exception the `"error"` policy raises.

The promise checked everywhere: a bad index never reads a valid row. Under `"nan"` it
reads NaNs (a NaN loss for a target), under `"error"` it raises, naming the argument,
the bad value and the table size: `ValueError` when the index is known at the call,
`equinox.EquinoxRuntimeError` (a `RuntimeError`) when traced under `eqx.filter_jit` or
`jax.vmap`. The references are the tables themselves: row `i` of a float64 NumPy copy.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_embed
from eqx_embed import RotaryPositionalEmbedding

ROWS = 10
WIDTH = 4


def table() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(ROWS, WIDTH)).astype(np.float32)


def embedding(policy: str) -> eqx_embed.Embedding:
    return eqx_embed.Embedding(weight=jnp.asarray(table()), out_of_range=policy)


def decoder(policy: str) -> eqx_embed.EmbeddingDecode:
    return eqx_embed.EmbeddingDecode(embedding(policy))


def assert_rows(got, ids, bad):
    """`got` holds the table's rows for the good `ids` and NaN rows for the bad."""
    got = np.asarray(got, np.float64)
    expected = np.asarray(table(), np.float64)[np.where(bad, 0, ids).astype(np.int64)]
    np.testing.assert_array_equal(got[~bad], expected[~bad])
    assert np.isnan(got[bad]).all()


def lookup(module, ids):
    return eqx.filter_jit(lambda m, i: jax.vmap(m)(i))(module, ids)


# int64 ids wider than int32: an int32 cast would wrap 2**32 + 5 onto row 5.

WIDE = [2**32 + 5, 2**40 + 7, -(2**32) + 3, 2**63 - 1, -(2**63)]


@pytest.mark.parametrize("wide", WIDE)
def test_numpy_int64_ids_never_wrap_without_x64(wide):
    assert not jax.config.jax_enable_x64
    assert np.isnan(np.asarray(embedding("nan")(np.int64(wide)))).all()
    with pytest.raises(
        ValueError, match=f"token id {wide} is out of range for a table"
    ):
        embedding("error")(np.int64(wide))
    wrapped = int(np.int64(wide).astype(np.int32)) % ROWS  # the row a cast would read
    padded = eqx_embed.Embedding(weight=jnp.asarray(table()), padding_idx=wrapped)
    assert padded.mask(np.array([wide], np.int64)).all()  # not padding


@pytest.mark.parametrize("wide", WIDE)
def test_int64_ids_never_wrap_under_x64(wide):
    ids = np.array([3, wide, 9])
    bad = np.array([False, True, False])
    with jax.enable_x64(True):
        traced = jnp.asarray(ids, jnp.int64)
        assert_rows(lookup(embedding("nan"), traced), ids, bad)
        assert_rows(jax.vmap(embedding("nan"))(traced), ids, bad)
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {wide} is out"):
            jax.block_until_ready(lookup(embedding("error"), traced))
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {wide} is out"):
            jax.vmap(embedding("error"))(ids)  # vmap of NumPy ids traces them
    assert not jax.config.jax_enable_x64


def test_wide_positions_never_wrap():
    """Position 2**32 + 1 is out of range, not position 1."""
    rope = RotaryPositionalEmbedding(WIDTH, max_seq_len=8)
    strict = RotaryPositionalEmbedding(WIDTH, max_seq_len=8, out_of_range="error")
    x = np.random.default_rng(1).normal(size=(2, WIDTH)).astype(np.float32)
    positions = np.array([1, 2**32 + 1], np.int64)
    with pytest.raises(ValueError, match=f"position {2**32 + 1} is out of range"):
        rope(jnp.asarray(x), positions=positions)
    with jax.enable_x64(True):
        traced = jnp.asarray(positions)
        got = eqx.filter_jit(lambda r, x, p: r(x, positions=p))(rope, x, traced)
        np.testing.assert_array_equal(
            got[0], rope(jnp.asarray(x[:1]), positions=[1])[0]
        )
        assert np.isnan(np.asarray(got[1])).all()
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"position {2**32 + 1} is"):
            jax.block_until_ready(
                eqx.filter_jit(lambda r, x, p: r(x, positions=p))(strict, x, traced)
            )


def test_wide_targets_never_wrap():
    hidden = np.random.default_rng(2).normal(size=(3, WIDTH)).astype(np.float32)
    targets = np.array([4, 2**32 + 5, 1], np.int64)
    losses = np.asarray(decoder("nan").cross_entropy(jnp.asarray(hidden), targets))
    assert np.isnan(losses[1]) and np.isfinite(losses[[0, 2]]).all()
    with pytest.raises(ValueError, match=f"target {2**32 + 5} is out of range"):
        decoder("error").cross_entropy(jnp.asarray(hidden), targets)
    # Masked out, the same target is ignored, under both policies.
    where = np.array([True, False, True])
    for policy in ["nan", "error"]:
        masked = decoder(policy).cross_entropy(
            jnp.asarray(hidden), targets, where=where
        )
        assert np.isfinite(masked).all() and masked[1] == 0
    with jax.enable_x64(True):
        fn = eqx.filter_jit(lambda m, h, t: m.cross_entropy(h, t))
        losses = np.asarray(
            fn(decoder("nan"), jnp.asarray(hidden), jnp.asarray(targets))
        )
        assert np.isnan(losses[1]) and np.isfinite(losses[[0, 2]]).all()
        with pytest.raises(eqx.EquinoxRuntimeError, match=f"target {2**32 + 5} is"):
            jax.block_until_ready(
                fn(decoder("error"), jnp.asarray(hidden), jnp.asarray(targets))
            )


# Unsigned ids past the table are out of range; never wrapped onto a negative id.


@pytest.mark.parametrize(
    "dtype, bad_id", [(np.uint8, 200), (np.uint16, 2**16 - 1), (np.uint32, 2**32 - 1)]
)
def test_unsigned_ids_past_the_table_are_out_of_range(dtype, bad_id):
    ids = np.array([bad_id, 3, ROWS], dtype)
    bad = np.array([True, False, True])
    assert_rows(jax.vmap(embedding("nan"))(jnp.asarray(ids)), ids, bad)
    assert_rows(lookup(embedding("nan"), jnp.asarray(ids)), ids, bad)
    with pytest.raises(ValueError, match=f"token id {bad_id} is out of range"):
        embedding("error")(ids[0])
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {bad_id} is out"):
        jax.block_until_ready(lookup(embedding("error"), jnp.asarray(ids)))


def test_python_int_sequences_are_accepted_as_arrays_are():
    padded = eqx_embed.Embedding(weight=jnp.asarray(table()), padding_idx=0)
    np.testing.assert_array_equal(padded.mask([0, 3, 0]), [False, True, False])
    hidden = jnp.asarray(np.random.default_rng(3).normal(size=(2, WIDTH)), jnp.float32)
    np.testing.assert_array_equal(
        decoder("nan").cross_entropy(hidden, [1, 7]),
        decoder("nan").cross_entropy(hidden, jnp.array([1, 7])),
    )
    with pytest.raises(ValueError, match=f"target {2**70} is out of range"):
        decoder("error").cross_entropy(hidden, [1, 2**70])


# The "error" policy's exception, under each transformation.


@pytest.mark.parametrize("transform", ["filter_jit", "vmap", "filter_jit+vmap"])
def test_error_under_jit_and_vmap_is_an_equinox_runtime_error(transform):
    """Catchable as documented: `eqx.EquinoxRuntimeError`, a `RuntimeError`, whose
    message names the bad id and the table size (not an XLA `INTERNAL` error)."""
    strict = embedding("error")
    ids = jnp.array([[1, 2], [12, 3]])
    fn = {
        "filter_jit": lambda: eqx.filter_jit(lambda m, i: jax.vmap(m)(i[1]))(
            strict, ids
        ),
        "vmap": lambda: jax.vmap(jax.vmap(strict))(ids),
        "filter_jit+vmap": lambda: eqx.filter_jit(
            lambda m, i: jax.vmap(jax.vmap(m))(i)
        )(strict, ids),
    }[transform]
    with pytest.raises(eqx.EquinoxRuntimeError) as caught:
        jax.block_until_ready(fn())
    assert isinstance(caught.value, RuntimeError)
    assert f"token id 12 is out of range for a table of {ROWS} rows" in str(
        caught.value
    )
    assert "INTERNAL" not in str(caught.value)


def test_error_under_jit_names_positions_and_targets_too():
    rope = RotaryPositionalEmbedding(WIDTH, max_seq_len=8, out_of_range="error")
    x = jnp.ones((3, WIDTH))
    with pytest.raises(eqx.EquinoxRuntimeError, match="position 9 is out of range"):
        jax.block_until_ready(
            eqx.filter_jit(lambda p: rope(x, positions=p))(jnp.array([0, 9, 1]))
        )
    hidden = jnp.ones((2, 3, WIDTH))
    targets = jnp.array([[1, 2, 3], [4, -100, 5]])
    with pytest.raises(eqx.EquinoxRuntimeError, match="target -100 is out of range"):
        jax.block_until_ready(jax.vmap(decoder("error").cross_entropy)(hidden, targets))
