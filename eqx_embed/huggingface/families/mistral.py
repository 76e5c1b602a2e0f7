"""The checkpoints of Mistral (`MistralForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.mistral`."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    read_layer_types,
    read_rms_attention,
    write_rms_attention,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    keys.expect_false("attention_bias", "Mistral has no attention biases")
    sliding_window = keys.take("sliding_window")
    return dict(
        **read_rms_attention(keys),
        hidden_act=keys.take("hidden_act"),
        sliding_window=sliding_window,
        layer_types=read_layer_types(keys, sliding_window),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        **write_rms_attention(config),
        hidden_act=config.hidden_act,
        # Not layer_types: transformers takes a Mistral config with them for
        # Ministral.
        sliding_window=config.sliding_window,
    )


MISTRAL = HuggingFaceFamily(
    name="mistral",
    architecture="MistralForCausalLM",
    weight_names=LLAMA_WEIGHT_NAMES,
    huggingface_defaults=dict(
        max_position_embeddings=131072, tie_word_embeddings=False, sliding_window=4096
    ),
    read_config=read_config,
    write_config=write_config,
)
