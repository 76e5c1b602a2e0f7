"""`PositionEmbedding` against transformers' GPT-2 (`wpe`) and OPT (offset 2) on the
same weights, and `SinusoidalPositionalEncoding` against a float64 NumPy reference
written from Vaswani et al.; both under jit and vmap, their out-of-range positions,
and their errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2Model
from transformers.models.opt.modeling_opt import OPTLearnedPositionalEmbedding

import eqx_embed
from eqx_embed import PositionEmbedding, SinusoidalPositionalEncoding


def reference_sinusoids(seq_len, embedding_size, max_wavelength=10_000.0):
    """PE(p, 2i) = sin(p / w ** (2i / d)), PE(p, 2i + 1) = cos(p / w ** (2i / d)),
    one entry at a time in float64, as the paper writes it."""
    table = np.empty((seq_len, embedding_size), dtype=np.float64)
    for p in range(seq_len):
        for j in range(embedding_size):
            angle = p / max_wavelength ** ((j - j % 2) / embedding_size)
            table[p, j] = np.sin(angle) if j % 2 == 0 else np.cos(angle)
    return table


def tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=50, n_positions=24, n_embd=16, n_layer=1, n_head=2)
    return GPT2Model(config).eval()


# Learned positions


def test_gpt2_wpe_on_the_same_weights():
    model = tiny_gpt2()
    weight = jnp.asarray(model.wpe.weight.detach().numpy())
    positions = eqx_embed.PositionEmbedding(weight=weight)
    assert (positions.max_seq_len, positions.embedding_size) == (24, 16)
    ids = np.arange(24)
    theirs = model.wpe(torch.from_numpy(ids)).detach().numpy()
    ours = eqx.filter_jit(lambda m, i: jax.vmap(m)(i))(positions, jnp.asarray(ids))
    # The same rows, read: bit for bit.
    np.testing.assert_array_equal(ours, theirs)
    # Token plus position embeddings, GPT-2's first hidden state.
    tokens = np.random.default_rng(0).integers(0, 50, size=20)
    tokens_embedding = eqx_embed.Embedding(
        weight=jnp.asarray(model.wte.weight.detach().numpy())
    )
    with torch.no_grad():
        hidden = model(
            torch.from_numpy(tokens)[None], output_hidden_states=True
        ).hidden_states[0][0]
    ours = jax.vmap(tokens_embedding)(jnp.asarray(tokens)) + jax.vmap(positions)(
        jnp.arange(20)
    )
    np.testing.assert_array_equal(ours, hidden.numpy())


def test_opt_offset_of_two_on_the_same_weights():
    torch.manual_seed(1)
    theirs = OPTLearnedPositionalEmbedding(12, 8)
    positions = PositionEmbedding(
        weight=jnp.asarray(theirs.weight.detach().numpy()), offset=2
    )
    assert positions.max_seq_len == 12 and positions.weight.shape == (14, 8)
    # A left-padded batch: OPT derives the positions from the attention mask.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    expected = theirs(mask).detach().numpy()
    position_ids = np.cumsum(mask.numpy(), axis=1) * mask.numpy() - 1
    got = jax.vmap(jax.vmap(positions))(jnp.asarray(position_ids[:, 2:]))
    np.testing.assert_array_equal(got[0], expected[0, 2:])
    np.testing.assert_array_equal(
        jax.vmap(positions)(jnp.asarray(position_ids[1])), expected[1]
    )


def test_new_table_is_drawn_by_init_and_trained():
    positions = PositionEmbedding(64, 32, key=jax.random.key(0), offset=1)
    assert positions.weight.shape == (65, 32) and positions.weight.dtype == np.float32
    assert abs(float(jnp.std(positions.weight)) - 0.02) < 0.002
    custom = PositionEmbedding(
        4, 3, key=jax.random.key(1), init=jax.nn.initializers.ones
    )
    np.testing.assert_array_equal(custom.weight, np.ones((4, 3)))
    # A parameter like any other: the rows read get gradients, the others none.
    grads = eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(jnp.array([0, 2, 2]))))(
        positions
    )
    expected = np.zeros((65, 32))
    expected[1], expected[3] = 1.0, 2.0
    np.testing.assert_array_equal(grads.weight, expected)


def test_compute_and_param_dtypes():
    weight = jax.random.normal(jax.random.key(2), (6, 4))
    positions = PositionEmbedding(
        weight=weight, dtype=jnp.bfloat16, param_dtype=jnp.float32
    )
    row = positions(3)
    assert row.dtype == jnp.bfloat16
    np.testing.assert_array_equal(row, weight[3].astype(jnp.bfloat16))


@pytest.mark.parametrize("wrap", ["eager", "jit", "vmap"])
def test_out_of_range_positions_read_nan_never_a_clamp_or_the_offset_rows(wrap):
    weight = jax.random.normal(jax.random.key(3), (6, 4))
    positions = PositionEmbedding(weight=weight, offset=2)  # 4 positions
    ids = jnp.array([0, 3, 4, -1, -2, 2**30])
    lookup = {
        "eager": lambda: jnp.stack([positions(int(i)) for i in ids]),
        "jit": lambda: eqx.filter_jit(lambda m, i: jax.vmap(m)(i))(positions, ids),
        "vmap": lambda: jax.vmap(positions)(ids),
    }[wrap]
    got = np.asarray(lookup())
    np.testing.assert_array_equal(got[:2], weight[np.array([2, 5])])
    assert np.isnan(got[2:]).all()


@pytest.mark.parametrize("wrap", ["eager", "jit", "vmap"])
def test_error_policy_names_the_position(wrap):
    positions = PositionEmbedding(4, 2, key=jax.random.key(0), out_of_range="error")
    ids = jnp.array([1, 4])
    lookup = {
        "eager": lambda: positions(4),
        "jit": lambda: eqx.filter_jit(lambda m, i: m(i))(positions, ids[1]),
        "vmap": lambda: jax.vmap(positions)(ids),
    }[wrap]
    with pytest.raises(Exception, match="position 4 is out of range .* 4 rows"):
        jax.block_until_ready(lookup())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(max_seq_len=4), "needs either `weight=...` or all of"),
        (
            dict(max_seq_len=0, embedding_size=2),
            "max_seq_len must be a positive integer",
        ),
        (dict(weight=jnp.zeros((3, 2)), offset=3), r"shape \(3, 2\) with offset=3"),
        (dict(weight=jnp.zeros((5, 2)), max_seq_len=4), "holds max_seq_len=5"),
        (dict(weight=jnp.zeros((5, 2)), offset=-1), "offset must be a non-negative"),
        (
            dict(max_seq_len=2, embedding_size=2, init=lambda k, s, d: jnp.zeros(3)),
            r"init returned shape \(3,\), expected \(2, 2\)",
        ),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PositionEmbedding(key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("module", ["learned", "sinusoidal"])
@pytest.mark.parametrize("position", [jnp.array([1, 2]), jnp.array(1.0), 1.5])
def test_a_position_that_is_not_one_integer_is_a_clear_error(module, position):
    positions = (
        PositionEmbedding(4, 2, key=jax.random.key(0))
        if module == "learned"
        else SinusoidalPositionalEncoding(2, max_seq_len=4)
    )
    with pytest.raises(jaxtyping.TypeCheckError, match="position"):
        positions(position)


# Sinusoidal encodings


@pytest.mark.parametrize("embedding_size", [1, 7, 16])
@pytest.mark.parametrize("max_wavelength", [10_000, 50.0])
def test_sinusoids_match_the_float64_reference(embedding_size, max_wavelength):
    expected = reference_sinusoids(40, embedding_size, max_wavelength)
    stored = SinusoidalPositionalEncoding(
        embedding_size, max_seq_len=40, max_wavelength=max_wavelength
    )
    traced = SinusoidalPositionalEncoding(embedding_size, max_wavelength=max_wavelength)
    # Cast once from float64: within one float32 rounding of the reference.
    tolerance = np.finfo(np.float32).eps
    for got in (
        stored.encodings(40),
        traced.encodings(40),
        eqx.filter_jit(lambda m: m.encodings(40))(traced),
        eqx.filter_jit(lambda m, i: jax.vmap(m)(i))(stored, jnp.arange(40)),
    ):
        assert got.dtype == np.float32 and got.shape == (40, embedding_size)
        np.testing.assert_allclose(got, expected, rtol=0, atol=tolerance)


def test_sinusoids_in_float64_and_bfloat16_are_cast_once():
    expected = reference_sinusoids(300, 32)
    with jax.enable_x64(True):
        encoding = SinusoidalPositionalEncoding(32, max_seq_len=300)
        assert encoding.table_bits.dtype == np.uint64
        np.testing.assert_allclose(encoding.encodings(300), expected, atol=1e-14)
    low = SinusoidalPositionalEncoding(32, max_seq_len=300, dtype=jnp.bfloat16)
    # bfloat16 rounding of values that agree to 1e-14 can only differ at a tie.
    np.testing.assert_allclose(
        low.encodings(300).astype(np.float32),
        expected.astype(jnp.bfloat16).astype(np.float32),
        atol=float(jnp.finfo(jnp.bfloat16).eps),
    )


def test_sinusoids_are_never_trained_and_built_at_trace_time_once():
    encoding = SinusoidalPositionalEncoding(8, max_seq_len=16)
    assert jax.tree.leaves(eqx.filter(encoding, eqx.is_inexact_array)) == []
    grads = eqx.filter_grad(lambda m, x: jnp.sum(x * m.encodings(16)))(
        encoding, jnp.ones((16, 8))
    )
    assert grads.table_bits is None
    # Without max_seq_len: a constant of the program, no sine computed per call.
    traced = SinusoidalPositionalEncoding(8)
    jaxpr = jax.make_jaxpr(lambda x: x + traced.encodings(12))(jnp.ones((12, 8)))
    primitives = {equation.primitive.name for equation in jaxpr.jaxpr.eqns}
    assert not primitives & {"sin", "cos"}, primitives
    assert jax.tree.leaves(traced) == []


def test_settings_that_differ_never_share_encodings():
    """Instances compare by what decides their rows, so one jitted function gives
    each its own."""
    add = eqx.filter_jit(lambda m, x: x + m.encodings(x.shape[0]))
    x = jnp.zeros((10, 6))
    for max_wavelength in (10_000, 100):
        np.testing.assert_allclose(
            add(SinusoidalPositionalEncoding(6, max_wavelength=max_wavelength), x),
            reference_sinusoids(10, 6, max_wavelength),
            atol=np.finfo(np.float32).eps,
        )


def test_sinusoid_lengths_and_positions_out_of_range():
    encoding = SinusoidalPositionalEncoding(4, max_seq_len=8)
    with pytest.raises(ValueError, match="seq_len=9 is more than the max_seq_len=8"):
        encoding.encodings(9)
    got = np.asarray(jax.vmap(encoding)(jnp.array([7, 8, -1])))
    np.testing.assert_allclose(got[0], reference_sinusoids(8, 4)[7], atol=1e-7)
    assert np.isnan(got[1:]).all()
    strict = SinusoidalPositionalEncoding(4, max_seq_len=8, out_of_range="error")
    with pytest.raises(ValueError, match="position -1 is out of range"):
        strict(-1)
    with pytest.raises(ValueError, match="per-position call reads a stored table"):
        SinusoidalPositionalEncoding(4)(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(embedding_size=0), "embedding_size must be a positive integer"),
        (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
        (dict(max_wavelength=1), "max_wavelength must be greater than 1"),
        (dict(dtype=jnp.int32), "dtype must be a floating dtype"),
    ],
)
def test_bad_sinusoid_construction_is_a_clear_error(kwargs, message):
    kwargs = {"embedding_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        SinusoidalPositionalEncoding(kwargs.pop("embedding_size"), **kwargs)


def test_exported_from_the_package():
    assert eqx_embed.nn.PositionEmbedding is PositionEmbedding
    assert eqx_embed.nn.SinusoidalPositionalEncoding is SinusoidalPositionalEncoding
