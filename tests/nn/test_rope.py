"""`RotaryPositionalEmbedding` against float64 NumPy references (half-split and GPT-J's
interleaved layout), `equinox.nn.RotaryPositionalEmbedding`, its algebraic properties,
its non-trainable tables under a real optax training loop, and its errors.
(The Hugging Face scaling rules are in test_rope_scaling.py.)"""

import equinox as eqx
import equinox.nn._embedding as equinox_embedding
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import optax
import pytest
from _tolerances import tolerance
from hypothesis import given

import eqx_embed
from eqx_embed import RotaryPositionalEmbedding

LOW_PRECISION = [jnp.bfloat16, jnp.float16]


def reference_angles(positions, rotary_dim, theta=10_000.0):
    """`position * theta ** (-2i / rotary_dim)` in extended precision."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.longdouble) / rotary_dim
    inverse = np.longdouble(1) / np.longdouble(theta) ** exponents
    return np.asarray(positions, dtype=np.longdouble)[:, None] * inverse


def reference_rope(x, positions, *, theta=10_000.0, rotary_dim=None, interleaved=False):
    """RoPE in float64, written from the papers: GPT-NeoX's half-split pairs
    `(i, i + r/2)`, or GPT-J's `rotate_every_two` pairs `(2i, 2i + 1)`."""
    x = np.asarray(x, dtype=np.float64)
    rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
    angles = reference_angles(positions, rotary_dim, theta).astype(np.float64)
    # Broadcast (seq, half) over any axes between seq and the features.
    angles = angles.reshape(angles.shape[0], *(1,) * (x.ndim - 2), -1)
    cos, sin = np.cos(angles), np.sin(angles)
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        even, odd = rotated[..., 0::2], rotated[..., 1::2]
        out = np.empty_like(rotated)
        out[..., 0::2] = even * cos - odd * sin
        out[..., 1::2] = odd * cos + even * sin
    else:
        half = rotary_dim // 2
        first, second = rotated[..., :half], rotated[..., half:]
        out = np.concatenate(
            [first * cos - second * sin, second * cos + first * sin], -1
        )
    return np.concatenate([out, passed], axis=-1)


def close(x, dtype=np.float32):
    """For rotations by two programs: each output is `a cos - b sin` (two products and
    a sum, after the tables' own rounding), whose terms are bounded by `2 max|x|`."""
    return tolerance(dtype, 4, scale=2 * float(np.abs(np.asarray(x, np.float64)).max()))


def random_x(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype=dtype)


@eqx.filter_jit
def rotate(rope, x, positions=None):
    """One compiled call per setting and shape, shared by the property tests."""
    return rope(x, positions=positions)


@st.composite
def rope_and_x(draw):
    """A module with random settings and an x of 0 to 2 head axes. Sizes come from
    short menus so that examples share their compilations."""
    rotary_dim = draw(st.sampled_from([2, 8]))
    rope = RotaryPositionalEmbedding(
        rotary_dim + draw(st.sampled_from([0, 3])),
        max_seq_len=48,
        theta=draw(st.sampled_from([100.0, 10_000.0])),
        rotary_dim=rotary_dim,
        interleaved=draw(st.booleans()),
    )
    seq = draw(st.sampled_from([1, 9]))
    heads = draw(st.sampled_from([(), (2, 3)]))
    x = random_x((seq, *heads, rope.embedding_size), seed=draw(st.integers(0, 2**16)))
    return rope, x


# Against references


@given(rope_and_x())
def test_matches_float64_reference_in_both_layouts(rope_and_x):
    rope, x = rope_and_x
    expected = reference_rope(
        x,
        np.arange(x.shape[0]),
        theta=rope.theta,
        rotary_dim=rope.rotary_dim,
        interleaved=rope.interleaved,
    )
    np.testing.assert_allclose(rotate(rope, x), expected, **close(x))


