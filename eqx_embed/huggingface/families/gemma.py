"""The checkpoints of Gemma (`GemmaForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.gemma`."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    read_activation,
    read_attention_bias,
    read_rms_attention,
    write_rms_attention,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    keys.expect_false("use_bidirectional_attention", "attention is causal")
    return dict(
        **read_rms_attention(keys),
        **read_attention_bias(keys),
        hidden_act=read_activation(keys, "hidden_act", "hidden_activation"),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        **write_rms_attention(config),
        hidden_act=config.hidden_act,
        attention_bias=config.attention_bias,
    )


GEMMA = HuggingFaceFamily(
    name="gemma",
    architecture="GemmaForCausalLM",
    weight_names=LLAMA_WEIGHT_NAMES,
    huggingface_defaults=dict(
        max_position_embeddings=8192, tie_word_embeddings=True, head_dim=256
    ),
    read_config=read_config,
    write_config=write_config,
)
