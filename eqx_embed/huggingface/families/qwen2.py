"""The checkpoints of Qwen2 (`Qwen2ForCausalLM`): its `config.json` keys,
weight names and transformers' defaults. The architecture is
`eqx_embed.models.families.qwen2`."""

from typing import Any

from ...models import TransformerConfig
from ._spec import (
    LLAMA_WEIGHT_NAMES,
    ConfigKeys,
    HuggingFaceFamily,
    layer_types,
    read_layer_types,
    read_rms_attention,
    write_rms_attention,
)


def read_config(keys: ConfigKeys) -> dict[str, Any]:
    keys.expect_false("use_mrope", "multimodal RoPE")
    sliding_window = keys.take("sliding_window")
    if not keys.take_bool("use_sliding_window"):
        sliding_window = None
    first_sliding = keys.take("max_window_layers")
    if isinstance(first_sliding, bool) or not isinstance(first_sliding, int):
        raise ValueError(
            f"config.json has max_window_layers={first_sliding!r}; it must be an "
            "integer."
        )
    given = read_layer_types(keys, sliding_window)
    num_layers = keys.given["num_hidden_layers"]
    if given is None and sliding_window is not None and isinstance(num_layers, int):
        given = tuple(
            "sliding_attention" if layer >= first_sliding else "full_attention"
            for layer in range(num_layers)
        )
    return dict(
        **read_rms_attention(keys),
        hidden_act=keys.take("hidden_act"),
        sliding_window=sliding_window,
        layer_types=given,
    )


def write_config(config: TransformerConfig) -> dict[str, Any]:
    sliding = [i for i, window in enumerate(config.layer_windows) if window]
    return dict(
        **write_rms_attention(config),
        hidden_act=config.hidden_act,
        sliding_window=config.sliding_window,
        use_sliding_window=bool(sliding),
        max_window_layers=sliding[0] if sliding else config.num_layers,
        layer_types=layer_types(config),
    )


QWEN2 = HuggingFaceFamily(
    name="qwen2",
    architecture="Qwen2ForCausalLM",
    weight_names=LLAMA_WEIGHT_NAMES,
    huggingface_defaults=dict(
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        sliding_window=4096,
        use_sliding_window=False,
        max_window_layers=28,
    ),
    read_config=read_config,
    write_config=write_config,
)
