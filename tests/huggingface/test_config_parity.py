"""Every `config.json` key of Gemma 3 and Qwen3 is read as `transformers` reads it, or
refused by name: the same weights under each variant of the file, loaded by both, give
the same logits. Also the other side: a model that transformers would run differently
is not exported, and `from_huggingface`'s dtype arguments are checked by name."""

import json
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_huggingface import randomise

from eqx_embed import TransformerConfig, TransformerLM

SIZES = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=32,
)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(1, 12))


def _saved(root, name, config) -> str:
    """Saves a tiny random transformers model of `config`; returns the directory."""
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager"
    )
    randomise(model, unit_offset_norms=config.model_type.startswith("gemma"))
    model.save_pretrained(root / name)
    return str(root / name)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    gemma3 = transformers.Gemma3TextConfig(**SIZES, sliding_window=4)
    qwen3 = transformers.Qwen3Config(**SIZES)
    return root, {
        "gemma3": _saved(root, "gemma3", gemma3),
        "qwen3": _saved(root, "qwen3", qwen3),
    }


def _variant(saved, family, edit):
    """A copy of the family's checkpoint whose config.json `edit` changed."""
    root, directories = saved
    source = directories[family]
    target = root / f"{family}-{len(list(root.iterdir()))}"
    shutil.copytree(source, target)
    path = target / "config.json"
    values = json.loads(path.read_text())
    edit(values)
    path.write_text(json.dumps(values))
    return str(target)


def _transformers_logits(directory) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.float().numpy()


def _our_logits(directory) -> np.ndarray:
    model = TransformerLM.from_huggingface(directory)
    return np.asarray(jax.vmap(model)(jnp.asarray(TOKENS)))


def _without_layer_types(**extra):
    def edit(values):
        del values["layer_types"]
        values.update(extra)

    return edit


GEMMA3_READ_AS_TRANSFORMERS = {
    # transformers 5 derives the layer types from `sliding_window_pattern` only.
    "sliding_window_pattern 2": _without_layer_types(sliding_window_pattern=2),
    # ...and ignores the `_sliding_window_pattern` it saves beside `layer_types`.
    "_sliding_window_pattern 2": _without_layer_types(_sliding_window_pattern=2),
    "no pattern": _without_layer_types(),
    "rope_theta outside rope_parameters": lambda values: values.update(
        rope_theta=5_000.0,
        rope_parameters={"sliding_attention": {"rope_type": "default"}},
    ),
    "transformers 4 keys": lambda values: (
        values.pop("rope_parameters"),
        values.update(
            rope_theta=2_000.0,
            rope_local_base_freq=300.0,
            rope_scaling={"rope_type": "linear", "factor": 4.0},
        ),
    ),
}


@pytest.mark.parametrize("variant", list(GEMMA3_READ_AS_TRANSFORMERS))
def test_gemma3_keys_are_read_as_transformers_reads_them(saved, variant):
    directory = _variant(saved, "gemma3", GEMMA3_READ_AS_TRANSFORMERS[variant])
    expected = _transformers_logits(directory)
    assert np.abs(expected).max() > 1.0
    np.testing.assert_allclose(_our_logits(directory), expected, atol=1e-4, rtol=0)


def test_the_gemma3_variants_differ(saved):
    """The variants above change the model, so their parity is not vacuous."""
    edits = GEMMA3_READ_AS_TRANSFORMERS
    pattern_2 = _transformers_logits(
        _variant(saved, "gemma3", edits["sliding_window_pattern 2"])
    )
    all_sliding = _transformers_logits(
        _variant(saved, "gemma3", edits["_sliding_window_pattern 2"])
    )
    assert np.abs(pattern_2 - all_sliding).max() > 1e-2


def test_gemma3_attention_soft_cap_is_ignored_as_transformers_ignores_it(saved):
    """transformers (through 5.25 at least) stores `attn_logit_softcapping` for
    Gemma 3 but never applies it: loading follows it, and warns."""
    directory = _variant(
        saved, "gemma3", lambda values: values.update(attn_logit_softcapping=0.5)
    )
    expected = _transformers_logits(directory)
    np.testing.assert_allclose(
        expected, _transformers_logits(saved[1]["gemma3"]), atol=1e-6, rtol=0
    )
    with pytest.warns(UserWarning, match="attn_logit_softcapping=0.5"):
        model = TransformerLM.from_huggingface(directory)
    assert model.config.attention_logit_soft_cap is None
    logits = np.asarray(jax.vmap(model)(jnp.asarray(TOKENS)))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)


def test_a_flat_gemma3_rope_parameters_is_refused(saved):
    """transformers ignores a flat `rope_parameters` for Gemma 3 (each kind of layer
    takes its default theta), which no reader of the file would expect."""
    directory = _variant(
        saved,
        "gemma3",
        lambda values: values.update(
            rope_parameters={"rope_type": "default", "rope_theta": 10_000.0}
        ),
    )
    with pytest.raises(ValueError, match="rope_parameters.*per layer type"):
        TransformerLM.from_huggingface(directory)


def test_qwen3_partial_rotary_factor_is_refused_as_transformers_ignores_it(saved):
    directory = _variant(
        saved, "qwen3", lambda values: values.update(partial_rotary_factor=0.5)
    )
    # transformers stores the key and rotates the whole head all the same.
    np.testing.assert_allclose(
        _transformers_logits(directory),
        _transformers_logits(saved[1]["qwen3"]),
        atol=1e-6,
        rtol=0,
    )
    with pytest.raises(ValueError, match="partial_rotary_factor=0.5"):
        TransformerLM.from_huggingface(directory)


@pytest.mark.parametrize(
    "layer_types",
    [
        ["full_attention", "sliding", "full_attention"],
        ["full_attention"] * 2,
        "full_attention",
    ],
)
def test_qwen3_invalid_layer_types_are_refused_as_transformers_refuses_them(
    saved, layer_types
):
    directory = _variant(
        saved, "qwen3", lambda values: values.update(layer_types=layer_types)
    )
    with pytest.raises(Exception, match="layer_types"):
        transformers.AutoConfig.from_pretrained(directory)
    with pytest.raises(ValueError, match=r"layer_types must be a list of 3"):
        TransformerLM.from_huggingface(directory)


@pytest.mark.parametrize(
    "family, settings, named",
    [
        (
            "gemma3_text",
            dict(attention_logit_soft_cap=2.0, rope_local_theta=10_000.0),
            "attention_logit_soft_cap=2.0",
        ),
        ("llama", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
        ("qwen3", dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ],
)
def test_a_model_transformers_would_run_differently_is_not_exported(
    tmp_path, family, settings, named
):
    config = TransformerConfig(
        family,
        vocab_size=32,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=2,
        num_kv_heads=1,
        head_dim=16,
        **settings,
    )
    model = TransformerLM(config, key=jax.random.key(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused, not warned about
        with pytest.raises(ValueError, match=f"cannot express.*{named}"):
            model.to_huggingface(tmp_path / "out")
    assert not (tmp_path / "out" / "config.json").exists()


@pytest.mark.parametrize("argument", ["param_dtype", "activation_dtype"])
@pytest.mark.parametrize("value", ["foo", "int32", np.int8])
def test_a_bad_dtype_argument_is_named(saved, argument, value):
    with pytest.raises(ValueError) as raised:
        TransformerLM.from_huggingface(saved[1]["qwen3"], **{argument: value})
    message = str(raised.value)
    assert f"from_huggingface's {argument}" in message
    assert "config.json" not in message
