"""Gemma 2 (`Gemma2ForCausalLM`): Gemma with norms on the attention and MLP outputs
too, `tanh` soft caps on the attention scores and the logits, and sliding-window
attention on the even-numbered layers."""

import dataclasses

from ._spec import FamilySpec
from .gemma import GEMMA_PRESETS

GEMMA2 = FamilySpec(
    name="gemma2",
    presets=dataclasses.replace(GEMMA_PRESETS, sandwich_norms=True),
    full_attention_every=2,
)
