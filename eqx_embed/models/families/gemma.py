"""Gemma (`GemmaForCausalLM`): Llama with RMSNorm scaled by `1 + weight`, GeGLU, and
the embeddings scaled by `sqrt(hidden_size)`; tied by default."""

import dataclasses

from ._spec import LLAMA_PRESETS, FamilySpec

GEMMA_PRESETS = dataclasses.replace(
    LLAMA_PRESETS,
    norm="rms_unit_offset",
    scale_embeddings=True,
    hidden_act="gelu_pytorch_tanh",
)

GEMMA = FamilySpec(
    name="gemma",
    presets=GEMMA_PRESETS,
)
