"""Mistral (`MistralForCausalLM`): Llama without biases, every layer attending
through a sliding window unless `layer_types` says otherwise."""

from ._spec import LLAMA_PRESETS, FamilySpec

MISTRAL = FamilySpec(
    name="mistral",
    presets=LLAMA_PRESETS,
)
