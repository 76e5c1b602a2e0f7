"""Hugging Face `config.json` to and from `TransformerConfig`, for any family: the keys
every family shares are read and written here, the family's own through its
`HuggingFaceFamily` (in `families/`)."""

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..models._config import FAMILIES, LAYER_TYPES, TransformerConfig
from ..nn._contracts import check_positive
from .families import ConfigKeys, huggingface_family

# Keys that do not change the logits: bookkeeping, special token ids, initialisation,
# caching, and dropout (this model has none; it changes training, never the logits).
_INERT_KEYS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "cache_implementation",
        "classifier_dropout",
        "dtype",
        "eos_token_id",
        "hidden_dropout",
        "initializer_range",
        "is_decoder",
        "model_type",
        "output_attentions",
        "output_hidden_states",
        "pad_token_id",
        "pretraining_tp",
        "return_dict",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    }
)

# The RoPE rules whose tables do not depend on the sequence length in transformers.
_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def _check_all_taken(keys: ConfigKeys) -> None:
    unknown = sorted(set(keys.values) - _INERT_KEYS)
    if unknown:
        raise ValueError(
            f"config.json has keys that this {keys.family.name} model does not "
            "implement and that may change its output: "
            + ", ".join(f"{key}={keys.values[key]!r}" for key in unknown)
            + "."
        )


def _rope_settings(keys: ConfigKeys, max_position_embeddings: int) -> dict[str, Any]:
    """`rope_theta`, `rope_scaling` and `partial_rotary_factor` from either layout:
    transformers 4's `rope_theta` + `rope_scaling` (GPT-NeoX: `rotary_emb_base`,
    `rotary_pct`) or transformers 5's `rope_parameters`."""
    parameters = dict(keys.take("rope_parameters") or keys.take("rope_scaling") or {})
    local_theta = None
    if keys.family.local_rope:
        parameters, local_theta = _local_rope(keys, parameters)
    elif parameters.keys() & set(LAYER_TYPES):
        raise ValueError(
            f"config.json gives RoPE settings per layer type ({sorted(parameters)}), "
            f"which {keys.family.name} models do not have."
        )
    theta = parameters.pop("rope_theta", None)
    for key in ("rope_theta", "rotary_emb_base"):
        value = keys.take(key)
        theta = value if theta is None else theta
    partial = parameters.pop("partial_rotary_factor", None)
    for key in ("partial_rotary_factor", "rotary_pct"):
        value = keys.take(key)
        partial = value if partial is None else partial
    rope_type = parameters.pop("rope_type", parameters.pop("type", "default"))
    if rope_type not in _ROPE_TYPES:
        raise ValueError(
            f"config.json has RoPE scaling rope_type={rope_type!r}, which this model "
            f"does not implement (in transformers, 'dynamic' and 'longrope' depend on "
            f"the sequence length); supported: {_ROPE_TYPES}."
        )
    scaling = None
    if rope_type != "default":
        scaling = {"rope_type": rope_type, **parameters}
        if rope_type in ("llama3", "yarn"):
            scaling.setdefault(
                "original_max_position_embeddings", max_position_embeddings
            )
        if rope_type == "yarn" and scaling.get("factor") is None:
            scaling["max_position_embeddings"] = max_position_embeddings
    elif parameters:
        raise ValueError(
            f"config.json's RoPE settings have keys {sorted(parameters)} but no "
            "scaling rule (rope_type) that uses them."
        )
    if keys.family.presets.position_embedding != "rope":
        given = dict(rope_theta=theta, partial_rotary_factor=partial, scaling=scaling)
        given = {key: value for key, value in given.items() if value is not None}
        if given:
            raise ValueError(
                f"config.json has RoPE settings ({given}), but {keys.family.name} "
                "models have learned positions."
            )
        return {}
    settings: dict[str, Any] = dict(rope_scaling=scaling, rope_local_theta=local_theta)
    if theta is not None:
        check_positive("config.json's rope_theta", theta)
        settings["rope_theta"] = float(theta)
    if partial is not None:
        check_positive("config.json's partial_rotary_factor", partial)
        if not keys.family.partial_rotary and partial != 1:
            raise ValueError(
                f"config.json has partial_rotary_factor={partial!r}, which "
                f"transformers' {keys.family.name} model stores but does not apply "
                "(it rotates the whole head): refused rather than read two ways."
            )
        settings["partial_rotary_factor"] = float(partial)
    return settings


