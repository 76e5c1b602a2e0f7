"""The reader that hands safetensors files to the `safetensors` library: tensors read
block by block come back bit for bit as torch wrote them, into host arrays that JAX
adopts; the library opens the very file that passed our checks; its own errors name
the file; the layers of a block weight are stacked as `np.stack` would."""

import json
import os
import struct

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import load_file as torch_load, save_file as torch_save
from test_checkpoint_bad_input import raises_naming, unblocked_after

from eqx_embed import TransformerConfig, TransformerLM
from eqx_embed.huggingface import _safetensors
from eqx_embed.huggingface._safetensors import read_safetensors

TORCH_TENSORS = {
    "bf16 rows": torch.randn(37, 5, generator=torch.Generator().manual_seed(0)).to(
        torch.bfloat16
    ),
    "f32 cube": torch.randn(9, 4, 3, generator=torch.Generator().manual_seed(1)),
    "f16 vector": torch.linspace(-3, 3, 11).to(torch.float16),
    "f64 scalar": torch.tensor(2.5, dtype=torch.float64),
    "empty rows": torch.zeros(0, 3),
    "i8": torch.arange(-4, 4, dtype=torch.int8),
}


def bits(array: np.ndarray) -> np.ndarray:
    """The array's bytes, so that equality is bitwise (NaN payloads, -0.0 included)."""
    return np.ascontiguousarray(array).view(np.uint8)


@pytest.mark.parametrize("block_bytes", [1, 64, 2**24])
def test_tensors_read_in_blocks_are_torchs_bits(tmp_path, monkeypatch, block_bytes):
    """A row per block, a few rows, and whole tensors: each as torch stored it."""
    monkeypatch.setattr(_safetensors, "_BLOCK_BYTES", block_bytes)
    file = tmp_path / "model.safetensors"
    torch_save(TORCH_TENSORS, file)
    ours = read_safetensors(file)
    assert ours.keys() == TORCH_TENSORS.keys()
    for name, tensor in TORCH_TENSORS.items():
        expected = (
            tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        )
        expected = expected.numpy()
        assert ours[name].shape == expected.shape
        assert ours[name].dtype.itemsize == expected.dtype.itemsize
        np.testing.assert_array_equal(bits(ours[name]), bits(expected))
    assert ours["bf16 rows"].dtype == jax.numpy.bfloat16


def test_read_arrays_are_adopted_by_jax_on_cpu(tmp_path):
    """The host arrays start on XLA's 64-byte boundary, so that `jax.device_put`
    adopts them on CPU instead of copying them (those of a dtype that JAX keeps:
    without x64 it converts float64)."""
    file = tmp_path / "model.safetensors"
    torch_save(TORCH_TENSORS, file)
    cpu = jax.devices("cpu")[0]
    adopted = []
    for name, array in read_safetensors(file).items():
        if array.size and jax.dtypes.canonicalize_dtype(array.dtype) == array.dtype:
            on_cpu = jax.device_put(array, cpu)
            assert on_cpu.unsafe_buffer_pointer() == array.ctypes.data, name
            adopted.append(name)
    assert len(adopted) == 4


def test_the_library_reads_the_file_that_was_checked(tmp_path, monkeypatch):
    """A file swapped for a FIFO once our checks have passed neither blocks the
    library nor gets read: it reads the file that was checked."""
    file = tmp_path / "model.safetensors"
    torch_save(TORCH_TENSORS, file)
    checked = _safetensors._checked_safetensors

    def check_then_swap(handle, path):
        layout = checked(handle, path)
        os.remove(path)
        os.mkfifo(path)
        return layout

    monkeypatch.setattr(_safetensors, "_checked_safetensors", check_then_swap)
    with unblocked_after(file):
        ours = read_safetensors(file)
    np.testing.assert_array_equal(ours["f32 cube"], TORCH_TENSORS["f32 cube"].numpy())


def test_what_only_the_library_refuses_raises_naming_the_file(tmp_path):
    """A dimension past 2**64 - 1 in an empty tensor passes our checks (it holds no
    bytes); the library refuses it, and the error names the file."""
    header = json.dumps(
        {"x": dict(dtype="F32", shape=[2**64, 0], data_offsets=[0, 0])}
    ).encode()
    file = tmp_path / "model.safetensors"
    file.write_bytes(struct.pack("<Q", len(header)) + header)
    with raises_naming(str(file), "cannot be read: "):
        read_safetensors(file)


CONFIG = TransformerConfig("llama", 32, 16, 24, 2, 2)


def test_layers_stored_in_different_dtypes_stack_promoted(tmp_path):
    """As `np.stack` would: a float16 layer beside a float32 one stacks as float32,
    exactly."""
    directory = tmp_path / "checkpoint"
    TransformerLM(CONFIG, key=jax.random.key(0)).to_huggingface(directory)
    file = directory / "model.safetensors"
    tensors = torch_load(file)
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = tensors[name].to(torch.float16)
    torch_save(tensors, file, metadata={"format": "pt"})
    model = TransformerLM.from_huggingface(directory)
    expected = np.stack(
        [
            tensors[f"model.layers.{layer}.mlp.up_proj.weight"].numpy()
            for layer in range(CONFIG.num_layers)
        ]
    )
    assert expected.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(model.blocks.mlp.up.weight), expected)


def test_layers_of_different_shapes_raise(tmp_path):
    directory = tmp_path / "checkpoint"
    TransformerLM(CONFIG, key=jax.random.key(0)).to_huggingface(directory)
    file = directory / "model.safetensors"
    tensors = torch_load(file)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = tensors[name][:-1].clone()
    torch_save(tensors, file, metadata={"format": "pt"})
    with raises_naming(str(directory), "stores the layers", "different shapes"):
        TransformerLM.from_huggingface(directory)
