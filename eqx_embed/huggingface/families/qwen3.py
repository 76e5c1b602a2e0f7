"""The checkpoints of Qwen3 (`Qwen3ForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.qwen3`."""

from typing import Any

from ...models import TransformerConfig
from . import qwen2
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    WeightNames,
    read_attention_bias,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    return dict(**qwen2.read_config(keys), **read_attention_bias(keys))


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(**qwen2.write_config(config), attention_bias=config.attention_bias)


QWEN3 = HuggingFaceFamily(
    name="qwen3",
    architecture="Qwen3ForCausalLM",
    weight_names=WeightNames(
        layer_prefix=LLAMA_WEIGHT_NAMES.layer_prefix,
        layer={
            **LLAMA_WEIGHT_NAMES.layer,
            "attention.query_norm": "self_attn.q_norm",
            "attention.key_norm": "self_attn.k_norm",
        },
        top=LLAMA_WEIGHT_NAMES.top,
    ),
    huggingface_defaults=dict(
        **qwen2.QWEN2.huggingface_defaults, head_dim=128, attention_bias=False
    ),
    read_config=read_config,
    write_config=write_config,
)
