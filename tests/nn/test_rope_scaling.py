"""Every Hugging Face RoPE scaling rule against `transformers` itself (torch CPU):
`LlamaRotaryEmbedding` and `apply_rotary_pos_emb` on locally built configs, and the
rules' own inverse frequencies; and the errors for bad scaling dicts."""

import copy
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from _tolerances import tolerance
from transformers import GPTNeoXConfig, LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox
from transformers.models.llama import modeling_llama

import eqx_embed
from eqx_embed.nn._rope_scaling import inverse_frequencies, parse_scaling

ORIGINAL = 32  # the original (pretraining) context of the scaled configs below
HEADS = 2

# (scaling dict in our spelling, max_seq_len). Our spelling puts in the dict what
# transformers reads from the model config; `hf_config` moves it back.
SCALINGS = {
    "default": ({}, 48),
    "linear": ({"factor": 4.0}, 48),
    "dynamic, grown": ({"factor": 2.0, "original_max_position_embeddings": 32}, 80),
    "dynamic, within": ({"factor": 2.0, "original_max_position_embeddings": 32}, 24),
    "yarn": ({"factor": 4.0, "original_max_position_embeddings": ORIGINAL}, 128),
    "yarn, betas, no truncate": (
        {
            "factor": 8.0,
            "original_max_position_embeddings": ORIGINAL,
            "beta_fast": 16,
            "beta_slow": 2,
            "truncate": False,
        },
        64,
    ),
    "yarn, mscale": (
        {
            "factor": 16.0,
            "original_max_position_embeddings": ORIGINAL,
            "mscale": 1.0,
            "mscale_all_dim": 0.8,
        },
        64,
    ),
    "yarn, attention_factor": (
        {
            "factor": 2.0,
            "original_max_position_embeddings": ORIGINAL,
            "attention_factor": 1.3,
        },
        64,
    ),
    "yarn, factor from lengths": (
        {
            "factor": None,
            "original_max_position_embeddings": ORIGINAL,
            "max_position_embeddings": 4 * ORIGINAL,
        },
        64,
    ),
    "longrope, short": ({"factor": 4.0, "original_max_position_embeddings": 32}, 32),
    "longrope, long": ({"factor": 4.0, "original_max_position_embeddings": 32}, 96),
    "longrope, factor from lengths": (
        {"original_max_position_embeddings": 32, "max_position_embeddings": 256},
        96,
    ),
    "longrope, attention_factor": (
        {
            "factor": 4.0,
            "original_max_position_embeddings": 32,
            "attention_factor": 1.1,
        },
        40,
    ),
    "llama3": (
        {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        96,
    ),
}


def rope_type_of(name):
    return name.split(",")[0]


def with_longrope_factors(scaling, name, head_dim):
    if rope_type_of(name) != "longrope":
        return scaling
    rng = np.random.default_rng(len(name))
    half = head_dim // 2
    return {
        **scaling,
        "short_factor": rng.uniform(1.0, 2.0, half).tolist(),
        "long_factor": rng.uniform(2.0, 8.0, half).tolist(),
    }


def hf_config(name, scaling, *, key, theta, head_dim, max_seq_len, config_class=None):
    """The transformers config that our `scaling` stands for."""
    parameters = copy.deepcopy(scaling)
    max_position_embeddings = parameters.pop("max_position_embeddings", max_seq_len)
    if rope_type_of(name) == "dynamic":
        # transformers reads dynamic's original length from the model config.
        max_position_embeddings = parameters.pop("original_max_position_embeddings")
    parameters[key] = rope_type_of(name)
    parameters["rope_theta"] = theta
    return (config_class or LlamaConfig)(
        hidden_size=HEADS * head_dim,
        num_attention_heads=HEADS,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rope_parameters=parameters,
    )


def hf_cos_sin_and_rotation(config, q, k, max_seq_len, module=modeling_llama):
    rotary = (
        module.LlamaRotaryEmbedding(config)
        if module is modeling_llama
        else module.GPTNeoXRotaryEmbedding(config)
    )
    positions = torch.arange(max_seq_len)[None]
    # (batch, heads, seq, head_dim), transformers' layout.
    q_torch = torch.from_numpy(q).permute(1, 0, 2)[None]
    k_torch = torch.from_numpy(k).permute(1, 0, 2)[None]
    cos, sin = rotary(q_torch, positions)
    q_rot, k_rot = module.apply_rotary_pos_emb(q_torch, k_torch, cos, sin)
    return (
        cos[0].numpy(),
        sin[0].numpy(),
        rotary.attention_scaling,
        q_rot[0].permute(1, 0, 2).numpy(),
        k_rot[0].permute(1, 0, 2).numpy(),
    )


def random_queries_and_keys(max_seq_len, head_dim, seed=0):
    rng = np.random.default_rng(seed)
    shape = (max_seq_len, HEADS, head_dim)
    return (
        rng.normal(size=shape).astype(np.float32),
        rng.normal(size=shape).astype(np.float32),
    )


def angle_tolerance(max_seq_len):
    """transformers computes `position * inv_freq` in float32: about 2 ulps of the
    largest angle, which is below `max_seq_len` radians."""
    return 4 * max_seq_len * np.finfo(np.float32).eps + 1e-6


@pytest.mark.parametrize("name", list(SCALINGS))
@pytest.mark.parametrize("key", ["rope_type", "type"])
@pytest.mark.parametrize(("theta", "head_dim"), [(10_000.0, 16), (500_000.0, 64)])
def test_matches_transformers_llama(name, key, theta, head_dim):
    scaling, max_seq_len = SCALINGS[name]
    scaling = with_longrope_factors(scaling, name, head_dim)
    config = hf_config(
        name, scaling, key=key, theta=theta, head_dim=head_dim, max_seq_len=max_seq_len
    )
    q, k = random_queries_and_keys(max_seq_len, head_dim)
    cos, sin, attention_scaling, q_hf, k_hf = hf_cos_sin_and_rotation(
        config, q, k, max_seq_len
    )

    rope = eqx_embed.RotaryPositionalEmbedding(
        head_dim,
        max_seq_len=max_seq_len,
        theta=theta,
        scaling={key: rope_type_of(name), **scaling},
    )
    assert rope.attention_factor == pytest.approx(attention_scaling, rel=1e-15)
    tolerance = angle_tolerance(max_seq_len) * max(1.0, attention_scaling)
    half = head_dim // 2
    for ours, theirs in [(rope.cos, cos), (rope.sin, sin)]:
        np.testing.assert_allclose(ours, theirs[:, :half], rtol=0, atol=tolerance)
        np.testing.assert_allclose(ours, theirs[:, half:], rtol=0, atol=tolerance)
    # |q| <= about 5 per feature, two terms.
    np.testing.assert_allclose(rope(jnp.asarray(q)), q_hf, atol=10 * tolerance)
    np.testing.assert_allclose(rope(jnp.asarray(k)), k_hf, atol=10 * tolerance)


@pytest.mark.parametrize("name", list(SCALINGS))
def test_inverse_frequencies_match_transformers_rules(name):
    """The rule itself, without the float32 angles: transformers' float32 inverse
    frequencies agree with ours to float32 precision."""
    scaling, max_seq_len = SCALINGS[name]
    head_dim, theta = 32, 20_000.0
    scaling = with_longrope_factors(scaling, name, head_dim)
    config = hf_config(
        name,
        scaling,
        key="rope_type",
        theta=theta,
        head_dim=head_dim,
        max_seq_len=max_seq_len,
    )
    rope_type = rope_type_of(name)
    if rope_type == "default":
        theirs, factor = (
            modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(config)
        )
    else:
        # The length of the sequence that the tables are for, as
        # LlamaRotaryEmbedding passes it for the rules that depend on it.
        seq_len = max_seq_len if rope_type in ("dynamic", "longrope") else None
        theirs, factor = ROPE_INIT_FUNCTIONS[rope_type](config, seq_len=seq_len)
    ours, our_factor = inverse_frequencies(
        parse_scaling({"rope_type": rope_type, **scaling}),
        rotary_dim=head_dim,
        theta=theta,
        max_seq_len=max_seq_len,
    )
    assert ours.dtype == np.float64
    # transformers computes in float32 (a power, a division and the rule's scaling:
    # a few roundings, by PyTorch's vectorised math, which differs across CPUs).
    np.testing.assert_allclose(
        ours, theirs.double().numpy(), rtol=tolerance(np.float32, 8)["rtol"]
    )
    assert our_factor == pytest.approx(factor, rel=1e-15)


def test_longrope_picks_the_factors_by_max_seq_len():
    """Short factors up to the original context, long ones beyond: the two tables
    really differ, and each matches its transformers counterpart above."""
    scaling = with_longrope_factors(
        {
            "rope_type": "longrope",
            "factor": 4.0,
            "original_max_position_embeddings": 32,
        },
        "longrope",
        16,
    )
    short = eqx_embed.RotaryPositionalEmbedding(16, max_seq_len=32, scaling=scaling)
    long = eqx_embed.RotaryPositionalEmbedding(16, max_seq_len=33, scaling=scaling)
    expected_long = 1.0 / (
        np.asarray(scaling["long_factor"]) * 10_000.0 ** (np.arange(0, 16, 2) / 16)
    )
    np.testing.assert_allclose(
        np.arctan2(long.sin[1], long.cos[1]),
        expected_long,
        rtol=tolerance(np.float32, 8)["rtol"],  # float32 tables, then arctan2
    )
    assert not np.allclose(short.cos[1], long.cos[1])


@pytest.mark.parametrize(
    ("scaling", "rotary_dim"),
    [
        ({"rope_type": "default", "partial_rotary_factor": 0.25}, 16),
        ({"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}, 32),
    ],
)
def test_partial_rotary_matches_transformers_gpt_neox(scaling, rotary_dim):
    head_dim, max_seq_len, theta = 64, 40, 10_000.0
    parameters = {**scaling, "rope_theta": theta}
    config = GPTNeoXConfig(
        hidden_size=HEADS * head_dim,
        num_attention_heads=HEADS,
        max_position_embeddings=max_seq_len,
        rope_parameters=copy.deepcopy(parameters),
    )
    q, k = random_queries_and_keys(max_seq_len, head_dim, seed=1)
    cos, sin, _, q_hf, k_hf = hf_cos_sin_and_rotation(
        config, q, k, max_seq_len, module=modeling_gpt_neox
    )
    assert cos.shape[-1] == rotary_dim
    rope = eqx_embed.RotaryPositionalEmbedding(
        head_dim, max_seq_len=max_seq_len, theta=theta, scaling=parameters
    )
    assert rope.rotary_dim == rotary_dim
    tolerance = angle_tolerance(max_seq_len)
    np.testing.assert_allclose(rope.cos, cos[:, : rotary_dim // 2], atol=tolerance)
    np.testing.assert_allclose(rope(jnp.asarray(q)), q_hf, atol=10 * tolerance)
    np.testing.assert_allclose(rope(jnp.asarray(k)), k_hf, atol=10 * tolerance)
    np.testing.assert_array_equal(
        rope(jnp.asarray(q))[..., rotary_dim:], q[..., rotary_dim:]
    )


def test_yarn_attention_factor_formulas():
    """The three ways yarn gets its attention factor, against the paper's formula."""

    def factor_of(**extra):
        scaling = {"rope_type": "yarn", "original_max_position_embeddings": 32}
        return eqx_embed.RotaryPositionalEmbedding(
            8, max_seq_len=8, scaling={**scaling, **extra}
        ).attention_factor

    assert factor_of(factor=4.0) == pytest.approx(0.1 * math.log(4.0) + 1)
    assert factor_of(factor=4.0, mscale=2.0, mscale_all_dim=1.0) == pytest.approx(
        (0.2 * math.log(4.0) + 1) / (0.1 * math.log(4.0) + 1)
    )
    assert factor_of(factor=4.0, attention_factor=0.5) == 0.5
    assert factor_of(factor=1.0) == 1.0


# Bad scaling dicts


@pytest.mark.parametrize(
    ("scaling", "message"),
    [
        ({"rope_type": "ntk-by-parts"}, "Unknown RoPE scaling type 'ntk-by-parts'"),
        ({"type": "su"}, "Unknown RoPE scaling type 'su'"),
        ({"rope_type": "linear"}, r"'linear' is missing \['factor'\]"),
        ({"type": "dynamic", "factor": 2.0}, "missing.*original_max_position_emb"),
        ({"rope_type": "yarn", "factor": 2.0}, "missing.*original_max_position_emb"),
        (
            {"rope_type": "longrope", "original_max_position_embeddings": 8},
            r"missing \['long_factor', 'short_factor'\]",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "original_max_position_embeddings": 8,
            },
            r"missing \['high_freq_factor', 'low_freq_factor'\]",
        ),
        ({"rope_type": "linear", "factor": 2.0, "facter": 3}, r"does not use.*facter"),
        ({"factor": 2.0}, r"'default' has keys it does not use: \['factor'\]"),
        ({"rope_type": "linear", "type": "yarn", "factor": 2.0}, "names two rules"),
        ({"rope_type": "linear", "factor": -2.0}, r"factor'\] must be a positive"),
        ({"rope_type": "linear", "factor": "2"}, r"factor'\] must be a positive"),
        (
            {
                "rope_type": "yarn",
                "factor": None,
                "original_max_position_embeddings": 8,
            },
            "needs `factor`, or `max_position_embeddings`",
        ),
        (
            {
                "rope_type": "longrope",
                "factor": 2.0,
                "original_max_position_embeddings": 8,
                "short_factor": [1.0] * 4,
                "long_factor": [1.0] * 3,
            },
            r"long_factor'\] must be a list of rotary_dim // 2 = 4 numbers",
        ),
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 4.0,
                "high_freq_factor": 1.0,
                "original_max_position_embeddings": 8,
            },
            "high_freq_factor'\\] must be greater",
        ),
        ({"rope_theta": 500.0}, r"rope_theta'\]=500.0 disagrees with theta=10000.0"),
        ({"partial_rotary_factor": 0.5}, "rotary_dim=8 disagrees with"),
        ({"partial_rotary_factor": "half"}, "must be a positive finite number"),
    ],
)
def test_bad_scaling_is_a_clear_error(scaling, message):
    with pytest.raises(ValueError, match=message):
        eqx_embed.RotaryPositionalEmbedding(
            8, max_seq_len=4, rotary_dim=8, scaling=scaling
        )


def test_scaling_that_is_not_a_dict_is_a_clear_error():
    # The type annotation catches it where the contracts are on (as under pytest),
    # the constructor's own check everywhere else.
    with pytest.raises((TypeError, ValueError), match="scaling"):
        eqx_embed.RotaryPositionalEmbedding(
            8, max_seq_len=4, scaling=[("rope_type", "linear")]
        )


def test_dynamic_needs_more_than_two_rotary_features():
    with pytest.raises(ValueError, match="'dynamic' needs rotary_dim > 2"):
        eqx_embed.RotaryPositionalEmbedding(
            2,
            max_seq_len=4,
            scaling={
                "rope_type": "dynamic",
                "factor": 2.0,
                "original_max_position_embeddings": 2,
            },
        )


def test_theta_and_partial_rotary_factor_from_the_dict_when_they_agree():
    rope = eqx_embed.RotaryPositionalEmbedding(
        64,
        max_seq_len=4,
        theta=500.0,
        scaling={
            "rope_type": "default",
            "rope_theta": 500,
            "partial_rotary_factor": 0.5,
        },
    )
    assert (rope.theta, rope.rotary_dim, rope.rope_type) == (500.0, 32, "default")


@pytest.mark.parametrize(
    "parameters",
    [
        {"partial_rotary_factor": 0.25},
        {"partial_rotary_factor": 0.5, "factor": 8.0},
        {"factor": 2.0},
        {},
    ],
)
@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_proportional_matches_transformers(parameters, key):
    """Gemma 4's rule: every feature rotates, the first pairs at the frequencies of a
    full rotation and the rest at frequency zero, all divided by `factor`."""
    head_dim, max_seq_len, theta = 32, 40, 10_000.0
    config = LlamaConfig(
        hidden_size=HEADS * head_dim,
        num_attention_heads=HEADS,
        head_dim=head_dim,
        max_position_embeddings=max_seq_len,
        rope_parameters={
            "rope_type": "proportional",
            "rope_theta": theta,
            **copy.deepcopy(parameters),
        },
    )
    theirs, factor = ROPE_INIT_FUNCTIONS["proportional"](config)
    scaling = {key: "proportional", **parameters}
    ours, our_factor = inverse_frequencies(
        parse_scaling(scaling), rotary_dim=head_dim, theta=theta, max_seq_len=1
    )
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=4e-7, atol=0)
    assert our_factor == factor == 1.0
    rotated = int(parameters.get("partial_rotary_factor", 1.0) * head_dim // 2)
    assert (ours[rotated:] == 0).all() and (ours[:rotated] > 0).all()

    q, k = random_queries_and_keys(max_seq_len, head_dim, seed=2)
    _, _, _, q_hf, k_hf = hf_cos_sin_and_rotation(config, q, k, max_seq_len)
    rope = eqx_embed.RotaryPositionalEmbedding(
        head_dim, theta, max_seq_len=max_seq_len, scaling=scaling
    )
    assert rope.rotary_dim == head_dim and rope.rope_type == "proportional"
    tolerance = angle_tolerance(max_seq_len)
    np.testing.assert_allclose(rope(jnp.asarray(q)), q_hf, atol=10 * tolerance)
    np.testing.assert_allclose(rope(jnp.asarray(k)), k_hf, atol=10 * tolerance)
    # The pairs at frequency zero pass through exactly.
    half = head_dim // 2
    unrotated = np.r_[rotated:half, half + rotated : head_dim]
    np.testing.assert_array_equal(
        rope(jnp.asarray(q))[..., unrotated], q[..., unrotated]
    )


def test_proportional_rotary_factor_above_one_is_a_clear_error():
    with pytest.raises(ValueError, match="partial_rotary_factor'] must be at most 1"):
        eqx_embed.RotaryPositionalEmbedding(
            8,
            max_seq_len=4,
            scaling={"rope_type": "proportional", "partial_rotary_factor": 1.5},
        )
