"""The KV cache and `TransformerLM.generate` against the full forward pass, and packed
sequences (`segment_ids`) against each document run alone."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tolerance as float_tolerance
from jaxtyping import TypeCheckError

from eqx_embed import KVCache, TransformerConfig, TransformerLM
from eqx_embed.models import _generate

VOCAB = 48
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=64,
)
CONFIGS = {
    "llama": TransformerConfig("llama", **SMALL, tie_word_embeddings=False),
    # Every layer slides: the cache is a ring buffer of the window, which wraps.
    "mistral": TransformerConfig("mistral", **SMALL, sliding_window=5),
    # Alternating windows (scanned data) and both soft caps (the einsum path).
    "gemma2": TransformerConfig(
        "gemma2",
        **SMALL,
        head_dim=16,
        sliding_window=4,
        attention_logit_soft_cap=2.0,
        final_logit_soft_cap=3.0,
    ),
    # Sliding and full layers in one scan (two cache stacks, two RoPE thetas).
    "gemma3": TransformerConfig(
        "gemma3_text",
        **{**SMALL, "num_layers": 3},
        head_dim=16,
        sliding_window=4,
        layer_types=("sliding_attention", "full_attention", "sliding_attention"),
        rope_local_theta=100.0,
    ),
    "gpt_neox": TransformerConfig("gpt_neox", **SMALL, partial_rotary_factor=0.5),
}
PROMPTS = np.random.default_rng(0).integers(0, VOCAB, size=(3, 9))
LENGTHS = np.array([9, 2, 6])


def perturbed(model: TransformerLM) -> TransformerLM:
    """Logits of order one: weights scaled up, norms and biases off identity."""
    leaves, structure = jax.tree.flatten(model)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    leaves = [
        leaf * 3 + 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        if eqx.is_inexact_array(leaf)
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


@eqx.filter_jit
def full_logits(model, tokens):
    return model(tokens)


def tolerance(model: TransformerLM, logits: np.ndarray, seq: int) -> float:
    """float32 rounding of sums over the hidden width and the attended tokens, in
    every layer, relative to the logits' size."""
    config = model.config
    reduction = 4 * (config.hidden_size + config.intermediate_size + seq)
    scale = max(1.0, np.abs(logits).max())
    return float_tolerance(np.float32, reduction * config.num_layers, scale=scale)[
        "atol"
    ]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_cached_step_equals_the_full_forward(name, models):
    model = models[name]
    steps = 20  # past every window: the ring buffer wraps
    logits, cache = model.prefill(PROMPTS, prompt_lengths=LENGTHS, capacity=40)
    step = eqx.filter_jit(model.decode_step)
    collected, chosen = [], []
    for _ in range(steps):
        collected.append(np.asarray(logits))
        token = jnp.argmax(logits, axis=-1)
        chosen.append(np.asarray(token))
        logits, cache = step(cache, token)
    collected, chosen = np.stack(collected, 1), np.stack(chosen, 1)
    assert np.array_equal(cache.lengths, LENGTHS + steps)
    for row, length in enumerate(LENGTHS):
        sequence = np.concatenate([PROMPTS[row, :length], chosen[row]])
        expected = np.asarray(full_logits(model, jnp.asarray(sequence)))
        expected = expected[length - 1 : length - 1 + steps]
        tol = tolerance(model, expected, len(sequence))
        np.testing.assert_allclose(collected[row], expected, rtol=0, atol=tol)


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3", "llama"])
def test_sliding_layers_keep_only_their_window(name, models):
    config = models[name].config
    windows = config.layer_windows
    sliding_layers = sum(window is not None for window in windows)
    full_layers = len(windows) - sliding_layers
    batch, row_bytes = 3, config.num_kv_heads * config.head_dim * 4
    sliding_bytes = []
    for capacity in (12, 40):
        _, cache = models[name].prefill(
            PROMPTS, prompt_lengths=LENGTHS, capacity=capacity
        )
        assert isinstance(cache, KVCache)
        slots = capacity if full_layers else 0
        window_slots = min(capacity, config.sliding_window) if sliding_layers else 0
        assert (cache.slots, cache.sliding_slots) == (slots, window_slots)
        assert cache.keys.shape == (full_layers, batch, slots) + cache.keys.shape[3:]
        expected = 2 * batch * row_bytes
        expected *= full_layers * slots + sliding_layers * window_slots
        arrays = (cache.keys, cache.values, cache.sliding_keys, cache.sliding_values)
        assert sum(array.nbytes for array in arrays) == expected
        sliding_bytes.append(cache.sliding_keys.nbytes + cache.sliding_values.nbytes)
        if sliding_layers:
            # Less than one buffer of `capacity` slots shared by every layer.
            assert expected < 2 * len(windows) * batch * capacity * row_bytes
    assert sliding_bytes[0] == sliding_bytes[1]