def _local_rope(
    keys: ConfigKeys, parameters: dict[str, Any]
) -> tuple[dict[str, Any], float]:
    """Splits Gemma 3's RoPE settings: those of the full-attention layers, in the
    layout of every other family, and the local theta of the sliding layers, from
    transformers 5's `rope_parameters` per layer type or transformers 4's
    `rope_local_base_freq`."""
    local: dict[str, Any] = {}
    if parameters.keys() & set(LAYER_TYPES):
        unknown = parameters.keys() - set(LAYER_TYPES)
        if unknown:
            raise ValueError(
                "config.json's rope_parameters mixes layer types with "
                f"{sorted(unknown)}."
            )
        local = dict(parameters.get("sliding_attention") or {})
        parameters = dict(parameters.get("full_attention") or {})
    elif keys.given.get("rope_parameters"):
        # transformers reads Gemma 3's rope_parameters per layer type only: a flat
        # dict's theta and scaling are ignored (both kinds of layer take their
        # defaults), which no reader of the file would expect.
        raise ValueError(
            f"config.json's rope_parameters ({parameters!r}) must be given per layer "
            f"type ({LAYER_TYPES}) for {keys.family.name}: transformers ignores a "
            "flat one."
        )
    rope_type = local.pop("rope_type", local.pop("type", "default"))
    local_theta = local.pop("rope_theta", None)
    if local_theta is None:
        local_theta = keys.take("rope_local_base_freq")
    if rope_type != "default" or local:
        raise ValueError(
            "config.json scales the RoPE of the sliding layers (rope_type="
            f"{rope_type!r}, {sorted(local)}), which this model does not implement."
        )
    check_positive("config.json's local rope_theta", local_theta)
    return parameters, float(local_theta)


def config_from_huggingface(
    values: Mapping[str, Any],
    *,
    param_dtype: str | None = None,
    activation_dtype: str | None = None,
    out_of_range: str = "nan",
) -> TransformerConfig:
    """The [`TransformerConfig`][eqx_embed.TransformerConfig] of a Hugging Face
    `config.json` (as a dict). Unsupported keys or values raise a `ValueError` naming
    them."""
    model_type = values.get("model_type")
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        raise ValueError(
            f"config.json has model_type={model_type!r}; supported: {FAMILIES}."
        )
    spec = huggingface_family(model_type)
    if spec.normalise_config is not None:
        values = spec.normalise_config(dict(values))
    keys = ConfigKeys(values, spec)
    if param_dtype is None:
        stored = values.get("dtype") or values.get("torch_dtype") or "float32"
        param_dtype = stored if stored in ("float32", "bfloat16", "float16") else None
        param_dtype = param_dtype or "float32"
    max_position_embeddings = keys.take("max_position_embeddings")
    settings: dict[str, Any] = dict(
        family=model_type,
        vocab_size=keys.require("vocab_size"),
        hidden_size=keys.require("hidden_size"),
        intermediate_size=keys.require("intermediate_size"),
        num_layers=keys.require("num_hidden_layers"),
        num_heads=keys.require("num_attention_heads"),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=keys.take_bool("tie_word_embeddings"),
        param_dtype=param_dtype,
        activation_dtype=activation_dtype or param_dtype,
        out_of_range=out_of_range,
        **_rope_settings(keys, max_position_embeddings),
    )
    settings.update(spec.read_config(keys))
    _check_all_taken(keys)
    # Left out: the family's preset.
    return TransformerConfig(
        **{name: value for name, value in settings.items() if value is not None}
    )


def config_to_huggingface(config: TransformerConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` (as a dict) of `config`. Raises a `ValueError`
    naming the settings that the family's Hugging Face config cannot express."""
    spec = huggingface_family(config.family)
    values: dict[str, Any] = dict(
        architectures=[spec.architecture],
        model_type=spec.name,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        dtype=config.param_dtype,
        **spec.write_config(config),
    )
    if spec.denormalise_config is not None:
        values = spec.denormalise_config(values)
    # What the family cannot express is what does not come back when read.
    reread = config_from_huggingface(
        values,
        param_dtype=config.param_dtype,
        activation_dtype=config.activation_dtype,
        out_of_range=config.out_of_range,
    )
    different = [
        f"{field.name}={getattr(config, field.name)!r}"
        for field in dataclasses.fields(config)
        if getattr(config, field.name) != getattr(reread, field.name)
        and field.name not in ("layer_types", "query_pre_attn_scalar")
    ]
    if reread.layer_windows != config.layer_windows or (
        (reread.query_pre_attn_scalar or reread.head_dim)
        != (config.query_pre_attn_scalar or config.head_dim)
    ):
        different.append("the per-layer attention (layer_types, sliding_window)")
    if different:
        raise ValueError(
            f"A Hugging Face {spec.name} config cannot express these settings: "
            + ", ".join(different)
            + "."
        )
    return values
