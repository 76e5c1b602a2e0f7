"""The safetensors weights of a Hugging Face checkpoint to and from the model's arrays,
by name, with NumPy (the files themselves: `_safetensors.py`).

Weights travel as a flat dict keyed by the model's attribute paths
(`"blocks.attention.query_proj.weight"`), with the layers stacked along a leading axis
as `TransformerLM` keeps them.
"""

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..models._config import TransformerConfig
from ._config_json import config_from_huggingface, config_to_huggingface
from ._safetensors import (
    CONFIG_NAME,
    adoptable_empty,
    checkpoint_files,
    read_json,
    read_safetensors,
    write_checkpoint_files,
)
from .families import huggingface_family


def top_level_name(name: str, config: TransformerConfig) -> str:
    """The Hugging Face name of the model's weight `name` outside the blocks."""
    module, leaf = name.rsplit(".", 1)
    return f"{huggingface_family(config.family).weight_names.top[module]}.{leaf}"


def huggingface_name(name: str, config: TransformerConfig) -> str | list[str]:
    """The Hugging Face name of the model's weight `name`, or, for a stacked block
    weight, the list of per-layer names, from the family's format."""
    if not name.startswith("blocks."):
        return top_level_name(name, config)
    return layer_names(name, config)


def layer_names(name: str, config: TransformerConfig) -> list[str]:
    """The per-layer Hugging Face names of the model's stacked block weight `name`
    (`blocks.` ...), from the family's format."""
    names = huggingface_family(config.family).weight_names
    module, leaf = name.removeprefix("blocks.").rsplit(".", 1)
    return [
        f"{names.layer_prefix.format(layer)}{names.layer[module]}.{leaf}"
        for layer in range(config.num_layers)
    ]


