"""The checkpoints of Gemma 3, text only (`Gemma3ForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.gemma3`."""

import warnings
from typing import Any

from ...models import TransformerConfig
from ...models.families.gemma3 import FULL_ATTENTION_EVERY
from . import gemma2
from ._spec import ConfigKeys, HuggingFaceFamily, WeightNames


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    # transformers 4 gave the pattern as a number; 5 lists the layer types. Without
    # them, transformers 5 reads `sliding_window_pattern` only: the
    # `_sliding_window_pattern` it saves beside `layer_types` is ignored, as there.
    pattern = keys.take("sliding_window_pattern") or FULL_ATTENTION_EVERY
    keys.take("_sliding_window_pattern")
    settings = gemma2.read_config(keys)
    cap = settings.pop("attention_logit_soft_cap")
    if cap is not None:
        warnings.warn(
            f"config.json has attn_logit_softcapping={cap!r}, which transformers "
            "stores but does not apply to Gemma 3's attention: the model follows "
            "transformers and does not cap it.",
            stacklevel=2,
        )
    if settings["layer_types"] is None and settings["sliding_window"] is not None:
        settings["layer_types"] = tuple(
            "full_attention" if (layer + 1) % pattern == 0 else "sliding_attention"
            for layer in range(keys.given["num_hidden_layers"])
        )
    return settings


def write_config(config: TransformerConfig) -> dict[str, Any]:
    values = gemma2.write_config(config)
    full = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling is not None:
        full.update(config.rope_scaling.to_dict())
    # Not written: transformers would not apply it (see read_config), so a model
    # with the cap is not exported (its config does not read back).
    del values["rope_theta"], values["rope_scaling"], values["attn_logit_softcapping"]
    values["rope_parameters"] = {
        "full_attention": full,
        "sliding_attention": {
            "rope_type": "default",
            "rope_theta": config.rope_local_theta or config.rope_theta,
        },
    }
    return values


GEMMA3 = HuggingFaceFamily(
    name="gemma3_text",
    architecture="Gemma3ForCausalLM",
    weight_names=WeightNames(
        layer_prefix=gemma2.GEMMA2.weight_names.layer_prefix,
        layer={
            **gemma2.GEMMA2.weight_names.layer,
            "attention.query_norm": "self_attn.q_norm",
            "attention.key_norm": "self_attn.k_norm",
        },
        top=gemma2.GEMMA2.weight_names.top,
    ),
    huggingface_defaults=dict(
        max_position_embeddings=131_072,
        tie_word_embeddings=True,
        head_dim=256,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
    ),
    read_config=read_config,
    write_config=write_config,
    local_rope=True,
)
