"""Llama (`LlamaForCausalLM`): RMSNorm, SwiGLU, grouped-query attention, optional
biases on the attention and the MLP."""

from ._spec import LLAMA_PRESETS, FamilySpec

LLAMA = FamilySpec(
    name="llama",
    presets=LLAMA_PRESETS,
)