@pytest.mark.parametrize("interleaved", [False, True])
def test_float64_tables_under_x64_match_to_the_last_bits(interleaved):
    with jax.enable_x64(True):
        rope = RotaryPositionalEmbedding(
            32, max_seq_len=300, theta=500.0, rotary_dim=24, interleaved=interleaved
        )
        assert rope.cos.dtype == np.float64 and rope.cos_bits.dtype == np.uint64
        x = random_x((300, 2, 32), dtype=np.float64)
        positions = np.arange(300)
        expected = reference_rope(
            x, positions, theta=500.0, rotary_dim=24, interleaved=interleaved
        )
        got = eqx.filter_jit(lambda r, x: r(x))(rope, x)
        assert got.dtype == np.float64
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize(("embedding_size", "seq"), [(2, 1), (8, 100), (64, 7)])
def test_matches_equinox_for_the_default(embedding_size, seq):
    # equinox caches its tables per (size, dtype) whatever theta, so start afresh.
    equinox_embedding.internal_rope_embedding_cache.clear()
    theirs = eqx.nn.RotaryPositionalEmbedding(embedding_size)
    ours = RotaryPositionalEmbedding(embedding_size, max_seq_len=128)
    x = random_x((seq, embedding_size))
    # equinox computes its angles in float32, we in float64: both round cos and sin
    # once, so they differ by the float32 angle error, under seq ulps of an angle.
    tolerance = 16 * seq * np.finfo(np.float32).eps
    np.testing.assert_allclose(ours(x), theirs(x), rtol=0, atol=tolerance)
    # equinox's documented way for heads: vmap over the head axis. Ours takes them.
    heads = random_x((seq, 3, embedding_size), seed=1)
    np.testing.assert_allclose(
        ours(heads),
        jax.vmap(theirs, in_axes=1, out_axes=1)(heads),
        rtol=0,
        atol=tolerance,
    )


def test_tables_are_accurate_at_two_to_the_twenty():
    """float64 angles, cast once: under 1e-6 from an extended-precision reference at
    positions up to 2**20, where float32 angles are off by a few hundredths."""
    size = 2**20 + 1
    rope = RotaryPositionalEmbedding(8, max_seq_len=size)
    positions = np.concatenate([np.arange(64), np.arange(size - 4096, size)])
    angles = reference_angles(positions, 8)
    for table, exact in [(rope.cos, np.cos(angles)), (rope.sin, np.sin(angles))]:
        error = np.abs(np.asarray(table)[positions] - exact.astype(np.float64))
        assert error.max() < 1e-6, error.max()
    float32_angles = np.float32(positions)[:, None] * np.float32(
        1 / 10_000 ** (np.arange(0, 8, 2) / 8)
    )
    float32_error = np.abs(np.cos(float32_angles) - np.cos(angles).astype(np.float64))
    assert float32_error.max() > 1e-3  # what the float64 angles buy
    # And through a call at those positions.
    x = random_x((positions.size, 8))
    expected = reference_rope(x, positions)
    np.testing.assert_allclose(
        rope(x, positions=jnp.asarray(positions)), expected, **close(x)
    )


