"""`TransformerConfig` and `TransformerLM` against a plain float64 NumPy transformer,
and their contracts: tying, untrained RoPE tables, the layer scan, input checks."""

import dataclasses
import json
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import tolerance
from jaxtyping import TypeCheckError

from eqx_embed import ReversibleEmbedding, TransformerConfig, TransformerLM

VOCAB = 40
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    max_position_embeddings=24,
)
CONFIGS = {
    "llama": TransformerConfig("llama", **SMALL, num_kv_heads=2, rope_theta=500.0),
    "gemma2": TransformerConfig(
        "gemma2",
        **SMALL,
        num_kv_heads=1,
        head_dim=16,
        sliding_window=3,
        attention_logit_soft_cap=2.0,
        final_logit_soft_cap=3.0,
        query_pre_attn_scalar=10,
    ),
    "gpt_neox": TransformerConfig(
        "gpt_neox", **SMALL, tie_word_embeddings=False, partial_rotary_factor=0.5
    ),
    # Structure flags set explicitly, in a combination no family presets.
    "llama-restructured": TransformerConfig(
        "llama",
        **SMALL,
        norm="layer",
        norm_eps=1e-3,
        scale_embeddings=True,
        sandwich_norms=True,
        parallel_residual=True,
        mlp_bias=True,
    ),
}


def perturbed(model: TransformerLM, seed: int = 1) -> TransformerLM:
    """Norm scales and biases away from their identity initialisation, so that the
    reference comparison covers them."""
    leaves, structure = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        leaf + 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        if eqx.is_inexact_array(leaf) and leaf.ndim <= 2 and leaf.shape[-1] != VOCAB
        else leaf
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(structure, leaves)


@pytest.fixture(scope="module")
def models() -> dict[str, TransformerLM]:
    return {
        name: perturbed(TransformerLM(config, key=jax.random.key(0)))
        for name, config in CONFIGS.items()
    }


