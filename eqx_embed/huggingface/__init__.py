"""Hugging Face checkpoints: `config.json` and `*.safetensors` read and written with
NumPy and the `safetensors` library (no PyTorch), driven by each family's format in
`families/`. Everything that knows `config.json` keys, weight names and
transformers' defaults lives here; `eqx_embed.models` knows the architectures only."""

from ._config_json import (
    config_from_huggingface as config_from_huggingface,
    config_to_huggingface as config_to_huggingface,
)
from ._model import (
    load_transformer as load_transformer,
    save_transformer as save_transformer,
)
from ._peft import (
    load_peft_adapter as load_peft_adapter,
    save_peft_adapter as save_peft_adapter,
)
