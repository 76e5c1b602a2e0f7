"""Qwen3 (`Qwen3ForCausalLM`): Qwen2 without its query/key/value biases (or with
biases on all four projections, by `attention_bias`), and an RMSNorm on each query
and key head before the rotation."""

import dataclasses

from ._spec import LLAMA_PRESETS, FamilySpec

QWEN3 = FamilySpec(
    name="qwen3",
    presets=dataclasses.replace(LLAMA_PRESETS, qk_norm=True),
)