def reference_logits(
    model: TransformerLM, tokens: np.ndarray, positions: np.ndarray | None = None
) -> np.ndarray:
    """The model's logits, written out plainly in float64 NumPy."""
    config = model.config

    def f64(array):
        return np.asarray(array, dtype=np.float64)

    seq = len(tokens)
    positions = np.arange(seq) if positions is None else positions
    rotary = config.rotary_dim
    frequencies = config.rope_theta ** -(np.arange(0, rotary, 2) / rotary)
    angles = positions[:, None] * frequencies
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def rope(v):  # (seq, heads, head_dim), half-split pairs
        first, second = v[..., : rotary // 2], v[..., rotary // 2 : rotary]
        return np.concatenate(
            [first * cos - second * sin, second * cos + first * sin, v[..., rotary:]],
            axis=-1,
        )

    def norm(module, x, layer=None):
        def pick(a):
            return f64(a) if layer is None else f64(a)[layer]

        eps = config.norm_eps
        if config.norm == "layer":
            centred = x - x.mean(-1, keepdims=True)
            normalised = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + eps)
            return normalised * pick(module.weight) + pick(module.bias)
        offset = 1.0 if config.norm == "rms_unit_offset" else 0.0
        scale = pick(module.weight) + offset
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale

    def linear(module, x, layer):
        y = x @ f64(module.weight)[layer].T
        return y if module.bias is None else y + f64(module.bias)[layer]

    def gelu(x):
        if config.hidden_act == "gelu":
            return 0.5 * x * (1 + np.vectorize(math.erf)(x / np.sqrt(2)))
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    def act(x):
        return x / (1 + np.exp(-x)) if config.hidden_act == "silu" else gelu(x)

    def feed_forward(h, layer):
        mlp = model.blocks.mlp
        if mlp.gate is None:
            return linear(mlp.down, act(linear(mlp.up, h, layer)), layer)
        inner = act(linear(mlp.gate, h, layer)) * linear(mlp.up, h, layer)
        return linear(mlp.down, inner, layer)

    x = f64(model.embedding.weight)[tokens]
    if config.scale_embeddings:
        x = x * np.sqrt(config.hidden_size)
    blocks = model.blocks
    heads, kv_heads, head_dim = config.num_heads, config.num_kv_heads, config.head_dim
    for layer, window in enumerate(config.layer_windows):
        attention = blocks.attention
        h = norm(blocks.attention_norm, x, layer)
        q = rope(linear(attention.query_proj, h, layer).reshape(seq, heads, head_dim))
        k = rope(linear(attention.key_proj, h, layer).reshape(seq, kv_heads, head_dim))
        v = linear(attention.value_proj, h, layer).reshape(seq, kv_heads, head_dim)
        k = np.repeat(k, heads // kv_heads, axis=1)
        v = np.repeat(v, heads // kv_heads, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k)
        scores /= np.sqrt(config.query_pre_attn_scalar or head_dim)
        if config.attention_logit_soft_cap:
            cap = config.attention_logit_soft_cap
            scores = cap * np.tanh(scores / cap)
        i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
        allowed = (j <= i) & ((window is None) | (i - j < (window or 0)))
        scores = np.where(allowed, scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = np.einsum("hqk,khd->qhd", weights, v).reshape(seq, -1)
        attended = linear(attention.output_proj, attended, layer)
        if blocks.attention_output_norm is not None:
            attended = norm(blocks.attention_output_norm, attended, layer)
        if config.parallel_residual:
            x = x + attended + feed_forward(norm(blocks.mlp_norm, x, layer), layer)
            continue
        x = x + attended
        transformed = feed_forward(norm(blocks.mlp_norm, x, layer), layer)
        if blocks.mlp_output_norm is not None:
            transformed = norm(blocks.mlp_output_norm, transformed, layer)
        x = x + transformed
    x = norm(model.final_norm, x)
    table = model.embedding.reverse_embedding or model.embedding.embedding
    logits = x @ f64(table.weight).T
    if config.final_logit_soft_cap:
        cap = config.final_logit_soft_cap
        logits = cap * np.tanh(logits / cap)
    return logits


TOKENS = np.random.default_rng(0).integers(0, VOCAB, size=12)
# Two programs of the same model (jit and eager, scanned and unrolled, tied and
# untied) round differently. An output's chain of roundings: per layer, sums over
# the hidden size (projections, norm), the sequence (attention) and the
# intermediate size (MLP), then the decode's sum over the hidden size; the terms
# are of order one after each norm.
SAME_MODEL = tolerance(
    np.float32, SMALL["num_layers"] * (3 * 32 + 12 + 48) + 32, scale=4.0
)


# --- The config -----------------------------------------------------------------


def test_config_is_json_able_hashable_and_round_trips():
    config = TransformerConfig(
        "llama",
        **SMALL,
        rope_scaling=dict(rope_type="linear", factor=2.0),
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=4,
    )
    values = json.loads(json.dumps(config.to_dict()))
    assert values["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    again = TransformerConfig.from_dict(values)
    assert again == config and hash(again) == hash(config)
    assert config.layer_windows == (4, None)
    with pytest.raises(ValueError, match=r"Unknown TransformerConfig keys \['heads'\]"):
        TransformerConfig.from_dict({**values, "heads": 3})


def test_family_defaults_are_resolved():
    neox = TransformerConfig("gpt_neox", **SMALL)
    assert (neox.norm_eps, neox.hidden_act, neox.partial_rotary_factor) == (
        1e-5,
        "gelu",
        0.25,
    )
    assert neox.attention_bias and neox.mlp_bias and neox.parallel_residual
    gemma = TransformerConfig("gemma", **SMALL)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.num_kv_heads == 4
    assert TransformerConfig("qwen2", **SMALL).attention_bias
    gemma2 = TransformerConfig("gemma2", **{**SMALL, "num_layers": 3}, sliding_window=5)
    assert gemma2.layer_windows == (5, None, 5)
    mistral = TransformerConfig("mistral", **SMALL, sliding_window=5)
    assert mistral.layer_windows == (5, 5)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(family="opt"), "family"),
        (dict(num_kv_heads=3), r"num_heads \(4\) must be a multiple of num_kv_heads"),
        (dict(hidden_size=30), r"hidden_size \(30\) must be a multiple of num_heads"),
        (dict(hidden_act="tanh"), "hidden_act must be one of"),
        (dict(vocab_size=0), "vocab_size must be a positive integer, got 0"),
        (dict(layer_types=["full_attention"]), "layer_types must list 2"),
        # A string, not its characters.
        (dict(layer_types="full_attention"), "got the string 'full_attention'"),
        (dict(layer_types=["sliding_attention"] * 2), "sliding_window is None"),
        (dict(partial_rotary_factor=0.1), "rotary width of 0"),
        (dict(norm="batch"), "norm"),
        (dict(rope_theta=float("nan")), "rope_theta must be a positive finite"),
        (dict(norm_eps=float("inf")), "norm_eps must be a positive finite"),
        (dict(max_position_embeddings=10**9), r"RoPE tables of 59\.6 GiB"),
        (dict(activation_dtype="int32"), "activation_dtype must name a floating"),
        (dict(out_of_range="clip"), "out_of_range"),
        (dict(scan_unroll=0), "scan_unroll must be a positive integer, got 0"),
    ],
)
def test_config_validation(changes, message):
    # Literal-typed fields are caught by the annotation check first, under pytest.
    with pytest.raises((ValueError, TypeCheckError), match=message):
        TransformerConfig(**{"family": "llama", **SMALL, **changes})


# --- The forward pass against the float64 reference -----------------------------


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_float64_reference(name, models):
    model = models[name]
    expected = reference_logits(model, TOKENS)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(model(jnp.asarray(TOKENS)), expected, atol=1e-4)
    positions = np.arange(12) * 2 + 1
    np.testing.assert_allclose(
        model(jnp.asarray(TOKENS), token_positions=jnp.asarray(positions)),
        reference_logits(model, TOKENS, positions),
        atol=1e-4,
    )


def with_settings(model: TransformerLM, **changes) -> TransformerLM:
    """`model`'s weights under a config that differs in static settings only."""
    config = dataclasses.replace(model.config, **changes)
    skeleton = eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))
    return jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(model))