@pytest.mark.parametrize("dtype", LOW_PRECISION)
def test_low_precision_is_rotated_in_float32_and_cast_once(dtype):
    rope = RotaryPositionalEmbedding(16, max_seq_len=50, rotary_dim=12)
    x = random_x((50, 2, 16), dtype=dtype)
    got = rope(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(
        got.astype(np.float32),
        rope(x.astype(jnp.float32)).astype(dtype).astype(np.float32),
    )
    expected = reference_rope(x.astype(np.float32), np.arange(50), rotary_dim=12)
    np.testing.assert_allclose(
        got.astype(np.float32),
        expected,
        rtol=jnp.finfo(dtype).eps,
        atol=jnp.finfo(dtype).eps,
    )


def test_low_precision_tables_are_cast_once_from_float64():
    rope = RotaryPositionalEmbedding(8, max_seq_len=1000, dtype=jnp.bfloat16)
    assert rope.cos.dtype == jnp.bfloat16 and rope.cos_bits.dtype == np.uint16
    exact = np.cos(reference_angles(np.arange(1000), 8)).astype(np.float64)
    np.testing.assert_array_equal(rope.cos, exact.astype(jnp.bfloat16))


# Properties


@given(
    st.integers(1, 8),
    st.booleans(),
    st.lists(st.integers(0, 60), min_size=3, max_size=3),
    st.integers(0, 2**16),
)
def test_dot_product_depends_only_on_the_position_difference(
    half, interleaved, ps, seed
):
    query_position, key_position, shift = ps
    rope = RotaryPositionalEmbedding(2 * half, max_seq_len=128, interleaved=interleaved)
    q, k = random_x((2, 2 * half), seed=seed)

    def score(query_position, key_position):
        rotated_q = rotate(rope, q[None], jnp.array([query_position]))
        rotated_k = rotate(rope, k[None], jnp.array([key_position]))
        return float(jnp.vdot(rotated_q, rotated_k))

    np.testing.assert_allclose(
        score(query_position, key_position),
        score(query_position + shift, key_position + shift),
        rtol=1e-5,
        atol=1e-5,
    )


@given(rope_and_x(), st.data())
def test_offset_positions_equal_slices_of_the_full_sequence(rope_and_x, data):
    """As a KV-cache step: x[start:] at positions start, start + 1, ... is the tail of
    the full sequence's result (x is rolled rather than cut, to keep its shape)."""
    rope, x = rope_and_x
    seq = x.shape[0]
    start = data.draw(st.integers(0, seq - 1))
    shifted = rotate(rope, jnp.roll(x, -start, axis=0), start + jnp.arange(seq))
    full = rotate(rope, x)
    np.testing.assert_allclose(shifted[: seq - start], full[start:], **close(x))


@given(rope_and_x(), st.data())
def test_packed_sequences_restart_their_positions(rope_and_x, data):
    rope, x = rope_and_x
    seq = x.shape[0]
    split = data.draw(st.integers(0, seq))
    positions = jnp.concatenate([jnp.arange(split), jnp.arange(seq - split)])
    packed = rotate(rope, x, positions)
    second = rotate(rope, jnp.roll(x, -split, axis=0))
    np.testing.assert_allclose(packed[:split], rotate(rope, x)[:split], **close(x))
    np.testing.assert_allclose(packed[split:], second[: seq - split], **close(x))


@given(rope_and_x())
def test_the_two_layouts_agree_up_to_the_feature_permutation(rope_and_x):
    rope, x = rope_and_x
    r = rope.rotary_dim
    interleaved, half_split = (
        RotaryPositionalEmbedding(
            rope.embedding_size,
            max_seq_len=rope.max_seq_len,
            theta=rope.theta,
            rotary_dim=r,
            interleaved=layout,
        )
        for layout in (True, False)
    )
    # Pairs (2i, 2i + 1) of the interleaved layout are pairs (i, i + r/2) here.
    to_half_split = np.concatenate(
        [np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, x.shape[-1])]
    )
    np.testing.assert_allclose(
        rotate(half_split, x[..., to_half_split]),
        rotate(interleaved, x)[..., to_half_split],
        **close(x),
    )


@given(
    rope_and_x(),
    st.sampled_from([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-45, 3e38]),
)
def test_partial_rotary_passes_the_rest_through_bitwise(rope_and_x, special):
    rope, x = rope_and_x
    x = x.at[..., -1].set(special)  # in the pass-through when there is one
    got = rotate(rope, x)
    r = rope.rotary_dim
    np.testing.assert_array_equal(
        np.asarray(got[..., r:]).view(np.uint32), np.asarray(x[..., r:]).view(np.uint32)
    )