def split_qkv(tensors: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """Replaces each fused query/key/value weight and bias of the files (GPT-NeoX's
    `query_key_value`, GPT-2's `c_attn`) by separate `query`, `key` and `value`
    tensors, in place. The fused rows are laid out per head, `(heads, 3, head_dim)`
    (GPT-NeoX), or as all queries, all keys, all values (GPT-2)."""
    names = huggingface_family(config.family).weight_names
    fused = (f".{names.fused_qkv}.weight", f".{names.fused_qkv}.bias")
    for fused_name in [name for name in tensors if name.endswith(fused)]:
        array = tensors.pop(fused_name)
        prefix, leaf = fused_name.rsplit(f".{names.fused_qkv}.", 1)
        rest = array.shape[1:]
        if names.fused_qkv_per_head:
            parts = array.reshape(config.num_heads, 3, -1, *rest).swapaxes(0, 1)
        else:
            parts = array.reshape(3, -1, *rest)
        for part, rows in zip(("query", "key", "value"), parts, strict=True):
            tensors[f"{prefix}.{part}.{leaf}"] = rows.reshape(-1, *rest)


def fuse_qkv(tensors: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """The inverse of `split_qkv`, in place."""
    names = huggingface_family(config.family).weight_names
    for query_name in [n for n in tensors if n.rsplit(".", 2)[-2] == "query"]:
        prefix, leaf = query_name.rsplit(".query.", 1)
        parts = [
            tensors.pop(f"{prefix}.{part}.{leaf}") for part in ("query", "key", "value")
        ]
        rest = parts[0].shape[1:]
        if names.fused_qkv_per_head:
            parts = [part.reshape(config.num_heads, -1, *rest) for part in parts]
            fused = np.stack(parts, axis=1)
        else:
            fused = np.stack(parts)
        tensors[f"{prefix}.{names.fused_qkv}.{leaf}"] = fused.reshape(-1, *rest)


def transpose_conv1d(tensors: dict[str, np.ndarray], config: TransformerConfig) -> None:
    """Transposes, in place, the weights that the files store as `(in, out)`
    (Hugging Face's `Conv1D`); its own inverse."""
    transposed = huggingface_family(config.family).weight_names.transposed
    suffixes = tuple(f".{module}.weight" for module in transposed)
    for name in [n for n in tensors if suffixes and n.endswith(suffixes)]:
        tensors[name] = tensors[name].T


def _stacked_layers(
    tensors: dict[str, np.ndarray], names: list[str], directory: pathlib.Path
) -> np.ndarray:
    """The layers `names` of one block weight, stacked along a new leading axis (as
    `np.stack` would, promoting their dtypes). Each layer leaves `tensors` as it is
    copied, so that its memory goes as the stack's comes: loading holds the weights
    once, plus one layer."""
    shapes = {tensors[name].shape for name in names}
    if len(shapes) > 1:
        raise ValueError(
            f"The checkpoint in {directory} stores the layers {names[0]} ... "
            f"{names[-1]} with different shapes: {sorted(shapes)}."
        )
    dtype = np.result_type(*(tensors[name].dtype for name in names))
    stack = adoptable_empty((len(names), *shapes.pop()), dtype)
    for layer, name in enumerate(names):
        stack[layer] = tensors.pop(name)
    return stack


# The model's name of its lookup table, and of the decode head, which a tied model
# does not have.
VOCAB_TABLE = "embedding.embedding.weight"
UNTIED_HEAD = "embedding.reverse_embedding.weight"

# Buffers that old checkpoints saved and that transformers recomputes.
_RECOMPUTED_SUFFIXES = (
    ".rotary_emb.inv_freq",
    ".attention.bias",
    ".attention.masked_bias",
    ".attn.bias",
    ".attn.masked_bias",
)


def read_config(
    path: str | pathlib.Path,
    *,
    param_dtype: str | None = None,
    activation_dtype: str | None = None,
    out_of_range: str = "nan",
) -> TransformerConfig:
    """The [`TransformerConfig`][eqx_embed.TransformerConfig] of the `config.json` in
    the checkpoint directory `path`."""
    config_file = pathlib.Path(path) / CONFIG_NAME
    if not os.path.lexists(config_file):
        raise ValueError(f"{path} has no {CONFIG_NAME}.")
    values = read_json(config_file)
    if not isinstance(values, dict):
        raise ValueError(
            f"{config_file} holds a JSON {type(values).__name__}, not an object."
        )
    try:
        return config_from_huggingface(
            values,
            param_dtype=param_dtype,
            activation_dtype=activation_dtype,
            out_of_range=out_of_range,
        )
    except ValueError as error:
        raise ValueError(f"{config_file}: {error}") from error


def read_weights(
    path: str | pathlib.Path, config: TransformerConfig, names: list[str]
) -> dict[str, np.ndarray]:
    """The weights of the checkpoint directory `path`, by the model's weight names.

    **Arguments:**

    - `path`: the directory, with `*.safetensors` files (sharded ones listed in
        `model.safetensors.index.json`).
    - `config`: the model's config, as `read_config` returns it.
    - `names`: the model's weight names (`"blocks.mlp.up.weight"`).

    **Returns:**

    A dict from each of `names` to a NumPy array, the layers of block weights stacked
    along a leading axis. A weight missing from the files, or one in the files that
    the model has no place for, raises a `ValueError` naming it. A tied config whose
    files also store a decode head that differs from the embedding: that head as
    well, under `UNTIED_HEAD`.
    """
    directory = pathlib.Path(path)
    tensors: dict[str, np.ndarray] = {}
    for file in checkpoint_files(directory):
        for name, array in read_safetensors(file).items():
            if name in tensors:
                raise ValueError(f"{name} is stored twice in {directory}.")
            if not name.endswith(_RECOMPUTED_SUFFIXES) and not jnp.issubdtype(
                array.dtype, jnp.floating
            ):
                raise ValueError(
                    f"{file} stores {name} as {array.dtype}; a weight must be stored "
                    "as a floating-point type (F16, BF16, F32 or F64)."
                )
            tensors[name] = array
    for name in [n for n in tensors if n.endswith(_RECOMPUTED_SUFFIXES)]:
        del tensors[name]
    prefix = huggingface_family(config.family).weight_names.base_model_prefix
    if prefix and not any(name.startswith(prefix) for name in tensors):
        # The base model's files alone: transformers adds the prefix back.
        tensors = {f"{prefix}{name}": array for name, array in tensors.items()}
    transpose_conv1d(tensors, config)
    if huggingface_family(config.family).weight_names.fused_qkv:
        split_qkv(tensors, config)
    arrays = {}
    for name in names:
        hf_name = huggingface_name(name, config)
        hf_names = hf_name if isinstance(hf_name, list) else [hf_name]
        missing = [n for n in hf_names if n not in tensors]
        if missing:
            raise ValueError(
                f"The checkpoint in {directory} has no {missing[0]} (for the model's "
                f"{name}), which its config implies."
            )
        if isinstance(hf_name, list):
            arrays[name] = _stacked_layers(tensors, hf_name, directory)
        else:
            arrays[name] = tensors.pop(hf_name)
    if config.tie_word_embeddings:
        head = tensors.pop(top_level_name(UNTIED_HEAD, config), None)
        # A copy of the embedding is the tied head; a different head is returned too,
        # to be loaded untied, as transformers does: never dropped.
        if head is not None and not np.array_equal(head, arrays[VOCAB_TABLE]):
            arrays[UNTIED_HEAD] = head
    if tensors:
        raise ValueError(
            f"The checkpoint in {directory} has weights that its config does not "
            f"imply, which this model would ignore: {sorted(tensors)}."
        )
    return arrays


def write_checkpoint(
    path: str | pathlib.Path,
    config: TransformerConfig,
    arrays: Mapping[str, Any],
) -> None:
    """Writes `model.safetensors` and `config.json` to the directory `path`,
    replacing any checkpoint there (sharded or not) and leaving other files.

    **Arguments:**

    - `path`: the directory, created if needed.
    - `config`: the model's config.
    - `arrays`: the model's weights by name, layers stacked, as `read_weights`
        returns them. bfloat16 weights are written as float32 (exactly; safetensors'
        NumPy API has no bfloat16), with `"dtype": "bfloat16"` in `config.json`.
    """
    values = config_to_huggingface(config)
    tensors: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype == jnp.bfloat16:
            array = array.astype(np.float32)
        hf_name = huggingface_name(name, config)
        if isinstance(hf_name, list):
            tensors.update(zip(hf_name, array, strict=True))
        else:
            tensors[hf_name] = array
    if huggingface_family(config.family).weight_names.fused_qkv:
        fuse_qkv(tensors, config)
    transpose_conv1d(tensors, config)
    tensors = {name: np.ascontiguousarray(array) for name, array in tensors.items()}
    write_checkpoint_files(pathlib.Path(path), tensors, values)
