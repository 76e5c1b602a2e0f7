"""GPT-2 (`GPT2LMHeadModel`): learned absolute positions added to the token
embeddings, LayerNorm, a plain GELU (tanh) MLP, biases everywhere, a tied head; the
files store the projections as Hugging Face's `Conv1D`, `(in, out)`, with the query,
key and value projections fused in `c_attn`, and spell the sizes their own way
(`n_embd`, `n_layer`, ...)."""

from typing import Any

from ...models import TransformerConfig
from ._spec import ConfigKeys, HuggingFaceFamily, WeightNames

# GPT-2's names for the keys every family shares.
_SHARED_NAMES = {
    "n_embd": "hidden_size",
    "n_layer": "num_hidden_layers",
    "n_head": "num_attention_heads",
    "n_positions": "max_position_embeddings",
    "n_inner": "intermediate_size",
}
# Keys of the sequence-classification head, which the language model does not have.
_SUMMARY_KEYS = (
    "summary_type",
    "summary_use_proj",
    "summary_activation",
    "summary_proj_to_labels",
    "summary_first_dropout",
)


def normalise_config(values: dict[str, Any]) -> dict[str, Any]:
    renamed = {_SHARED_NAMES.get(key, key): value for key, value in values.items()}
    if renamed.get("intermediate_size") is None and "hidden_size" in renamed:
        # transformers' default for a null n_inner.
        renamed["intermediate_size"] = 4 * renamed["hidden_size"]
    return renamed


def denormalise_config(values: dict[str, Any]) -> dict[str, Any]:
    names = {shared: own for own, shared in _SHARED_NAMES.items()}
    return {names.get(key, key): value for key, value in values.items()}


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    keys.expect_false("add_cross_attention", "it is a decoder-only model")
    keys.expect_false(
        "scale_attn_by_inverse_layer_idx", "scores are scaled by head_dim ** -0.5"
    )
    if keys.take_bool("scale_attn_weights") is False:
        raise ValueError(
            "config.json has scale_attn_weights=False, which this model does not "
            "implement (scores are scaled by head_dim ** -0.5)."
        )
    # Softmax in float32 is what this model always does.
    keys.take_bool("reorder_and_upcast_attn")
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "n_ctx", *_SUMMARY_KEYS):
        keys.take(key)
    return dict(
        norm_eps=keys.take_positive("layer_norm_epsilon"),
        hidden_act=keys.take("activation_function"),
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    return dict(
        layer_norm_epsilon=config.norm_eps,
        activation_function=config.hidden_act,
        scale_attn_weights=True,
    )


GPT2 = HuggingFaceFamily(
    name="gpt2",
    architecture="GPT2LMHeadModel",
    weight_names=WeightNames(
        layer_prefix="transformer.h.{}.",
        layer={
            "attention_norm": "ln_1",
            "attention.query_proj": "attn.query",
            "attention.key_proj": "attn.key",
            "attention.value_proj": "attn.value",
            "attention.output_proj": "attn.c_proj",
            "mlp_norm": "ln_2",
            "mlp.up": "mlp.c_fc",
            "mlp.down": "mlp.c_proj",
        },
        top={
            "embedding.embedding": "transformer.wte",
            "embedding.reverse_embedding": "lm_head",
            "position_embedding": "transformer.wpe",
            "final_norm": "transformer.ln_f",
        },
        fused_qkv="c_attn",
        fused_qkv_per_head=False,
        transposed=frozenset({"c_attn", "c_proj", "c_fc"}),
        base_model_prefix="transformer.",
    ),
    huggingface_defaults=dict(
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        layer_norm_epsilon=1e-5,
        activation_function="gelu_new",
    ),
    read_config=read_config,
    write_config=write_config,
    normalise_config=normalise_config,
    denormalise_config=denormalise_config,
)