@pytest.mark.parametrize(
    "settings", [{}, {"interleaved": True}, {"rotary_dim": 16}, {"dtype": jnp.bfloat16}]
)
def test_rotation_compiles_to_one_loop_without_gathers(settings):
    """Default positions slice the tables statically: under jit and vmap the whole
    rotation, pass-through included, is one fused loop over the queries."""
    rope = RotaryPositionalEmbedding(32, max_seq_len=64, **settings)
    queries = jax.ShapeDtypeStruct((4, 48, 3, 32), jnp.float32)
    text = jax.jit(jax.vmap(rope)).lower(queries).compile().as_text()
    entry = text[text.index("ENTRY") :]
    assert " gather(" not in text
    assert entry.count(" fusion(") == 1, entry


# The tables are not parameters


class TinyModel(eqx.Module):
    """Just enough of an attention layer for RoPE to sit in."""

    projection: eqx.nn.Linear
    rope: RotaryPositionalEmbedding

    def __call__(self, x):
        queries = jax.vmap(self.projection)(x).reshape(x.shape[0], 2, 4)
        return jnp.sum(self.rope(queries) ** 2 * jnp.arange(8).reshape(2, 4))


class StopGradientRope(eqx.Module):
    """The design that does not work: float tables behind `stop_gradient`."""

    cos: jax.Array
    sin: jax.Array


def train(model, loss, steps=5):
    """The plain Equinox recipe, with optax.adamw and weight decay."""
    optimiser = optax.adamw(1e-1, weight_decay=0.5)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        grads = eqx.filter_grad(loss)(model)
        updates, state = optimiser.update(
            grads, state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), state

    for _ in range(steps):
        model, state = step(model, state)
    return model, state


def test_tables_survive_adamw_weight_decay_bitwise_with_no_optimiser_state():
    rope = RotaryPositionalEmbedding(4, max_seq_len=6, theta=100.0)
    model = TinyModel(eqx.nn.Linear(8, 8, key=jax.random.key(0)), rope)
    x = random_x((6, 8))
    trained, state = train(model, lambda m: m(x))
    np.testing.assert_array_equal(trained.rope.cos_bits, rope.cos_bits)
    np.testing.assert_array_equal(trained.rope.sin_bits, rope.sin_bits)
    assert not np.array_equal(trained.projection.weight, model.projection.weight)
    # Optimiser state: two moments for the weight and bias, nothing table-shaped.
    state_arrays = [leaf for leaf in jax.tree.leaves(state) if eqx.is_array(leaf)]
    table_shape = rope.cos_bits.shape
    assert all(leaf.shape != table_shape for leaf in state_arrays)
    parameters = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert {p.shape for p in parameters} == {(8, 8), (8,)}
    grads = eqx.filter_grad(lambda m: m(random_x((6, 8))))(model)
    assert grads.rope.cos_bits is None and grads.rope.sin_bits is None


def test_stop_gradient_alone_would_not_survive_weight_decay():
    """What the test above guards against: with float tables, weight decay alone
    shrinks them although no gradient reaches them."""
    table = jnp.ones((6, 2))
    trained, _ = train(
        StopGradientRope(table, table),
        lambda m: jnp.sum(jax.lax.stop_gradient(m.cos) * jax.lax.stop_gradient(m.sin)),
    )
    assert not np.array_equal(trained.cos, table)


