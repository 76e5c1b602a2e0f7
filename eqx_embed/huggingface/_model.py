"""`TransformerLM` from and to a Hugging Face checkpoint directory."""

import dataclasses
import pathlib
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import DTypeLike

from ..models import TransformerLM
from ..models._config import floating_dtype
from ..models._lora import has_lora
from ..models._quantize import dequantize, has_quantized_weights
from ..models._transformer_parts import initial_parts, named_leaves
from ..nn._indices import OutOfRange
from ._checkpoint import (
    UNTIED_HEAD,
    VOCAB_TABLE,
    read_config,
    read_weights,
    write_checkpoint,
)
from ._generation_json import read_generation_config, write_generation_config


def _dtype_name(argument: str, dtype: DTypeLike | None) -> str | None:
    """The name of the floating `dtype` given as `from_huggingface`'s `argument`."""
    if dtype is None:
        return None
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = dtype
    return floating_dtype(f"from_huggingface's {argument}", name).name


def load_transformer(
    path: str | pathlib.Path,
    *,
    param_dtype: DTypeLike | None = None,
    activation_dtype: DTypeLike | None = None,
    out_of_range: OutOfRange = "nan",
) -> TransformerLM:
    """The model of a Hugging Face checkpoint directory; see
    [`TransformerLM.from_huggingface`][eqx_embed.TransformerLM.from_huggingface]."""
    config = read_config(
        path,
        param_dtype=_dtype_name("param_dtype", param_dtype),
        activation_dtype=_dtype_name("activation_dtype", activation_dtype),
        out_of_range=out_of_range,
    )
    generation_config = read_generation_config(path, config.vocab_size)
    skeleton = eqx.filter_eval_shape(initial_parts, config, jax.random.key(0))
    names = named_leaves(skeleton)
    arrays = read_weights(path, config, list(names))
    if config.tie_word_embeddings and UNTIED_HEAD in arrays:
        # transformers 5 loads such a checkpoint untied, warning as here.
        warnings.warn(
            f"{path}: config.json has tie_word_embeddings=true, but the files store a "
            "decode head that differs from the embedding; it is loaded untied, as "
            "transformers does.",
            stacklevel=3,
        )
        config = dataclasses.replace(config, tie_word_embeddings=False)
        skeleton = eqx.filter_eval_shape(initial_parts, config, jax.random.key(0))
        names = named_leaves(skeleton)
    leaves = []
    for name, want in names.items():
        # Popped, so that each host array goes once it is on the device.
        array = arrays.pop(name)
        if array.shape != want.shape:
            raise ValueError(
                f"{path}: the checkpoint's weight for {name} has shape "
                f"{array.shape}, but its config implies {want.shape}."
            )
        if array.dtype == want.dtype:
            # On CPU, JAX adopts the reader's aligned host arrays rather than copy them.
            leaves.append(jax.device_put(array))
        else:
            leaves.append(jnp.asarray(array, dtype=want.dtype))
    parts = jax.tree.unflatten(jax.tree.structure(skeleton), leaves)
    return TransformerLM(config, **parts, generation_config=generation_config)


def save_transformer(model: TransformerLM, path: str | pathlib.Path) -> None:
    """Writes `model` as a Hugging Face checkpoint directory; see
    [`TransformerLM.to_huggingface`][eqx_embed.TransformerLM.to_huggingface]."""
    if has_lora(model):
        raise ValueError(
            "model has LoRA adapters, which a Hugging Face checkpoint does not hold: "
            "expected plain weights; merge_lora(model) first, or write the adapters "
            "with save_peft_adapter."
        )
    if has_quantized_weights(model):
        warnings.warn(
            f"{path}: the model's quantized weights are written dequantized, as "
            "float arrays (their integers times their scales), since a Hugging Face "
            "checkpoint holds float weights: the files are not smaller.",
            stacklevel=3,
        )
        model = dequantize(model)
    arrays = named_leaves(model.parts())
    # Tables padded for a device mesh (`pad_vocabulary`) are written without their
    # padding rows, read back whole from the devices as the writer would anyway.
    vocab_size = model.config.vocab_size
    for name in (VOCAB_TABLE, UNTIED_HEAD):
        if name in arrays and arrays[name].shape[0] != vocab_size:
            arrays[name] = np.asarray(arrays[name])[:vocab_size]
    write_checkpoint(path, model.config, arrays)
    write_generation_config(path, model.generation_config)
