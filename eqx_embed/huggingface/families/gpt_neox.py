"""GPT-NeoX (`GPTNeoXForCausalLM`, Pythia): LayerNorm with biases, a plain GELU MLP,
biases everywhere, a parallel residual, RoPE on a quarter of each head, and the query,
key and value projections fused per head in the files."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    ConfigKeys,
    HuggingFaceFamily,
    WeightNames,
    read_attention_bias,
    rope_scaling_dict,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    # transformers ignores head_dim for GPT-NeoX: it must agree or be absent.
    head_dim = keys.take("head_dim")
    hidden_size = keys.given["hidden_size"]
    num_heads = keys.given["num_attention_heads"]
    if head_dim is not None and head_dim * num_heads != hidden_size:
        raise ValueError(
            f"config.json has head_dim={head_dim!r}, but GPT-NeoX's heads are "
            f"hidden_size / num_attention_heads = {hidden_size} / {num_heads} wide."
        )
    return dict(
        **read_attention_bias(keys),
        norm_eps=keys.take_positive("layer_norm_eps"),
        hidden_act=keys.take("hidden_act"),
        parallel_residual=keys.take_bool("use_parallel_residual"),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        rotary_emb_base=config.rope_theta,
        rotary_pct=config.partial_rotary_factor,
        rope_scaling=rope_scaling_dict(config),
        layer_norm_eps=config.norm_eps,
        hidden_act=config.hidden_act,
        attention_bias=config.attention_bias,
        use_parallel_residual=config.parallel_residual,
    )


GPT_NEOX = HuggingFaceFamily(
    name="gpt_neox",
    architecture="GPTNeoXForCausalLM",
    weight_names=WeightNames(
        layer_prefix="gpt_neox.layers.{}.",
        layer={
            "attention_norm": "input_layernorm",
            "attention.query_proj": "attention.query",
            "attention.key_proj": "attention.key",
            "attention.value_proj": "attention.value",
            "attention.output_proj": "attention.dense",
            "mlp_norm": "post_attention_layernorm",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h",
        },
        top={
            "embedding.embedding": "gpt_neox.embed_in",
            "embedding.reverse_embedding": "embed_out",
            "final_norm": "gpt_neox.final_layer_norm",
        },
        fused_qkv="query_key_value",
    ),
    huggingface_defaults=dict(
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rotary_pct=0.25,
        use_parallel_residual=True,
        attention_bias=True,
    ),
    read_config=read_config,
    write_config=write_config,
    partial_rotary=True,
)