def test_tables_are_array_leaves_that_move_with_the_model(tmp_path):
    rope = RotaryPositionalEmbedding(8, max_seq_len=16, rotary_dim=6, interleaved=True)
    leaves = jax.tree.leaves(rope)
    assert len(leaves) == 2 and all(eqx.is_array(leaf) for leaf in leaves)
    # Serialisation round trip, into a skeleton that holds no tables yet.
    path = tmp_path / "rope.eqx"
    eqx.tree_serialise_leaves(path, rope)
    skeleton = eqx.filter_eval_shape(
        RotaryPositionalEmbedding, 8, max_seq_len=16, rotary_dim=6, interleaved=True
    )
    restored = eqx.tree_deserialise_leaves(path, skeleton)
    np.testing.assert_array_equal(restored.cos_bits, rope.cos_bits)
    np.testing.assert_array_equal(restored.sin_bits, rope.sin_bits)
    x = random_x((16, 8))
    np.testing.assert_array_equal(restored(x), rope(x))
    # Placed on a device with a sharding, and passed to jit as arguments, not baked
    # in as constants.
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    placed = jax.device_put(rope, sharding)
    assert placed.cos_bits.sharding == sharding
    jaxpr = jax.make_jaxpr(lambda r, x: r(x))(placed, x)
    assert len(jaxpr.jaxpr.invars) == 3 and not jaxpr.consts
    # vmap over an ensemble of tables.
    other = RotaryPositionalEmbedding(8, max_seq_len=16, rotary_dim=6, interleaved=True)
    other = eqx.tree_at(lambda r: r.cos_bits, other, rope.sin_bits)
    ensemble = jax.tree.map(lambda *a: jnp.stack(a), rope, other)
    both = eqx.filter_vmap(lambda r, x: r(x), in_axes=(eqx.if_array(0), None))(
        ensemble, x
    )
    np.testing.assert_array_equal(both[0], rope(x))
    np.testing.assert_array_equal(both[1], other(x))


def test_instances_with_different_settings_never_share_tables():
    """equinox caches its tables per (size, dtype), whatever theta; ours belong to the
    instance: the same jitted function gives each its own result."""
    x = random_x((20, 2, 16))
    settings = [
        dict(theta=10_000.0),
        dict(theta=100.0),
        dict(theta=100.0, rotary_dim=8),
        dict(theta=100.0, interleaved=True),
        dict(theta=100.0, scaling={"rope_type": "linear", "factor": 3.0}),
    ]
    ropes = [RotaryPositionalEmbedding(16, max_seq_len=32, **s) for s in settings]
    rotate = eqx.filter_jit(lambda r, x: r(x))
    results = [np.asarray(rotate(rope, x)) for rope in ropes]
    for rope, got, setting in zip(ropes, results, settings, strict=True):
        scale = setting.get("scaling", {}).get("factor", 1.0)
        expected = reference_rope(
            x,
            np.arange(20) / scale,
            theta=rope.theta,
            rotary_dim=rope.rotary_dim,
            interleaved=rope.interleaved,
        )
        np.testing.assert_allclose(got, expected, atol=1e-5)
    for i in range(len(results)):
        for j in range(i):
            assert not np.allclose(results[i], results[j])
    # Both instances used inside one function.
    pair = eqx.filter_jit(lambda a, b, x: (a(x), b(x)))(ropes[0], ropes[1], x)
    # Compiled together, against separately: the same values up to rounding.
    np.testing.assert_allclose(pair[0], results[0], **close(x))
    np.testing.assert_allclose(pair[1], results[1], **close(x))


# Out-of-range positions


def test_positions_known_at_trace_time_raise_at_once():
    rope = RotaryPositionalEmbedding(4, max_seq_len=8)
    x = random_x((3, 4))
    message = r"position {} is out of range for a table of 8 rows \(valid: 0 <= "
    for bad in (8, -1, 2**30):
        with pytest.raises(ValueError, match=message.format(bad)):
            rope(x, positions=jnp.array([0, bad, 1]))
        with pytest.raises(ValueError, match=message.format(bad)):
            rope(x, positions=np.array([0, bad, 1]))


@pytest.mark.parametrize("wrap", ["jit", "vmap", "jit+vmap"])
def test_too_long_a_sequence_is_an_error_at_trace_time(wrap):
    rope = RotaryPositionalEmbedding(4, max_seq_len=8)
    x = random_x((2, 9, 4))
    fn = {
        "jit": lambda: eqx.filter_jit(lambda r, x: r(x))(rope, x[0]),
        "vmap": lambda: jax.vmap(rope)(x),
        "jit+vmap": lambda: eqx.filter_jit(lambda r, x: jax.vmap(r)(x))(rope, x),
    }[wrap]
    with pytest.raises(ValueError, match="x has 9 positions .* max_seq_len=8"):
        fn()
    with pytest.raises(ValueError, match="x has 9 positions .* max_seq_len=8"):
        rope(x[0])