def greedy_reference(model, prompts, lengths, new_tokens):
    """Greedy continuation by re-running the whole sequence for every token."""
    rows = []
    for prompt, length in zip(prompts, lengths, strict=True):
        sequence = list(prompt[:length])
        for _ in range(new_tokens):
            logits = full_logits(model, jnp.asarray(sequence))
            sequence.append(int(jnp.argmax(logits[-1])))
        rows.append(sequence[length:])
    return np.array(rows)


@pytest.mark.parametrize("name", ["mistral", "gemma2"])
def test_greedy_generation_equals_rerunning_the_window(name, models):
    model = models[name]
    expected = greedy_reference(model, PROMPTS, LENGTHS, 12)
    got = model.generate(PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=12)
    assert got.shape == (3, 12) and got.dtype == jnp.int32
    np.testing.assert_array_equal(got, expected)


def count_decode_steps(monkeypatch) -> dict[str, int]:
    """Counts the traces of the decode step and the steps run."""
    counts = {"traced": 0, "run": 0}
    original = _generate.decode_step

    def counted(*args):
        counts["traced"] += 1

        def tick():
            counts["run"] += 1

        jax.debug.callback(tick)
        return original(*args)

    monkeypatch.setattr(_generate, "decode_step", counted)
    return counts


def test_eos_pads_the_row_and_stops_the_loop_early(models, monkeypatch):
    model = models["llama"]
    free = np.asarray(
        model.generate(PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=16)
    )
    # An EOS that every row meets by its fourth token.
    eos = sorted({int(row[3]) for row in free})
    counts = count_decode_steps(monkeypatch)
    got = np.asarray(
        model.generate(
            PROMPTS,
            prompt_lengths=LENGTHS,
            max_new_tokens=16,
            eos_token_id=eos,
            pad_token_id=VOCAB - 1,
        )
    )
    for row, free_row in zip(got, free, strict=True):
        end = next(i for i, token in enumerate(free_row) if token in eos) + 1
        np.testing.assert_array_equal(row[:end], free_row[:end])
        assert (row[end:] == VOCAB - 1).all()
    assert counts["run"] <= 4 < 16


def test_one_compile_per_shape(models, monkeypatch):
    # Two cache stacks and a branch per layer: still one compile for every token.
    model = models["gemma3"]
    counts = count_decode_steps(monkeypatch)
    model.generate(PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=8)
    model.generate(PROMPTS[::-1], prompt_lengths=LENGTHS[::-1], max_new_tokens=8)
    assert counts == {"traced": 1, "run": 16}
    model.generate(
        PROMPTS[:, :5], prompt_lengths=np.minimum(LENGTHS, 5), max_new_tokens=8
    )
    assert counts["traced"] == 2


def test_sampling(models):
    model = models["llama"]
    greedy = model.generate(PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=10)
    key = jax.random.key(3)
    kwargs = dict(prompt_lengths=LENGTHS, max_new_tokens=10, key=key)
    assert np.array_equal(
        model.generate(PROMPTS, temperature=1.0, top_k=1, **kwargs), greedy
    )
    assert np.array_equal(
        model.generate(PROMPTS, temperature=1.0, top_p=1e-6, **kwargs), greedy
    )
    first = model.generate(PROMPTS, temperature=2.0, **kwargs)
    assert np.array_equal(model.generate(PROMPTS, temperature=2.0, **kwargs), first)
    assert not np.array_equal(first, greedy)
    # top_k=3: every sampled token is among the 3 most likely after its prefix.
    sampled = np.asarray(model.generate(PROMPTS, temperature=5.0, top_k=3, **kwargs))
    for row, length in enumerate(LENGTHS):
        sequence = np.concatenate([PROMPTS[row, :length], sampled[row]])
        logits = np.asarray(full_logits(model, jnp.asarray(sequence)))
        top3 = np.argsort(-logits, axis=-1)[:, :3]
        for i, token in enumerate(sampled[row]):
            assert token in top3[length - 1 + i]


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be a positive integer"),
        (dict(capacity=12), "capacity must be an integer of at least"),
        (dict(max_new_tokens=60), "exceeds the model's max_position_embeddings"),
        (dict(temperature=-0.5), "temperature must be a number >= 0"),
        (dict(temperature=1.0, key=None), "needs a `key`"),
        (dict(temperature=1.0, top_p=0.0), r"top_p must be None or in \(0, 1\]"),
        (dict(temperature=1.0, top_p=1.5), r"top_p must be None or in \(0, 1\]"),
        (dict(temperature=1.0, top_k=0), "top_k must be None or an integer"),
        (dict(top_k=5), "apply only when sampling"),
        (dict(eos_token_id=VOCAB), r"eos_token_id must be a token id in \[0, 48\)"),
        (dict(prompt_lengths=np.array([9, 0, 6])), r"prompt_lengths must be in"),
    ],
)
def test_bad_arguments_raise_before_compiling(changes, message, models, monkeypatch):
    counts = count_decode_steps(monkeypatch)
    arguments = dict(
        prompts=PROMPTS,
        prompt_lengths=LENGTHS,
        max_new_tokens=4,
        key=jax.random.key(0),
    )
    arguments.update(changes)
    with pytest.raises(ValueError, match=message):
        models["llama"].generate(arguments.pop("prompts"), **arguments)
    assert counts["traced"] == 0


