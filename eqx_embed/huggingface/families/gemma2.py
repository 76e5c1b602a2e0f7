"""The checkpoints of Gemma 2 (`Gemma2ForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.gemma2`."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    WeightNames,
    layer_types,
    read_activation,
    read_attention_bias,
    read_layer_types,
    read_rms_attention,
    write_rms_attention,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    keys.expect_false("use_bidirectional_attention", "attention is causal")
    sliding_window = keys.take("sliding_window")
    size = keys.take("sliding_window_size")
    if size not in (None, sliding_window):
        raise ValueError(
            f"config.json has sliding_window={sliding_window} and "
            f"sliding_window_size={size}, which disagree."
        )
    return dict(
        **read_rms_attention(keys),
        **read_attention_bias(keys),
        hidden_act=read_activation(keys, "hidden_activation", "hidden_act"),
        sliding_window=sliding_window,
        layer_types=read_layer_types(keys, sliding_window),
        query_pre_attn_scalar=keys.take_positive("query_pre_attn_scalar"),
        attention_logit_soft_cap=keys.take_positive("attn_logit_softcapping"),
        final_logit_soft_cap=keys.take_positive("final_logit_softcapping"),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        **write_rms_attention(config),
        hidden_activation=config.hidden_act,
        attention_bias=config.attention_bias,
        sliding_window=config.sliding_window,
        layer_types=layer_types(config),
        query_pre_attn_scalar=config.query_pre_attn_scalar or config.head_dim,
        attn_logit_softcapping=config.attention_logit_soft_cap,
        final_logit_softcapping=config.final_logit_soft_cap,
    )


GEMMA2 = HuggingFaceFamily(
    name="gemma2",
    architecture="Gemma2ForCausalLM",
    weight_names=WeightNames(
        layer_prefix=LLAMA_WEIGHT_NAMES.layer_prefix,
        layer={
            **LLAMA_WEIGHT_NAMES.layer,
            "attention_output_norm": "post_attention_layernorm",
            "mlp_norm": "pre_feedforward_layernorm",
            "mlp_output_norm": "post_feedforward_layernorm",
        },
        top=LLAMA_WEIGHT_NAMES.top,
    ),
    huggingface_defaults=dict(
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    read_config=read_config,
    write_config=write_config,
)