def test_traced_out_of_range_positions_read_nan_and_never_wrap():
    rope = RotaryPositionalEmbedding(4, max_seq_len=8)
    x = random_x((2, 4, 4))
    positions = jnp.array([[0, 8, -1, 7], [-8, 3, 2**30, 1]])
    fn = eqx.filter_jit(lambda r, x, p: jax.vmap(lambda x, p: r(x, positions=p))(x, p))
    got = np.asarray(fn(rope, x, positions))
    bad = np.asarray((positions < 0) | (positions >= 8))
    assert np.isnan(got[bad]).all()
    expected = [
        reference_rope(x[row], np.where(bad[row], 0, positions[row]))
        for row in range(2)
    ]
    np.testing.assert_allclose(got[~bad], np.stack(expected)[~bad], **close(x))
    text = (
        jax.jit(lambda x, p: rope(x, positions=p)).lower(x[0], positions[0]).as_text()
    )
    assert "callback" not in text


def test_one_rotation_rotates_queries_and_keys_as_separate_calls():
    rope = eqx_embed.RotaryPositionalEmbedding(8, max_seq_len=16, rotary_dim=6)
    queries, keys = random_x((5, 4, 8), seed=1), random_x((5, 2, 8), seed=2)
    positions = jnp.array([3, 4, 0, 1, 2])
    rotation = rope.rotation(5, positions=positions)
    for x in (queries, keys):
        np.testing.assert_array_equal(rotation(x), rope(x, positions=positions))
        np.testing.assert_allclose(
            rotation(x), reference_rope(x, np.asarray(positions), rotary_dim=6),
            **close(x),
        )  # fmt: skip
    np.testing.assert_array_equal(rope.rotation(5)(queries), rope(queries))
    with pytest.raises(
        ValueError, match="x has 6 rows but the rotation was built for 5"
    ):
        rotation(random_x((6, 8)))
    with pytest.raises(ValueError, match=r"positions must have shape \(5,\)"):
        rope.rotation(5, positions=jnp.arange(4))
    with pytest.raises(ValueError, match="position 16 is out of range"):
        rope.rotation(2, positions=np.array([0, 16]))


@pytest.mark.parametrize("wrap", ["jit", "vmap", "jit+vmap"])
def test_error_policy_raises_for_traced_positions(wrap):
    rope = RotaryPositionalEmbedding(4, max_seq_len=8, out_of_range="error")
    x = random_x((2, 3, 4))
    positions = jnp.array([[0, 1, 2], [5, -3, 9]])

    def at(r, x, p):
        return r(x, positions=p)

    fn = {
        "jit": lambda: eqx.filter_jit(at)(rope, x[1], positions[1]),
        "vmap": lambda: jax.vmap(lambda x, p: at(rope, x, p))(x, positions),
        "jit+vmap": lambda: eqx.filter_jit(
            lambda r, x, p: jax.vmap(lambda x, p: at(r, x, p))(x, p)
        )(rope, x, positions),
    }[wrap]
    # The largest bad position of the whole batch.
    with pytest.raises(eqx.EquinoxRuntimeError, match=r"position 9 is out of range"):
        jax.block_until_ready(fn())
    good = eqx.filter_jit(at)(rope, x[0], positions[0])
    np.testing.assert_allclose(good, reference_rope(x[0], np.arange(3)), **close(x[0]))


# Bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embedding_size=7), r"embedding_size=7 is odd, so rotary_dim .* given"),
        (dict(embedding_size=7, rotary_dim=7), "must be even .* got rotary_dim=7"),
        (
            dict(embedding_size=8, rotary_dim=10),
            r"in \(0, embedding_size=8\], got rotary_dim=10",
        ),
        (dict(embedding_size=8, rotary_dim=5), "even .* got rotary_dim=5"),
        (dict(embedding_size=8, rotary_dim=0), "got rotary_dim=0"),
        (dict(embedding_size=0), "embedding_size must be a positive integer, got 0"),
        (
            dict(embedding_size=8, max_seq_len=0),
            "max_seq_len must be a positive integer, got 0",
        ),
        (
            dict(embedding_size=8, theta=-1.0),
            "theta must be a positive finite number, got -1.0",
        ),
        (dict(embedding_size=8, dtype=jnp.int32), "dtype must be a floating dtype"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, message):
    kwargs = {"max_seq_len": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        RotaryPositionalEmbedding(kwargs.pop("embedding_size"), **kwargs)


def test_unknown_out_of_range_policy_is_a_clear_error():
    # The contracts see the bad Literal first where they are on (as under pytest).
    with pytest.raises((ValueError, TypeError), match="out_of_range"):
        RotaryPositionalEmbedding(8, max_seq_len=4, out_of_range="clip")


def test_odd_embedding_size_with_an_even_rotary_dim_is_fine():
    rope = RotaryPositionalEmbedding(7, max_seq_len=4, rotary_dim=4)
    x = random_x((4, 7))
    np.testing.assert_allclose(
        rope(x), reference_rope(x, np.arange(4), rotary_dim=4), **close(x)
    )


BAD_CALLS = {
    "float positions": (random_x((3, 2, 8)), jnp.array([0.0, 1.0, 2.0]), "positions"),
    "bool positions": (
        random_x((3, 2, 8)),
        jnp.array([True, False, True]),
        "positions",
    ),
    "positions too long": (random_x((3, 2, 8)), jnp.arange(4), "positions"),
    "positions of rank 2": (random_x((3, 2, 8)), jnp.zeros((3, 1), int), "positions"),
    "x of the wrong width": (random_x((3, 2, 6)), None, "x"),
    "x of rank 1": (random_x((8,)), None, "x"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("wrap", ["eager", "jit", "vmap"])
def test_bad_calls_are_clear_errors(case, wrap):
    x, positions, name = BAD_CALLS[case]
    rope = RotaryPositionalEmbedding(8, max_seq_len=8)

    def call(r, x, p):
        return r(x) if p is None else r(x, positions=p)

    def batch(a):
        return None if a is None else jnp.stack([a, a])

    fn = {
        "eager": lambda: call(rope, x, positions),
        "jit": lambda: eqx.filter_jit(call)(rope, x, positions),
        "vmap": lambda: jax.vmap(lambda x, p: call(rope, x, p))(
            batch(x), batch(positions)
        ),
    }[wrap]
    error = (jaxtyping.TypeCheckError, ValueError)
    with pytest.raises(
        error, match=f"(parameter '{name}'|{name} must have a last axis)"
    ):
        fn()


def test_exported_from_the_package():
    assert eqx_embed.RotaryPositionalEmbedding is RotaryPositionalEmbedding
    rope = RotaryPositionalEmbedding(16, max_seq_len=4, rotary_dim=8)
    assert (rope.max_seq_len, rope.rotary_dim, rope.attention_factor) == (4, 8, 1.0)


# Equinox's usage: vmapped over heads


@pytest.mark.parametrize("interleaved", [False, True])
def test_vmap_over_heads_is_one_loop_in_place(interleaved):
    """`jax.vmap(rope, in_axes=1, out_axes=1)` under a vmap over the batch, as
    equinox documents, compiles to one fused loop that reads the queries and writes
    the result, with no temporary buffer (no transposed copy of the queries), and
    gives the direct call's values."""
    rope = RotaryPositionalEmbedding(16, max_seq_len=12, interleaved=interleaved)
    x = random_x((3, 12, 4, 16), seed=1)

    def over_heads(x):
        return jax.vmap(jax.vmap(rope, in_axes=1, out_axes=1))(x)

    compiled = jax.jit(over_heads).lower(x).compile()
    entry = compiled.as_text().split("\nENTRY ")[1]
    assert entry.count(" fusion(") == 1, entry
    assert compiled.memory_analysis().temp_size_in_bytes == 0
    direct = jax.jit(jax.vmap(rope))(x)
    np.testing.assert_allclose(jax.jit(over_heads)(x), direct, **tolerance(np.float32))
    expected = [
        reference_rope(
            example, np.arange(12), theta=rope.theta, interleaved=interleaved
        )
        for example in x
    ]
    np.testing.assert_allclose(over_heads(x), np.stack(expected), atol=1e-6)


@pytest.mark.parametrize("interleaved", [False, True])
def test_exports_for_every_platform(interleaved):
    """The rotation is plain jax.numpy: it lowers for GPU and TPU as well as CPU, and
    the exported program runs here with the direct call's values."""
    rope = RotaryPositionalEmbedding(16, max_seq_len=12, interleaved=interleaved)
    x = random_x((3, 12, 4, 16), seed=5)

    def rotate(x, positions):
        return jax.vmap(lambda x: rope(x, positions=positions))(x)

    exported = jax.export.export(jax.jit(rotate), platforms=("cpu", "cuda", "tpu"))(
        x, jnp.arange(12)
    )
    assert exported.platforms == ("cpu", "cuda", "tpu")
    np.testing.assert_allclose(
        exported.call(x, jnp.arange(12)),
        jax.jit(rotate)(x, jnp.arange(12)),
        **tolerance(np.float32),
    )


def test_vmapped_axes_anywhere_and_vmapped_positions():
    rope = RotaryPositionalEmbedding(8, max_seq_len=10)
    x = random_x((6, 3, 8, 5), seed=2)  # (seq, heads, features, extra)
    # An axis after the features, then one between: each example is (seq, 8).
    rotated = jax.vmap(jax.vmap(rope, in_axes=2, out_axes=2), in_axes=1, out_axes=1)(x)
    per_slice = np.moveaxis(np.asarray(x), 2, -1)  # (seq, heads, extra, features)
    expected = reference_rope(
        per_slice, np.arange(6), theta=rope.theta, rotary_dim=8, interleaved=False
    )
    np.testing.assert_allclose(np.moveaxis(rotated, 2, -1), expected, atol=1e-6)
    # Positions per example batch the tables too.
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]])
    batch = jnp.stack([x[..., 0], x[..., 1]])
    rotated = jax.vmap(lambda x, p: rope(x, positions=p))(batch, positions)
    for example in range(2):
        expected = reference_rope(
            batch[example],
            positions[example],
            theta=rope.theta,
            rotary_dim=8,
            interleaved=False,
        )
        np.testing.assert_allclose(rotated[example], expected, atol=1e-6)


