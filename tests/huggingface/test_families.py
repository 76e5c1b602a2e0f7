"""The family registries: the architectures (`models.families`) and the checkpoint
formats (`huggingface.families`) list the same families; every format agrees with
transformers (its architecture, its defaults for keys a config.json leaves out, its
presets), names every weight of the model its presets build, and has a parity case in
`test_huggingface.py`. A new family that forgets one of these fails here."""

import dataclasses

import equinox as eqx
import jax
import pytest
import transformers

from eqx_embed import TransformerConfig
from eqx_embed.huggingface._checkpoint import huggingface_name
from eqx_embed.huggingface.families import HUGGINGFACE_FAMILIES
from eqx_embed.models._config import FAMILIES, Family
from eqx_embed.models._transformer_parts import initial_parts, named_leaves
from eqx_embed.models.families import FAMILY_SPECS

# transformers 5 keeps these elsewhere or drops them, and reads them back all the same.
MOVED_IN_TRANSFORMERS_5 = {
    # Kept in rope_parameters["partial_rotary_factor"].
    ("gpt_neox", "rotary_pct"),
    # Set to None unless use_sliding_window (whose default is False), as we read it.
    ("qwen2", "sliding_window"),
    ("qwen3", "sliding_window"),
    # Kept in rope_parameters per layer type.
    ("gemma3_text", "rope_theta"),
    ("gemma3_text", "rope_local_base_freq"),
}
# Where a family's config names the norm epsilon and the activation its own way.
EPS_KEYS = {"gpt2": "layer_norm_epsilon"}
ACTIVATION_KEYS = {
    "gemma2": "hidden_activation",
    "gemma3_text": "hidden_activation",
    "gpt2": "activation_function",
}


def huggingface_config(spec) -> transformers.PretrainedConfig:
    return getattr(transformers, spec.architecture).config_class()


def test_the_family_names_come_from_the_registry():
    assert tuple(FAMILY_SPECS) == FAMILIES
    assert tuple(HUGGINGFACE_FAMILIES) == FAMILIES
    assert Family.__args__ == FAMILIES


@pytest.mark.parametrize("name", FAMILIES)
def test_the_architecture_is_the_family_in_transformers(name):
    spec = HUGGINGFACE_FAMILIES[name]
    assert spec.name == name
    assert huggingface_config(spec).model_type == name


@pytest.mark.parametrize("name", FAMILIES)
def test_the_defaults_are_transformers_defaults(name):
    spec = HUGGINGFACE_FAMILIES[name]
    defaults = huggingface_config(spec)
    for key, value in spec.huggingface_defaults.items():
        if (name, key) not in MOVED_IN_TRANSFORMERS_5:
            assert getattr(defaults, key) == value, key
    if name == "gpt_neox":
        rope = defaults.rope_parameters
        assert rope["partial_rotary_factor"] == spec.presets.partial_rotary_factor
    if name == "gemma3_text":
        rope = defaults.rope_parameters
        assert (
            rope["full_attention"]["rope_theta"]
            == spec.huggingface_defaults["rope_theta"]
        )
        assert (
            rope["sliding_attention"]["rope_theta"]
            == spec.huggingface_defaults["rope_local_base_freq"]
        )
    presets = spec.presets
    eps_key = "layer_norm_eps" if presets.norm == "layer" else "rms_norm_eps"
    assert getattr(defaults, EPS_KEYS.get(name, eps_key)) == presets.norm_eps
    activation_key = ACTIVATION_KEYS.get(name, "hidden_act")
    assert getattr(defaults, activation_key) == presets.hidden_act


@pytest.mark.parametrize("name", FAMILIES)
def test_every_weight_has_one_huggingface_name(name):
    config = TransformerConfig(
        name,
        vocab_size=8,
        hidden_size=16,
        intermediate_size=8,
        num_layers=2,
        num_heads=2,
        tie_word_embeddings=False,
    )
    parts = eqx.filter_eval_shape(initial_parts, config, jax.random.key(0))
    hf_names = []
    for weight in named_leaves(parts):
        hf_name = huggingface_name(weight, config)
        hf_names += hf_name if isinstance(hf_name, list) else [hf_name]
    assert len(hf_names) == len(set(hf_names))


@pytest.mark.parametrize("name", FAMILIES)
def test_the_presets_are_what_an_unset_config_resolves_to(name):
    config = TransformerConfig(name, 8, 16, 8, 1, 2)
    for field in dataclasses.fields(FAMILY_SPECS[name].presets):
        assert getattr(config, field.name) == getattr(
            FAMILY_SPECS[name].presets, field.name
        )


def test_every_family_has_a_parity_case():
    from test_huggingface import CASES

    assert {config.model_type for config, _ in CASES.values()} == set(FAMILIES)
