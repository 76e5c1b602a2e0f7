"""Reading and writing `*.safetensors` files with NumPy alone."""

import json
import pathlib
import struct

import jax.numpy as jnp
import numpy as np


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as NumPy arrays. bfloat16, which
    safetensors' NumPy API cannot return, is read from the file's raw bytes (the
    format is a JSON header followed by the tensors, little-endian)."""
    from safetensors import safe_open

    with open(file, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    header.pop("__metadata__", None)
    bfloat16 = {name for name, entry in header.items() if entry["dtype"] == "BF16"}
    tensors: dict[str, np.ndarray] = {}
    with safe_open(file, framework="numpy") as handle:
        for name in header.keys() - bfloat16:
            tensors[name] = handle.get_tensor(name)
    if bfloat16:
        data = np.memmap(file, dtype=np.uint8, mode="r", offset=8 + header_size)
        for name in bfloat16:
            start, end = header[name]["data_offsets"]
            tensors[name] = (
                np.frombuffer(data[start:end], dtype="<u2")
                .view(jnp.bfloat16)
                .reshape(header[name]["shape"])
            )
    return tensors


def checkpoint_files(directory: pathlib.Path) -> list[pathlib.Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory} has no *.safetensors files.")
    return files
