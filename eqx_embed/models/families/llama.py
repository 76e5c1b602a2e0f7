"""Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU, grouped-query attention, optional
biases on the attention and the MLP."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._spec import (
    LLAMA_PRESETS,
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    FamilySpec,
    read_attention_bias,
    read_rms_attention,
    write_rms_attention,
)

if TYPE_CHECKING:
    from .._config import TransformerConfig


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    return dict(
        **read_rms_attention(keys),
        **read_attention_bias(keys),
        hidden_act=keys.take("hidden_act"),
        mlp_bias=keys.take_bool("mlp_bias"),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        **write_rms_attention(config),
        hidden_act=config.hidden_act,
        attention_bias=config.attention_bias,
        mlp_bias=config.mlp_bias,
    )


LLAMA = FamilySpec(
    name="llama",
    architecture="LlamaForCausalLM",
    presets=LLAMA_PRESETS,
    weight_names=LLAMA_WEIGHT_NAMES,
    huggingface_defaults=dict(max_position_embeddings=2048, tie_word_embeddings=False),
    read_config=read_config,
    write_config=write_config,
)
