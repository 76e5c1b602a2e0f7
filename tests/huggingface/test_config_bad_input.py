"""Bad `config.json` values and a tied config with a different stored head: each one
gives a clear `ValueError` naming the key (or loads as transformers does), never a
silently different model. Issue 11, items 5 and 6."""

import json
import math
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from eqx_embed import TransformerConfig, TransformerLM
from eqx_embed.huggingface import config_from_huggingface, config_to_huggingface

TINY = dict(
    vocab_size=32,
    hidden_size=16,
    intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
)


def tiny(model_type: str, **changes) -> dict:
    return {"model_type": model_type, **TINY, **changes}


def test_the_tiny_configs_are_valid():
    # The cases below fail for the one value they change, not for the rest.
    for model_type in ("llama", "mistral", "qwen2", "gemma", "gemma2", "gpt_neox"):
        assert config_from_huggingface(tiny(model_type)).family == model_type
    # transformers' own default, which it writes to config.json, means false.
    assert config_from_huggingface(tiny("gemma2", use_bidirectional_attention=None))


@pytest.mark.parametrize(
    "model_type, key, value",
    [
        ("llama", "tie_word_embeddings", "false"),
        ("llama", "tie_word_embeddings", 0),
        ("llama", "attention_bias", "false"),
        ("llama", "mlp_bias", "true"),
        ("gemma", "attention_bias", 1),
        ("qwen2", "use_sliding_window", "false"),
        ("qwen2", "use_mrope", "false"),
        ("gemma2", "use_bidirectional_attention", "false"),
        ("gpt_neox", "use_parallel_residual", "false"),
        ("gpt_neox", "attention_bias", "no"),
        ("gemma", "tie_word_embeddings", None),
        ("llama", "mlp_bias", None),
    ],
)
def test_a_boolean_given_as_anything_else_raises(model_type, key, value):
    with pytest.raises(ValueError, match=f"{key}={value!r}; it must be true or false"):
        config_from_huggingface(tiny(model_type, **{key: value}))


@pytest.mark.parametrize(
    "model_type, changes, key",
    [
        ("llama", dict(rope_theta=math.nan), "rope_theta"),
        ("llama", dict(rope_theta=math.inf), "rope_theta"),
        ("llama", dict(rope_parameters=dict(rope_theta=math.nan)), "rope_theta"),
        ("mistral", dict(rope_theta=-math.inf), "rope_theta"),
        ("gpt_neox", dict(rotary_emb_base=math.nan), "rope_theta"),
        ("llama", dict(rms_norm_eps=math.nan), "rms_norm_eps"),
        ("gemma", dict(rms_norm_eps=math.inf), "rms_norm_eps"),
        ("gpt_neox", dict(layer_norm_eps=math.nan), "layer_norm_eps"),
        ("gpt_neox", dict(layer_norm_eps=math.inf), "layer_norm_eps"),
        ("gemma2", dict(final_logit_softcapping=math.nan), "final_logit_softcapping"),
    ],
)
def test_a_nan_or_infinite_setting_raises(model_type, changes, key):
    with pytest.raises(ValueError, match=f"{key} must be a positive finite number"):
        config_from_huggingface(tiny(model_type, **changes))


@pytest.mark.parametrize("model_type", ["llama", "gpt_neox"])
def test_rope_tables_too_large_to_build_raise(model_type):
    # 10**9 positions: tens of GiB of float64 tables, refused before any is built.
    with pytest.raises(ValueError, match=r"max_position_embeddings=1000000000 .* GiB"):
        config_from_huggingface(tiny(model_type, max_position_embeddings=10**9))
    # A long but real context (Llama 3.1's) is fine.
    config = config_from_huggingface(tiny(model_type, max_position_embeddings=131072))
    assert config.max_position_embeddings == 131072


def test_json_nan_in_a_file_raises(tmp_path):
    # json.loads reads NaN and Infinity, which transformers writes for float('nan').
    (tmp_path / "config.json").write_text(
        json.dumps(tiny("llama", rms_norm_eps=math.nan))
    )
    assert "NaN" in (tmp_path / "config.json").read_text()
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive finite"):
        TransformerLM.from_huggingface(tmp_path)


def test_structure_flags_a_family_lacks_are_not_exported(tmp_path):
    config = TransformerConfig("llama", 32, 16, 24, 1, 2, norm="layer")
    with pytest.raises(ValueError, match="cannot express these settings: norm='layer'"):
        config_to_huggingface(config)


@pytest.fixture(scope="module")
def tied_checkpoint(tmp_path_factory):
    """A tied transformers Llama, saved, and the same files with a different
    `lm_head.weight` added."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(config).eval()
    root = tmp_path_factory.mktemp("tied")
    model.save_pretrained(root / "tied")
    tensors = load_file(root / "tied" / "model.safetensors")
    assert "lm_head.weight" not in tensors
    head = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    for name, stored_head in [
        ("different", head),
        ("copy", tensors["model.embed_tokens.weight"]),
    ]:
        (root / name).mkdir()
        (root / name / "config.json").write_text(
            (root / "tied" / "config.json").read_text()
        )
        save_file(
            {**tensors, "lm_head.weight": stored_head},
            root / name / "model.safetensors",
            metadata={"format": "pt"},
        )
    return root


def transformers_logits(directory, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor(tokens[None])).logits[0].numpy()


def test_a_different_stored_head_is_loaded_untied_as_transformers_does(
    tied_checkpoint,
):
    tokens = np.array([1, 5, 9, 30, 2, 7])
    directory = tied_checkpoint / "different"
    with pytest.warns(UserWarning, match="loaded untied, as transformers does"):
        model = TransformerLM.from_huggingface(directory)
    assert not model.config.tie_word_embeddings
    stored = load_file(directory / "model.safetensors")["lm_head.weight"]
    np.testing.assert_array_equal(
        np.asarray(model.embedding.reverse_embedding.weight), stored
    )
    expected = transformers_logits(directory, tokens)
    logits = np.asarray(model(jnp.asarray(tokens, dtype=jnp.int32)))
    # Float32 programs of depth 2 and width 16 with logits of order one.
    np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
    tied_logits = transformers_logits(tied_checkpoint / "tied", tokens)
    assert np.abs(expected - tied_logits).max() > 0.1  # the head matters


def test_an_untied_config_loads_the_same_model_without_a_warning(
    tied_checkpoint, tmp_path
):
    different = tied_checkpoint / "different"
    values = json.loads((different / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**values, "tie_word_embeddings": False})
    )
    (tmp_path / "model.safetensors").symlink_to(different / "model.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        untied = TransformerLM.from_huggingface(tmp_path)
    with pytest.warns(UserWarning, match="loaded untied"):
        from_tied = TransformerLM.from_huggingface(different)
    assert untied.config == from_tied.config
    for leaf, other in zip(
        jax.tree.leaves(untied), jax.tree.leaves(from_tied), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other))


def test_a_stored_copy_of_the_embedding_stays_tied(tied_checkpoint):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = TransformerLM.from_huggingface(tied_checkpoint / "copy")
    assert model.config.tie_word_embeddings
    assert model.embedding.reverse_embedding is None
    tokens = jnp.array([1, 5, 9, 30], dtype=jnp.int32)
    reference = TransformerLM.from_huggingface(tied_checkpoint / "tied")
    # The same weights through the same compiled program: bitwise equal.
    logits = eqx.filter_jit(lambda model, tokens: model(tokens))
    np.testing.assert_array_equal(
        np.asarray(logits(model, tokens)), np.asarray(logits(reference, tokens))
    )
