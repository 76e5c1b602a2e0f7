"""Gemma 3, text only (`Gemma3ForCausalLM`, `model_type` `gemma3_text`): Gemma 2
without its soft caps by default, with an RMSNorm on each query and key head, five
sliding-window layers for every full one, and two RoPEs: the sliding layers rotate
with a local theta (10,000), the full ones with `rope_theta` (1,000,000) and its
scaling (linear, factor 8, in the released checkpoints)."""

import dataclasses

from . import gemma2
from ._spec import FamilySpec

FULL_ATTENTION_EVERY = 6
"""One layer in six attends fully; the others slide."""

GEMMA3 = FamilySpec(
    name="gemma3_text",
    presets=dataclasses.replace(gemma2.GEMMA2.presets, qk_norm=True),
    full_attention_every=FULL_ATTENTION_EVERY,
)