def test_bfloat16_activations_stay_close_to_the_reference(models):
    model = models["gemma2"]
    low = with_settings(model, activation_dtype="bfloat16")
    logits = low(jnp.asarray(TOKENS))
    assert logits.dtype == jnp.bfloat16
    expected = reference_logits(model, TOKENS)
    error = np.abs(np.asarray(logits, np.float64) - expected).max()
    assert error < 0.05 * np.abs(expected).max()


def test_batching_and_jit_match_single_calls(models):
    model = models["llama"]
    batch = np.stack([TOKENS, TOKENS[::-1]])
    batched = eqx.filter_jit(jax.vmap(model.__call__))(jnp.asarray(batch))
    for row, tokens in zip(batched, batch, strict=True):
        np.testing.assert_allclose(row, model(jnp.asarray(tokens)), **SAME_MODEL)


def test_a_shift_of_every_position_changes_nothing(models):
    """RoPE scores depend on position differences only."""
    model = models["llama"]
    positions = jnp.arange(12)
    np.testing.assert_allclose(
        model(jnp.asarray(TOKENS), token_positions=positions + 9),
        model(jnp.asarray(TOKENS), token_positions=positions),
        atol=1e-4,
    )


def test_score_and_loss_against_log_softmax(models):
    model = models["gemma2"]
    targets = np.roll(TOKENS, -1)
    logits = reference_logits(model, TOKENS)
    log_z = np.log(np.exp(logits).sum(-1))
    log_p = logits[np.arange(12), targets] - log_z
    score = model.score(jnp.asarray(TOKENS), jnp.asarray(targets))
    np.testing.assert_allclose(score, log_p, atol=1e-4)
    where = np.arange(12) % 3 != 0
    loss = model.loss(
        jnp.asarray(TOKENS), jnp.asarray(targets), where=jnp.asarray(where), z_loss=0.1
    )
    assert loss.dtype == jnp.float32
    expected = np.where(where, -log_p + 0.1 * log_z**2, 0.0)
    np.testing.assert_allclose(loss, expected, atol=1e-4)


# --- Tying, training, stacking ---------------------------------------------------