def test_gradients_under_the_heads_vmap_match_float64():
    """The rotation's transpose rotates back; the tables' gradient (through a float
    `RopeRotation`) is the product rule's."""
    rope = RotaryPositionalEmbedding(8, max_seq_len=5)
    x = random_x((5, 3, 8), seed=3)
    weights = random_x((5, 3, 8), seed=4)
    rotation = rope.rotation(5)

    def loss(x, cos, sin):
        rotated = jax.vmap(
            lambda h: eqx.tree_at(lambda r: (r.cos, r.sin), rotation, (cos, sin))(h),
            in_axes=1,
            out_axes=1,
        )(x)
        return jnp.sum(rotated * weights)

    d_x, d_cos, d_sin = jax.grad(loss, argnums=(0, 1, 2))(x, rotation.cos, rotation.sin)
    w = np.asarray(weights, np.float64)
    a, b = np.asarray(x, np.float64)[..., :4], np.asarray(x, np.float64)[..., 4:]
    w1, w2 = w[..., :4], w[..., 4:]
    cos = np.asarray(rotation.cos, np.float64)[:, None]
    sin = np.asarray(rotation.sin, np.float64)[:, None]
    expected_d_x = np.concatenate([w1 * cos + w2 * sin, w2 * cos - w1 * sin], -1)
    np.testing.assert_allclose(d_x, expected_d_x, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d_cos, (w1 * a + w2 * b).sum(1), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_sin, (w2 * a - w1 * b).sum(1), rtol=1e-5, atol=1e-5)