def test_shapes_are_checked(models):
    # The annotations' contract (TypeCheckError) or, where it binds nothing, the
    # method itself (ValueError).
    model = models["llama"]
    with pytest.raises((TypeCheckError, ValueError), match="prompt"):
        model.generate(PROMPTS, prompt_lengths=LENGTHS[:2], max_new_tokens=2)
    with pytest.raises((TypeCheckError, ValueError), match="prompts"):
        model.generate(PROMPTS[0], max_new_tokens=2)
    with pytest.raises(ValueError, match="prompt_lengths must be 3 integers"):
        _generate.check_prompts(
            PROMPTS, LENGTHS[:2], None, new_tokens=2, config=model.config
        )


def test_decode_step_checks_its_tokens_and_room(models):
    model = models["llama"]
    _, cache = model.prefill(PROMPTS, prompt_lengths=LENGTHS, capacity=10)
    with pytest.raises(ValueError, match=r"tokens must have shape \(3,\)"):
        model.decode_step(cache, jnp.zeros((2,), jnp.int32))
    _, cache = model.decode_step(cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="The cache is full"):
        model.decode_step(cache, jnp.zeros((3,), jnp.int32))


DOCUMENTS = [np.arange(5) * 7 % VOCAB, np.arange(3) + 11, np.arange(6) * 5 % VOCAB]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_packed_row_equals_each_document_alone(name, models):
    model = models[name]
    tokens = np.concatenate(DOCUMENTS)
    # Ids may repeat: a change of id starts a document.
    segment_ids = np.concatenate(
        [np.full(len(d), i % 2) for i, d in enumerate(DOCUMENTS)]
    )
    targets = np.roll(tokens, -1)

    @eqx.filter_jit
    def run(model, tokens, targets, segment_ids=None):
        return (
            model(tokens, segment_ids=segment_ids),
            model.loss(tokens, targets, segment_ids=segment_ids),
            model.score(tokens, targets, segment_ids=segment_ids),
        )

    # Batched under vmap, as training runs it.
    packed_logits, packed, packed_scores = jax.vmap(
        lambda t, y, s: run(model, t, y, s)
    )(tokens[None], targets[None], segment_ids[None])
    packed_logits, packed, packed_scores = packed_logits[0], packed[0], packed_scores[0]
    start = 0
    for document in DOCUMENTS:
        end = start + len(document)
        alone_logits, alone, _ = run(model, document, targets[start:end])
        tol = tolerance(model, alone_logits, len(tokens))
        np.testing.assert_allclose(packed[start:end], alone, rtol=0, atol=tol)
        np.testing.assert_allclose(packed_scores[start:end], -alone, rtol=0, atol=tol)
        np.testing.assert_allclose(
            packed_logits[start:end], alone_logits, rtol=0, atol=tol
        )
        start = end


def test_segments_with_explicit_positions_and_bad_shapes(models):
    model = models["llama"]
    tokens = np.concatenate(DOCUMENTS[:2])
    segment_ids = np.array([0] * 5 + [1] * 3)
    shifted = model.hidden_states(
        tokens, segment_ids=segment_ids, token_positions=np.arange(8) + 3
    )
    # Given positions are used as given: the second document is not at 0.
    second = model.hidden_states(DOCUMENTS[1], token_positions=np.arange(5, 8) + 3)
    np.testing.assert_allclose(shifted[5:], second, rtol=0, atol=1e-5)
    with pytest.raises((TypeCheckError, ValueError), match="segment_ids"):
        model.hidden_states(tokens, segment_ids=segment_ids[:4])