def test_tied_table_is_one_leaf_and_its_gradient_sums_both_uses(models):
    model = models["llama"]
    trainable = jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    assert sum(leaf.shape == (VOCAB, 32) for leaf in trainable) == 1
    table = model.embedding.weight
    untied = TransformerLM(
        dataclasses.replace(model.config, tie_word_embeddings=False),
        embedding=ReversibleEmbedding(
            weight=table,
            tie_weights=False,
            reverse_weight=table + 0.0,  # a copy: a second leaf
            reverse_dtype=jnp.float32,
            dtype=jnp.float32,
        ),
        blocks=model.blocks,
        final_norm=model.final_norm,
    )

    def loss(m):
        return m.loss(jnp.asarray(TOKENS), jnp.asarray(np.roll(TOKENS, -1))).mean()

    gradient = eqx.filter_jit(eqx.filter_value_and_grad(loss))
    tied_loss, tied_grads = gradient(model)
    untied_loss, untied_grads = gradient(untied)
    np.testing.assert_allclose(untied_loss, tied_loss, **SAME_MODEL)
    tied_grad = tied_grads.embedding.weight
    untied_grads = untied_grads.embedding
    np.testing.assert_allclose(
        tied_grad,
        untied_grads.embedding.weight + untied_grads.reverse_embedding.weight,
        **SAME_MODEL,
    )
    assert np.abs(untied_grads.embedding.weight).max() > 0
    assert np.abs(untied_grads.reverse_embedding.weight).max() > 0


def test_rope_tables_are_not_trained(models):
    model = models["gpt_neox"]
    optimiser = optax.adamw(1e-2)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        def loss(m):
            return m.loss(jnp.asarray(TOKENS), jnp.asarray(np.roll(TOKENS, -1))).mean()

        value, grads = eqx.filter_value_and_grad(loss)(model)
        updates, state = optimiser.update(
            grads, state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), state, value

    trained, state, before = step(model, state)
    _, _, after = step(trained, state)
    assert after < before
    assert not eqx.is_inexact_array(model.rope.cos_bits)
    np.testing.assert_array_equal(trained.rope.cos_bits, model.rope.cos_bits)
    np.testing.assert_array_equal(trained.rope.sin_bits, model.rope.sin_bits)
    assert np.abs(trained.blocks.mlp.up.weight - model.blocks.mlp.up.weight).max() > 0


def test_layers_are_stacked_and_scanned():
    """The traced program is the same size at 2 and 6 layers: one scanned layer."""
    sizes = {}
    for layers in (2, 6):
        config = dataclasses.replace(CONFIGS["gemma2"], num_layers=layers)
        model = eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))
        assert model.blocks.attention.query_proj.weight.shape == (layers, 64, 32)
        jaxpr = jax.make_jaxpr(lambda m, t: m(t))(model, jnp.asarray(TOKENS)).jaxpr
        sizes[layers] = len(jaxpr.eqns)
        assert "scan" in {eqn.primitive.name for eqn in jaxpr.eqns}
    assert sizes[2] == sizes[6]


def test_unrolling_the_layer_scan_changes_nothing_but_the_program(models):
    model = models["gemma2"]
    unrolled = with_settings(model, scan_unroll=2)
    jaxpr = str(jax.make_jaxpr(lambda m, t: m(t))(unrolled, jnp.asarray(TOKENS)))
    assert "unroll=2" in jaxpr
    np.testing.assert_allclose(
        unrolled(jnp.asarray(TOKENS)), model(jnp.asarray(TOKENS)), **SAME_MODEL
    )


# --- Input checks ------------------------------------------------------------------


@pytest.fixture(scope="module")
def strict_model(models) -> TransformerLM:
    return with_settings(models["llama"], out_of_range="error")


def test_token_dtype_and_shape_are_checked(models):
    model = models["llama"]
    for bad in (jnp.asarray(TOKENS, jnp.float32), jnp.asarray(TOKENS)[None]):
        with pytest.raises(TypeCheckError):
            model(bad)
        with pytest.raises(TypeCheckError):
            eqx.filter_jit(model)(bad)


