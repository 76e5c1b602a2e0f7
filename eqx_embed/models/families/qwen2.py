"""Qwen2 (`Qwen2ForCausalLM`): Llama with biases on the query, key and value
projections; the layers from `max_window_layers` on slide when `use_sliding_window`
is set."""

import dataclasses

from ._spec import LLAMA_PRESETS, FamilySpec

QWEN2 = FamilySpec(
    name="qwen2",
    presets=dataclasses.replace(LLAMA_PRESETS, attention_bias=True),
)
