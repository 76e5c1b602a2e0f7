"""`RotaryPositionalEmbedding` as a drop-in for `equinox.nn.RotaryPositionalEmbedding`:
equinox's own tests (shapes under its vmap-over-heads pattern, the frequency tables,
the values), rewritten against independent references (float64 NumPy, transformers'
`apply_rotary_pos_emb`) under strict dtype promotion as equinox runs them; its
documented `MultiheadAttention(process_heads=...)` usage; and the tables built at
trace time per instance, where equinox's global cache mixes up thetas."""

import equinox as eqx
import equinox.nn._embedding as equinox_embedding
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.dtypes import TypePromotionError
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import eqx_embed
import eqx_embed.nn._rope as rope_module
from eqx_embed import RotaryPositionalEmbedding


@pytest.fixture(autouse=True)
def strict_promotion_and_a_clean_equinox_cache():
    """equinox's test suite runs with strict dtype promotion; and its RoPE cache is
    global, keyed by (embedding_size, dtype) only, so each test starts it afresh."""
    equinox_embedding.internal_rope_embedding_cache.clear()
    with jax.numpy_dtype_promotion("strict"):
        yield
    equinox_embedding.internal_rope_embedding_cache.clear()


def hf_rope(x, theta=10_000.0):
    """transformers' Llama rotation of `x` `(seq, embedding_size)`, in float64."""
    seq, size = x.shape
    inverse = 1.0 / theta ** (np.arange(0, size, 2, dtype=np.float64) / size)
    angles = np.outer(np.arange(seq, dtype=np.float64), inverse)
    angles = np.concatenate([angles, angles], axis=-1)
    q = torch.from_numpy(np.asarray(x, dtype=np.float64))[None, None]
    cos = torch.from_numpy(np.cos(angles))[None]
    sin = torch.from_numpy(np.sin(angles))[None]
    rotated, _ = apply_rotary_pos_emb(q, q, cos, sin)
    return rotated[0, 0].numpy()


def test_equinox_shapes_under_vmap_over_heads():
    """equinox's test_rope_embeddings_shapes: built from the size alone, applied to
    each head with jax.vmap(in_axes=1, out_axes=1)."""
    rope = RotaryPositionalEmbedding(32)
    keys = jax.random.split(jax.random.key(0))
    queries = jax.random.normal(keys[0], (8, 4, 32))
    keys_ = jax.random.normal(keys[1], (8, 4, 32))
    per_head = jax.vmap(rope, in_axes=1, out_axes=1)
    rotated_queries, rotated_keys = per_head(queries), per_head(keys_)
    assert rotated_queries.shape == rotated_keys.shape == (8, 4, 32)
    for rotated, x in ((rotated_queries, queries), (rotated_keys, keys_)):
        expected = np.stack([hf_rope(x[:, h]) for h in range(4)], axis=1)
        np.testing.assert_allclose(rotated, expected, rtol=0, atol=1e-5)
        # Heads passed directly: the same program per head, the same numbers.
        np.testing.assert_allclose(rope(x), rotated, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "tolerance"), [(jnp.float32, 1e-6), (jnp.float16, 1e-3)]
)
def test_equinox_freqs_cis(dtype, tolerance):
    """equinox's test_rope_embeddings_freqs_cis: Meta's complex `freqs_cis`,
    `exp(i * position * theta ** (-2k / d))`, here from float64 NumPy."""
    cos, sin = RotaryPositionalEmbedding.precompute_freqs_cis(8, 16, 10_000.0, dtype)
    assert cos.dtype == sin.dtype == dtype and cos.shape == (16, 4)
    angles = np.outer(np.arange(16), 10_000.0 ** (-np.arange(0, 8, 2) / 8))
    freqs_cis = np.exp(1j * angles)
    np.testing.assert_allclose(cos.astype(np.float32), freqs_cis.real, atol=tolerance)
    np.testing.assert_allclose(sin.astype(np.float32), freqs_cis.imag, atol=tolerance)
    # And equinox's own, which computes its angles in float32.
    theirs = eqx.nn.RotaryPositionalEmbedding.precompute_freqs_cis(
        8, 16, 10_000.0, dtype
    )
    np.testing.assert_allclose(
        cos.astype(np.float32), theirs[0].astype(np.float32), atol=tolerance
    )


