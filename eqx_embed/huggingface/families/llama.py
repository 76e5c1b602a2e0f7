"""The checkpoints of Llama (`LlamaForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.llama`."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    read_attention_bias,
    read_rms_attention,
    write_rms_attention,
)


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


LLAMA = HuggingFaceFamily(
    name="llama",
    architecture="LlamaForCausalLM",
    weight_names=LLAMA_WEIGHT_NAMES,
    huggingface_defaults=dict(max_position_embeddings=2048, tie_word_embeddings=False),
    read_config=read_config,
    write_config=write_config,
)
