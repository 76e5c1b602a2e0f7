"""One architecture spec per model family: `FamilySpec`s registered by their
Hugging Face `model_type`. A new family is a new module here defining its spec, plus
its entry in `FAMILY_SPECS` (the order is the one error messages and the docs list
them in), and its checkpoint format in `eqx_embed.huggingface.families`."""

from ._spec import (
    FamilySpec as FamilySpec,
    NormKind as NormKind,
    PositionKind as PositionKind,
    Presets as Presets,
)
from .gemma import GEMMA
from .gemma2 import GEMMA2
from .gemma3 import GEMMA3
from .gpt2 import GPT2
from .gpt_neox import GPT_NEOX
from .llama import LLAMA
from .mistral import MISTRAL
from .qwen2 import QWEN2
from .qwen3 import QWEN3

FAMILY_SPECS: dict[str, FamilySpec] = {
    spec.name: spec
    for spec in (
        LLAMA,
        MISTRAL,
        QWEN2,
        QWEN3,
        GEMMA,
        GEMMA2,
        GEMMA3,
        GPT_NEOX,
        GPT2,
    )
}
"""Every family `TransformerConfig` accepts, by name."""


def family_spec(name: str) -> FamilySpec:
    """The spec of family `name`; a `ValueError` lists the known ones otherwise."""
    if not isinstance(name, str) or name not in FAMILY_SPECS:
        raise ValueError(f"family must be one of {tuple(FAMILY_SPECS)}, got {name!r}.")
    return FAMILY_SPECS[name]
