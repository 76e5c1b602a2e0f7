"""Generation's promises under bad input: the padding never reaches a result, a NaN
logit never becomes a token, traced prompt lengths are range-checked, a cache from
another config and a bad `key` are refused by name."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxtyping import TypeCheckError

from eqx_embed import TransformerConfig, TransformerLM
from eqx_embed.models import _generate

VOCAB = 37
SMALL = dict(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    max_position_embeddings=32,
)
# Full layers keep the padding's slots; a sliding one and a full one, in one scan.
LLAMA = TransformerLM(TransformerConfig("llama", **SMALL), key=jax.random.key(0))
GEMMA2 = TransformerLM(
    TransformerConfig("gemma2", **SMALL, sliding_window=3), key=jax.random.key(1)
)
PROMPTS = np.array([[1, 2, 3, 4], [5, 6, 0, 0], [7, 8, 9, 0]])
LENGTHS = np.array([4, 2, 3])


def generate(model, prompts, **options):
    options = dict(prompt_lengths=LENGTHS, max_new_tokens=5) | options
    return np.asarray(model.generate(prompts, **options))


def test_bad_ids_in_the_padding_never_reach_a_result():
    padded = PROMPTS.copy()
    padded[1, 2:] = [VOCAB + 5, -VOCAB - 9]  # out of range: NaN rows of the table
    padded[2, 3] = 2**31 - 1
    # The same program with valid padding: the padding must change nothing, in the
    # full layer (which keeps the padding's slots) and in the sliding one.
    np.testing.assert_array_equal(generate(GEMMA2, padded), generate(GEMMA2, PROMPTS))


def test_a_nan_logit_never_becomes_a_token():
    # A bad id inside row 1's prompt: under the "nan" policy its logits are NaN, and
    # the row is NAN_TOKEN from then on; the other rows are as without it.
    bad = PROMPTS.copy()
    bad[1, 0] = VOCAB
    got = generate(LLAMA, bad, eos_token_id=3)
    clean = generate(LLAMA, PROMPTS, eos_token_id=3)
    assert _generate.NAN_TOKEN == -1
    assert (got[1] == -1).all()
    np.testing.assert_array_equal(np.delete(got, 1, 0), np.delete(clean, 1, 0))
    # Sampling too: a NaN logit is never drawn as a valid-looking token.
    sampled = generate(LLAMA, bad, temperature=1.0, key=jax.random.key(0))
    assert (sampled[1] == -1).all() and (np.delete(sampled, 1, 0) >= 0).all()


STRICT = TransformerLM(
    TransformerConfig("llama", **SMALL, out_of_range="error"), key=jax.random.key(0)
)


@eqx.filter_jit
def generate_traced(model, lengths):
    return model.generate(PROMPTS, prompt_lengths=lengths, max_new_tokens=5)


@pytest.mark.parametrize("lengths", [[4, 0, 3], [4, 5, 3], [-1, 2, 3]])
def test_traced_prompt_lengths_are_range_checked(lengths):
    """By the model's policy, as a traced id: under "error" an error when the program
    runs; under "nan" the row with the bad length is NAN_TOKEN (its logits are NaN),
    the others as with good lengths. Never valid-looking tokens."""
    good = generate(LLAMA, PROMPTS)
    np.testing.assert_array_equal(generate_traced(LLAMA, jnp.asarray(LENGTHS)), good)
    bad_row = [i for i, n in enumerate(lengths) if not 1 <= n <= 4]
    got = np.asarray(generate_traced(LLAMA, jnp.asarray(lengths)))
    assert (got[bad_row] == -1).all()
    good_rows = [i for i in range(3) if i not in bad_row]
    fixed = np.asarray(lengths)
    fixed[bad_row] = LENGTHS[bad_row]
    np.testing.assert_array_equal(
        got[good_rows], generate(LLAMA, PROMPTS, prompt_lengths=fixed)[good_rows]
    )
    np.testing.assert_array_equal(
        generate_traced(STRICT, jnp.asarray(LENGTHS)), generate(STRICT, PROMPTS)
    )
    with pytest.raises(
        (ValueError, RuntimeError), match=r"prompt_lengths must be in \[1, 4\]"
    ):
        jax.block_until_ready(generate_traced(STRICT, jnp.asarray(lengths)))


def abstract_model(family, changes):
    """A model of shapes only: the cache is refused before any weight is read."""
    config = TransformerConfig(family, **SMALL | changes)
    return eqx.filter_eval_shape(TransformerLM, config, key=jax.random.key(0))


@pytest.mark.parametrize(
    "built_by, used_by, field",
    [
        (
            ("mistral", dict(sliding_window=3)),
            ("mistral", dict(sliding_window=5)),
            "layer_windows",
        ),
        (("llama", {}), ("llama", dict(num_layers=3)), "layer_windows"),
        (("llama", {}), ("gemma2", dict(sliding_window=3)), "layer_windows"),
        (("llama", {}), ("llama", dict(num_kv_heads=2)), "num_kv_heads"),
        (("llama", {}), ("llama", dict(head_dim=4)), "head_dim"),
        (("llama", {}), ("llama", dict(activation_dtype="bfloat16")), "dtype"),
        (("llama", {}), ("llama", dict(max_position_embeddings=8)), "capacity"),
    ],
)
def test_a_cache_from_another_config_is_refused_by_name(built_by, used_by, field):
    def prefill(model):
        return model.prefill(PROMPTS, prompt_lengths=LENGTHS, capacity=9)[1]

    def decode_step(model, cache):
        return model.decode_step(cache, jnp.zeros(3, jnp.int32))

    cache = eqx.filter_eval_shape(prefill, abstract_model(*built_by))
    eqx.filter_eval_shape(decode_step, abstract_model(*built_by), cache)
    with pytest.raises(ValueError, match=f"its {field}|cache's {field}"):
        eqx.filter_eval_shape(decode_step, abstract_model(*used_by), cache)


@pytest.mark.parametrize(
    "key",
    [0, "seed", jax.random.split(jax.random.key(0), 2), np.zeros(2, np.uint32)],
    ids=["int", "str", "two keys", "numpy"],
)
def test_a_bad_key_is_refused_by_name(key):
    # The annotations' contract (TypeCheckError, under the suite's jaxtyping) or the
    # method itself (ValueError).
    with pytest.raises((TypeCheckError, ValueError), match="key"):
        generate(LLAMA, PROMPTS, temperature=1.0, key=key)


def test_raw_key_data_of_another_shape_is_refused_by_name():
    # uint32 arrays of shape (4,) pass the newer jaxtyping's annotation (another PRNG
    # implementation's keys), which the method then refuses; the lowest supported
    # jaxtyping's annotation refuses them itself. Either way, naming `key`.
    with pytest.raises((TypeCheckError, ValueError), match="key"):
        generate(LLAMA, PROMPTS, temperature=1.0, key=jnp.zeros(4, jnp.uint32))


def test_a_raw_key_samples_as_its_typed_key():
    typed = generate(LLAMA, PROMPTS, temperature=1.0, key=jax.random.key(4))
    raw = generate(LLAMA, PROMPTS, temperature=1.0, key=jax.random.PRNGKey(4))
    np.testing.assert_array_equal(raw, typed)