def test_out_of_range_tokens(models, strict_model):
    bad = jnp.asarray(TOKENS).at[3].set(VOCAB)
    message = f"token id {VOCAB} is out of range"
    with pytest.raises(ValueError, match=message):
        strict_model(bad)
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(eqx.filter_jit(strict_model)(bad))
    with pytest.raises(eqx.EquinoxRuntimeError, match=message):
        jax.block_until_ready(jax.vmap(strict_model)(jnp.stack([bad, bad])))
    logits = models["llama"](bad)  # the "nan" policy
    assert np.isnan(logits[3:]).all()


def test_positions_are_checked(models, strict_model):
    model = models["llama"]
    tokens = jnp.asarray(TOKENS)
    with pytest.raises(TypeCheckError):
        model(tokens, token_positions=jnp.arange(11))
    with pytest.raises(TypeCheckError):
        eqx.filter_jit(model)(tokens, token_positions=jnp.arange(11))
    too_far = jnp.arange(12) + 20  # the tables hold 24 positions
    with pytest.raises(ValueError, match="position 24 is out of range"):
        model(tokens, token_positions=too_far)
    # Traced, the compiled check names the largest bad position.
    with pytest.raises(eqx.EquinoxRuntimeError, match="position 31 is out of range"):
        jax.block_until_ready(
            eqx.filter_jit(strict_model)(tokens, token_positions=too_far)
        )
    logits = eqx.filter_jit(model)(tokens, token_positions=too_far)
    assert np.isnan(logits[4:]).all()


def test_traced_positions_are_checked_once_for_all_layers(strict_model):
    """Traced positions add one check, not one per rotation of the queries and keys
    of every layer."""
    tokens = jnp.asarray(TOKENS)
    positions = jnp.arange(len(TOKENS))

    def host_checks(positions):
        jaxpr = jax.make_jaxpr(lambda m, t, p: m(t, token_positions=p))(
            strict_model, tokens, positions
        )
        return str(jaxpr).count("pure_callback")

    one_check = str(
        jax.make_jaxpr(lambda p: strict_model.rope.rotation(len(TOKENS), positions=p))(
            positions
        )
    ).count("pure_callback")
    assert one_check > 0
    assert host_checks(positions) == host_checks(None) + one_check


def test_sequences_longer_than_the_model_raise(models):
    model = models["llama"]
    long = jnp.zeros(25, jnp.int32)
    message = "25 tokens but the model supports at most max_position_embeddings=24"
    with pytest.raises(ValueError, match=message):
        model(long)
    with pytest.raises(ValueError, match=message):
        eqx.filter_jit(model)(long)
    with pytest.raises(ValueError, match=message):
        jax.vmap(model)(long[None])


def test_modules_that_disagree_with_the_config_raise(models):
    model = models["llama"]
    parts = dict(
        embedding=model.embedding, blocks=model.blocks, final_norm=model.final_norm
    )
    config = model.config
    with pytest.raises(ValueError, match=r"embedding\.embedding\.weight has shape"):
        TransformerLM(dataclasses.replace(config, vocab_size=41), **parts)
    with pytest.raises(
        ValueError, match=r"blocks\.attention\.key_proj\.weight has shape"
    ):
        TransformerLM(dataclasses.replace(config, num_kv_heads=4), **parts)
    with pytest.raises(ValueError, match="static settings"):
        TransformerLM(dataclasses.replace(config, norm_eps=1e-3), **parts)
    with pytest.raises(ValueError, match="missing"):
        TransformerLM(dataclasses.replace(config, mlp_bias=True), **parts)
    with pytest.raises(ValueError, match="either `key` or existing modules"):
        TransformerLM(config, key=jax.random.key(0), **parts)
    with pytest.raises(ValueError, match=r"missing \['blocks'\]"):
        TransformerLM(config, embedding=model.embedding, final_norm=model.final_norm)


def test_the_weight_tying_trap_is_detected(models):
    model = models["gpt_neox"]  # untied
    table = model.embedding.weight
    trapped = eqx.tree_at(lambda e: e.reverse_embedding.weight, model.embedding, table)
    with pytest.raises(ValueError, match="same array stored twice"):
        TransformerLM(
            model.config,
            embedding=trapped,
            blocks=model.blocks,
            final_norm=model.final_norm,
        )