def test_equinox_values_and_our_documented_float16_difference():
    """equinox's test_rope_embeddings_values, against transformers' rotation."""
    x = jnp.arange(8 * 4 * 1.0).reshape(8, 4)
    expected = hf_rope(np.asarray(x))
    rope = RotaryPositionalEmbedding(4, dtype=jnp.float32)
    np.testing.assert_allclose(rope(x), expected, rtol=0, atol=2e-5)
    np.testing.assert_allclose(
        rope(x), eqx.nn.RotaryPositionalEmbedding(4, dtype=jnp.float32)(x), atol=2e-5
    )
    # equinox raises TypePromotionError on float16 input against float32 tables;
    # ours rotates it in float32 and casts back once, to float16 precision.
    with pytest.raises(TypePromotionError):
        eqx.nn.RotaryPositionalEmbedding(4, dtype=jnp.float32)(x.astype(jnp.float16))
    low = rope(x.astype(jnp.float16))
    assert low.dtype == jnp.float16
    np.testing.assert_allclose(
        low.astype(np.float32), expected, rtol=float(jnp.finfo(jnp.float16).eps)
    )
    # float16 tables on float16 input, as equinox's last case.
    half = RotaryPositionalEmbedding(4, dtype=jnp.float16)(x.astype(jnp.float16))
    assert half.dtype == jnp.float16
    np.testing.assert_allclose(half.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize(
    "build",
    [
        lambda module: module(16, 500.0, jnp.float32),
        lambda module: module(16, theta=500.0, dtype=jnp.float32),
        lambda module: module(embedding_size=16, theta=500.0),
    ],
)
def test_equinox_constructor_spellings_give_equinox_results(build):
    ours, theirs = (
        build(RotaryPositionalEmbedding),
        build(eqx.nn.RotaryPositionalEmbedding),
    )
    assert (ours.embedding_size, ours.theta, ours.dtype) == (
        theirs.embedding_size,
        theirs.theta,
        theirs.dtype,
    )
    x = jax.random.normal(jax.random.key(1), (40, 16))
    # float32 angles (equinox) against float64 ones: up to seq ulps of an angle.
    atol = 16 * 40 * np.finfo(np.float32).eps
    np.testing.assert_allclose(ours(x), theirs(x), rtol=0, atol=atol)
    np.testing.assert_allclose(
        ours.rotate_half(x), theirs.rotate_half(x), rtol=0, atol=0
    )


class Block(eqx.Module):
    """equinox's documented usage: RoPE on the heads in MultiheadAttention's
    process_heads."""

    attention: eqx.nn.MultiheadAttention
    rope: eqx.Module

    def __call__(self, x):
        def process_heads(query_heads, key_heads, value_heads):
            per_head = jax.vmap(self.rope, in_axes=1, out_axes=1)
            return per_head(query_heads), per_head(key_heads), value_heads

        return self.attention(x, x, x, process_heads=process_heads)


def test_equinox_documented_usage_in_multihead_attention():
    attention = eqx.nn.MultiheadAttention(4, 32, key=jax.random.key(2))
    x = jax.random.normal(jax.random.key(3), (24, 32))
    ours = eqx.filter_jit(Block.__call__)(
        Block(attention, RotaryPositionalEmbedding(8)), x
    )
    theirs = Block(attention, eqx.nn.RotaryPositionalEmbedding(8))(x)
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_two_thetas_in_one_model_are_each_right_where_equinox_mixes_them():
    """Gemma 3's local and global layers: theta 10,000 and 1,000,000 at the same
    head size. equinox's cache serves the first theta's tables to both."""
    x = jax.random.normal(jax.random.key(4), (20, 16))

    def both(local, global_, x):
        return local(x), global_(x)

    ours = eqx.filter_jit(both)(
        RotaryPositionalEmbedding(16, 10_000.0), RotaryPositionalEmbedding(16, 1e6), x
    )
    np.testing.assert_allclose(ours[0], hf_rope(x, 10_000.0), atol=1e-5)
    np.testing.assert_allclose(ours[1], hf_rope(x, 1e6), atol=1e-5)
    theirs = both(
        eqx.nn.RotaryPositionalEmbedding(16, 10_000.0),
        eqx.nn.RotaryPositionalEmbedding(16, 1e6),
        x,
    )
    assert not np.allclose(theirs[1], hf_rope(x, 1e6), atol=1e-3)


def test_trace_time_tables_are_constants_built_once_per_instance_and_length(
    monkeypatch,
):
    scaling = {"rope_type": "linear", "factor": 2.0}
    rope = RotaryPositionalEmbedding(8, scaling=scaling)
    assert rope.max_seq_len is None and jax.tree.leaves(rope) == []
    built = []

    def counting_tables(*args, seq_len, **kwargs):
        built.append(seq_len)
        return tables(*args, seq_len=seq_len, **kwargs)

    tables = rope_module._tables
    monkeypatch.setattr(rope_module, "_tables", counting_tables)
    jaxpr = jax.make_jaxpr(rope)(jnp.ones((12, 3, 8)))
    primitives = {equation.primitive.name for equation in jaxpr.jaxpr.eqns}
    assert not primitives & {"sin", "cos"}, primitives
    # Traced again, called eagerly, another length: each length is built once.
    eqx.filter_jit(lambda r, x: r(x))(rope, jnp.ones((12, 8)))
    rope(jnp.ones((12, 8)))
    rope(jnp.ones((5, 8)))
    assert built == [12, 5]
    cos, sin = rope.tables(12)
    angles = np.outer(np.arange(12), 10_000.0 ** (-np.arange(0, 8, 2) / 8) / 2.0)
    np.testing.assert_allclose(cos, np.cos(angles), rtol=0, atol=6e-8)
    np.testing.assert_allclose(sin, np.sin(angles), rtol=0, atol=6e-8)
    # The same as a module whose tables were stored at construction.
    stored = RotaryPositionalEmbedding(8, max_seq_len=12, scaling=scaling)
    x = jax.random.normal(jax.random.key(5), (12, 8))
    np.testing.assert_array_equal(rope(x), stored(x))


def test_modules_that_differ_only_in_scaling_compile_separately():
    """The trace-time tables compare by theta and the scaling dict, so jit never
    reuses one module's compiled constants for another's."""
    rotate = eqx.filter_jit(lambda rope, x: rope(x))
    x = jax.random.normal(jax.random.key(6), (10, 8))
    results = [
        rotate(
            RotaryPositionalEmbedding(8, scaling={"rope_type": "linear", "factor": f}),
            x,
        )
        for f in (2.0, 3.0)
    ]
    assert not np.allclose(results[0], results[1])
    # jit against eager: two programs, a few float32 roundings apart.
    np.testing.assert_allclose(
        results[1],
        RotaryPositionalEmbedding(
            8, max_seq_len=10, scaling={"rope_type": "linear", "factor": 3.0}
        )(x),
        rtol=0,
        atol=8 * np.finfo(np.float32).eps,
    )


def test_without_max_seq_len_positions_and_stored_tables_are_clear_errors():
    rope = RotaryPositionalEmbedding(8)
    with pytest.raises(
        ValueError, match="positions need a module built with max_seq_len"
    ):
        rope(jnp.ones((3, 8)), positions=jnp.arange(3))
    with pytest.raises(
        ValueError, match=r"stores no cos table .* use tables\(seq_len\)"
    ):
        _ = rope.cos


def test_exported_from_the_package():
    assert eqx_embed.nn.RotaryPositionalEmbedding is RotaryPositionalEmbedding
