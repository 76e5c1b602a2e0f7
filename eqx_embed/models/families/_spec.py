"""What a model family is, as data: `FamilySpec`, and the presets that the family
files (`llama.py`, `gemma2.py`, ...) build theirs from. Architecture only: the
Hugging Face names of a family (its `config.json` keys, weight names and
transformers' defaults) live in `eqx_embed.huggingface.families`.
"""

import dataclasses
from typing import Literal

NormKind = Literal["rms", "rms_unit_offset", "layer"]
"""RMSNorm, Gemma's RMSNorm scaled by `1 + weight`, or LayerNorm with a bias."""

PositionKind = Literal["rope", "learned"]
"""Rotary positions on the queries and keys of every layer, or a learned absolute
position embedding added to the token embeddings (GPT-2)."""


@dataclasses.dataclass(frozen=True)
class Presets:
    """The values a family gives the `TransformerConfig` fields of the same names
    when they are left `None`: its structure flags and its defaults."""

    norm: NormKind
    gated_mlp: bool  # GeGLU / SwiGLU rather than a plain MLP
    scale_embeddings: bool  # by sqrt(hidden_size), Gemma's normaliser
    sandwich_norms: bool  # norms on the attention and MLP outputs too (Gemma 2)
    parallel_residual: bool  # GPT-NeoX's x + attention(norm(x)) + mlp(norm'(x))
    norm_eps: float
    hidden_act: str
    attention_bias: bool
    attention_output_bias: bool
    mlp_bias: bool
    partial_rotary_factor: float
    qk_norm: bool = False  # a norm on each query and key head (Qwen3, Gemma 3)
    position_embedding: PositionKind = "rope"


LLAMA_PRESETS = Presets(
    norm="rms",
    gated_mlp=True,
    scale_embeddings=False,
    sandwich_norms=False,
    parallel_residual=False,
    norm_eps=1e-6,
    hidden_act="silu",
    attention_bias=False,
    attention_output_bias=False,
    mlp_bias=False,
    partial_rotary_factor=1.0,
)
"""Llama's presets, which most families vary in a field or two."""


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """One model family's architecture, as data.

    - `name`: Hugging Face's `model_type`, and `TransformerConfig.family`.
    - `presets`: the structure flags and defaults; see `Presets`.
    - `full_attention_every`: with a `sliding_window` and no `layer_types`, every
        `n`-th layer attends fully and the others slide (`2` for Gemma 2, whose
        even-numbered layers slide; `6` for Gemma 3's 5:1 pattern). `None`: every
        layer slides.
    """

    name: str
    presets: Presets
    full_attention_every: int | None = None
