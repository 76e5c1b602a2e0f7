"""One Hugging Face format per model family: `HuggingFaceFamily`s registered by
their `model_type`, beside the architecture of the same name in
`eqx_embed.models.families`. A new family is a new module here defining its format,
plus its entry in `HUGGINGFACE_FAMILIES`."""

from ._spec import (
    ConfigKeys as ConfigKeys,
    HuggingFaceFamily as HuggingFaceFamily,
    WeightNames as WeightNames,
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

HUGGINGFACE_FAMILIES: dict[str, HuggingFaceFamily] = {
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
"""The checkpoint format of every family `TransformerConfig` accepts, by name."""


def huggingface_family(name: str) -> HuggingFaceFamily:
    """The checkpoint format of family `name` (a `TransformerConfig.family`)."""
    return HUGGINGFACE_FAMILIES[name]
