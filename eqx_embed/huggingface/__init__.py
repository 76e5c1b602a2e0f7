"""Hugging Face checkpoints: `config.json` and `*.safetensors` read and written with
NumPy alone (no PyTorch), driven by the model families' specs."""

from ._config_json import (
    config_from_huggingface as config_from_huggingface,
    config_to_huggingface as config_to_huggingface,
)
from ._model import (
    load_transformer as load_transformer,
    save_transformer as save_transformer,
)
