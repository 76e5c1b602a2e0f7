"""LoRA (`add_lora`, `merge_lora`, `lora_filter`, the adapted table kind) against a
materialised reference: the adapted weights `W + scale * up @ down` built whole in
NumPy float64, run as a plain model, and differentiated by `jax.grad`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _tolerances import tolerance

import eqx_embed
from eqx_embed.nn._lora import LoRATable, LowRank, low_rank

VOCAB, WIDTH, BLOCK = 70, 16, 16  # 70 rows: five blocks, the last one shifted back
TARGETS = ["q_proj", "v_proj", "mlp.down", "embedding"]


def config(**settings) -> eqx_embed.TransformerConfig:
    values = dict(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=24,
        num_layers=2,
        num_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        param_dtype="float64",
        activation_dtype="float64",
    )
    return eqx_embed.TransformerConfig("llama", **{**values, **settings})


def randomised(model):
    """Every adapter's `up` drawn too (they start at zero), so that the updates
    matter."""
    adapters = [
        node
        for node in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, LowRank))
        if isinstance(node, LowRank)
    ]
    keys = jax.random.split(jax.random.key(7), len(adapters))
    return eqx.tree_at(
        lambda m: [
            n.up
            for n in jax.tree.leaves(m, is_leaf=lambda n: isinstance(n, LowRank))
            if isinstance(n, LowRank)
        ],
        model,
        [
            0.5 * jax.random.normal(key, a.up.shape, a.up.dtype)
            for key, a in zip(keys, adapters, strict=True)
        ],
    )


def numpy_merged(plain, adapted):
    """The plain model with each adapted weight replaced by `W + scale * up @ down`,
    computed in NumPy float64."""

    def update(node):
        if isinstance(node, LowRank):
            up, down = np.asarray(node.up), np.asarray(node.down)
            return node.scale * (up @ down)
        return None

    is_adapted = lambda n: isinstance(n, eqx_embed.models._lora.LoRALinear | LoRATable)  # noqa: E731
    replaced = {}
    for path, node in jax.tree_util.tree_flatten_with_path(adapted, is_leaf=is_adapted)[
        0
    ]:
        if is_adapted(node):
            name = jax.tree_util.keystr(path, simple=True, separator=".")
            replaced[name] = node
    leaves = []
    for name, node in replaced.items():
        if isinstance(node, LoRATable):
            base = np.asarray(node.base)
            leaves.append((name, base + update(node.adapter)))
        else:
            base = np.asarray(node.base.weight)
            leaves.append((name + ".weight", base + update(node.adapter)))

    def get(model, name):
        for part in name.split("."):
            model = getattr(model, part)
        return model

    return eqx.tree_at(
        lambda m: [get(m, name) for name, _ in leaves],
        plain,
        [jnp.asarray(array) for _, array in leaves],
    )


@pytest.fixture(scope="module")
def models():
    with jax.enable_x64(True):
        plain = eqx_embed.TransformerLM(config(), key=jax.random.key(0))
        adapted = randomised(
            eqx_embed.add_lora(
                plain, rank=3, alpha=6, targets=TARGETS, key=jax.random.key(1)
            )
        )
        yield plain, adapted, numpy_merged(plain, adapted)


TOKENS = np.arange(1, 13) * 5 % VOCAB


def test_adapters_start_at_zero_and_adapt_the_chosen_weights(models):
    plain, adapted, _ = models
    with jax.enable_x64(True):
        fresh = eqx_embed.add_lora(
            plain, rank=3, alpha=6, targets=TARGETS, key=jax.random.key(1)
        )
        np.testing.assert_array_equal(fresh(TOKENS), plain(TOKENS))
    assert isinstance(adapted.embedding.embedding.weight, LoRATable)
    attention, mlp = adapted.blocks.attention, adapted.blocks.mlp
    assert attention.query_proj.adapter.up.shape == (2, WIDTH, 3)
    assert attention.value_proj.adapter.down.shape == (2, 3, WIDTH)
    assert mlp.down.adapter.down.shape == (2, 3, 24)
    assert isinstance(attention.key_proj, eqx_embed.models._linear.Linear)
    assert isinstance(mlp.up, eqx_embed.models._linear.Linear)


def test_logits_lookup_and_merge_equal_the_materialised_weights(models):
    _, adapted, reference = models
    with jax.enable_x64(True):
        expected = np.asarray(reference(TOKENS))
        tol = tolerance(np.float64, 200, scale=float(np.abs(expected).max()))
        np.testing.assert_allclose(adapted(TOKENS), expected, **tol)
        np.testing.assert_allclose(
            eqx_embed.merge_lora(adapted)(TOKENS), expected, **tol
        )
        # The lookup alone: rows of the adapted table, bad ids NaN as before.
        lookup = jax.vmap(adapted.embedding)(jnp.asarray([0, 69, -1, 70]))
        table = np.asarray(reference.embedding.weight)
        np.testing.assert_allclose(lookup[:3], table[[0, 69, 69]], **tol)
        assert np.isnan(lookup[3]).all()
    merged = eqx_embed.merge_lora(adapted)
    assert jax.tree.structure(merged) == jax.tree.structure(reference)


@pytest.mark.parametrize("loss", ["per_token", "mean"])
def test_fused_loss_gradients_equal_those_of_the_materialised_table(models, loss):
    """Blockwise over an adapted tied table (five blocks, the last shifted back):
    the adapters' gradients equal `jax.grad` through `W + scale * up @ down` built
    whole."""
    plain, adapted, _ = models
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        hidden = jnp.asarray(rng.normal(size=(9, WIDTH)))
        targets = jnp.asarray(rng.integers(0, VOCAB, 9))
        table = adapted.embedding.embedding.weight
        embedding = adapted.embedding

        def fused(adapter):
            module = eqx.tree_at(
                lambda e: e.embedding.weight.adapter, embedding, adapter
            )
            if loss == "mean":
                return module.mean_cross_entropy(hidden, targets, chunk_size=BLOCK)
            return module.cross_entropy(hidden, targets, block_size=BLOCK).mean()

        def materialised(adapter):
            full = table.base + adapter.scale * adapter.up @ adapter.down
            logits = hidden @ full.T
            picked = jnp.take_along_axis(logits, targets[:, None], axis=1)[:, 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=1) - picked)

        value, grads = jax.value_and_grad(fused)(table.adapter)
        want_value, want = jax.value_and_grad(materialised)(table.adapter)
        # The mean's weights (`where / count`) are float32, whatever the table's.
        dtype = np.float32 if loss == "mean" else np.float64
        tol = tolerance(dtype, 4 * VOCAB * WIDTH, scale=10.0)
        np.testing.assert_allclose(value, want_value, **tol)
        np.testing.assert_allclose(grads.up, want.up, **tol)
        np.testing.assert_allclose(grads.down, want.down, **tol)
    del plain


def test_lora_filter_trains_the_adapters_alone(models):
    _, adapted, reference = models
    spec = eqx_embed.lora_filter(adapted)
    trainable, frozen = eqx.partition(adapted, spec)
    # Exactly the up/down factors: four adapters, two arrays each.
    assert len(jax.tree.leaves(trainable)) == 8
    adapters = jax.tree.leaves(trainable, is_leaf=lambda n: isinstance(n, LowRank))
    assert all(isinstance(a, LowRank) or a is None for a in adapters)
    with jax.enable_x64(True):
        tokens = jnp.asarray(TOKENS)[None]

        def loss(trainable):
            model = eqx.combine(trainable, frozen)
            return model.mean_loss(tokens[:, :-1], tokens[:, 1:])

        grads = eqx.filter_grad(loss)(trainable)
        assert jax.tree.structure(grads) == jax.tree.structure(trainable)
        optimizer = optax.adam(1e-2)
        state = optimizer.init(trainable)
        moments = [x for x in jax.tree.leaves(state) if x.ndim > 0]
        assert sum(x.size for x in moments) == 2 * sum(
            x.size for x in jax.tree.leaves(trainable)
        )
        updates, state = optimizer.update(grads, state)
        stepped = eqx.combine(eqx.apply_updates(trainable, updates), frozen)
        # The frozen rest is untouched, bit for bit.
        for name in ("blocks.attention.key_proj.weight", "final_norm.weight"):
            got, want = stepped, reference
            for part in name.split("."):
                got, want = getattr(got, part), getattr(want, part)
            np.testing.assert_array_equal(got, want)
        assert loss(eqx.filter(stepped, spec)) < loss(trainable)


def test_the_adapted_tables_loss_never_builds_the_adapted_table():
    """The compiled gradient of the fused losses holds less scratch than half the
    table (its blocks are 2048 rows, a sixteenth of it): the adapted table is never
    built, and the frozen base gets no gradient buffer."""
    vocab, width = 32768, 64
    embedding = eqx_embed.ReversibleEmbedding(vocab, width, key=jax.random.key(0))
    adapter = low_rank(
        vocab,
        width,
        rank=4,
        alpha=8,
        dropout=0,
        dtype=jnp.float32,
        table=True,
        key=jax.random.key(1),
    )
    base = embedding.embedding.weight
    hidden = jax.random.normal(jax.random.key(2), (64, width))
    targets = jnp.arange(64) * 7

    def grad(adapter, base):
        def loss(adapter):
            table = LoRATable(base, adapter)
            module = eqx.tree_at(lambda e: e.embedding.weight, embedding, table)
            return module.mean_cross_entropy(hidden, targets)

        return jax.grad(loss)(adapter)

    compiled = jax.jit(grad).lower(adapter, base).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.5 * vocab * width * 4


def test_untied_tables_take_their_own_adapters():
    with jax.enable_x64(True):
        plain = eqx_embed.TransformerLM(
            config(tie_word_embeddings=False), key=jax.random.key(0)
        )
        adapted = randomised(
            eqx_embed.add_lora(
                plain,
                rank=2,
                alpha=2,
                targets=["embed_tokens", "lm_head"],
                key=jax.random.key(1),
            )
        )
        reference = numpy_merged(plain, adapted)
        expected = np.asarray(reference(TOKENS))
        tol = tolerance(np.float64, 200, scale=float(np.abs(expected).max()))
        np.testing.assert_allclose(adapted(TOKENS), expected, **tol)
    assert isinstance(adapted.embedding.reverse_embedding.weight, LoRATable)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (dict(rank=0), "rank must be a positive integer, got 0"),
        (dict(rank=17), "rank must be at most 16 .* got 17"),
        (dict(targets=["q_prj"]), "targets: 'q_prj' matches no module"),
        (dict(targets="q_proj"), "targets must be a non-empty list"),
        (dict(alpha=0), "alpha must be a positive finite number, got 0"),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
        # Never applied inside a TransformerLM, which passes its layers no key.
        (dict(dropout=0.1), "dropout=0.1: a TransformerLM passes no key"),
    ],
)
def test_bad_arguments_are_refused_by_name(models, settings, message):
    plain, _, _ = models
    arguments = dict(rank=2, alpha=4, targets=["q_proj"], key=jax.random.key(0))
    with pytest.raises(ValueError, match=message):
        eqx_embed.add_lora(plain, **{**arguments, **settings})


def test_a_weight_is_adapted_once(models):
    _, adapted, _ = models
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        eqx_embed.add_lora(
            adapted, rank=2, alpha=4, targets=["q_proj"], key=jax.random.key(0)
        )


def test_qlora_trains_only_the_adapters_over_an_int8_base():
    """LoRA over a quantized, frozen base: the gradients reach the adapters alone,
    and equal those of the same adapters over the dequantized float weights; merging
    into the quantized base is refused unless asked to dequantize."""
    plain = eqx_embed.TransformerLM(
        config(param_dtype="float32", activation_dtype="float32"),
        key=jax.random.key(0),
    )
    adapted = randomised(
        eqx_embed.add_lora(
            eqx_embed.quantize(plain, "int8"),
            rank=2,
            alpha=4,
            targets=["q_proj", "mlp.down", "embedding"],
            key=jax.random.key(1),
        )
    )
    floats = eqx_embed.dequantize(adapted)  # the same adapters, float bases
    tokens = jnp.asarray(TOKENS)[None]

    def gradients(model):
        trainable, frozen = eqx.partition(model, eqx_embed.lora_filter(model))

        def loss(trainable):
            model = eqx.combine(trainable, frozen)
            return model.mean_loss(tokens[:, :-1], tokens[:, 1:])

        return trainable, eqx.filter_grad(loss)(trainable)

    trainable, grads = gradients(adapted)
    assert len(jax.tree.leaves(trainable)) == 6
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)
    _, expected = gradients(floats)
    for got, want in zip(
        jax.tree.leaves(grads), jax.tree.leaves(expected), strict=True
    ):
        np.testing.assert_allclose(got, want, **tolerance(np.float32, 2000))
    with pytest.raises(ValueError, match="has a quantized base .* dequantize=True"):
        eqx_embed.merge_lora(adapted)
    merged = eqx_embed.merge_lora(adapted, dequantize=True)
    expected_logits = np.asarray(adapted(TOKENS))
    np.testing.assert_allclose(
        merged(TOKENS),
        expected_logits,
        **tolerance(np.float32, 200, scale=float(np.abs(expected_logits).max())),
    )


def test_a_hugging_face_export_of_an_adapted_model_is_refused(models, tmp_path):
    _, adapted, _ = models
    with pytest.raises(ValueError, match=r"has LoRA adapters.*merge_lora\(model\)"):
        adapted.to_huggingface(tmp_path)
    assert not any(tmp_path.iterdir())
