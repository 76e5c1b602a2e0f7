"""The files of a Hugging Face checkpoint directory (`*.safetensors`,
`model.safetensors.index.json`, `config.json`), read and written with NumPy and the
`safetensors` library.

Readers trust nothing in the files: they open regular files only (a FIFO or a device
would block or never end), take shards only from the checkpoint directory, bound what
they parse before reading it, and check a safetensors header's every field against the
file before the library reads a tensor, so that a bad file raises one `ValueError`
naming it and what is wrong (the library's own errors name neither). The library then
reads each tensor, block by block through short-lived memory maps, into a host array
that JAX's CPU client adopts without a copy, so that loading holds the weights about
once.
Writers write each file to a temporary name and `os.replace` it, so that a directory
holds exactly one checkpoint, whole or (after a crash) without `config.json`.
"""

import json
import math
import os
import pathlib
import secrets
import stat
import struct
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
# Written by `_generation_json.py` after the rest: removed with the old `config.json`.
GENERATION_CONFIG_NAME = "generation_config.json"

# safetensors' own bound on a header (MAX_HEADER_SIZE in safetensors/src/tensor.rs),
# also applied to the JSON files of a checkpoint.
MAX_HEADER_SIZE = 100_000_000

# The bytes per element of the dtypes read (what the header check needs); the library
# returns the NumPy dtype itself, bfloat16 as ml_dtypes' (JAX's) `bfloat16`.
_ITEM_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}


# JAX's CPU client adopts a host buffer that starts on this boundary (XLA's minimum
# alignment) rather than copying it.
_ADOPTED_ALIGNMENT = 64
# The most bytes a tensor's block holds in memory twice while it is read: once mapped
# from the file, once copied.
_BLOCK_BYTES = 16 * 2**20


def _open_regular_file(file: pathlib.Path) -> BinaryIO:
    """`file` opened for reading, if it is (or links to) a regular file."""
    try:
        mode = os.stat(file).st_mode
    except (OSError, ValueError) as error:
        raise ValueError(f"{file} cannot be read: {error}.") from error
    if not stat.S_ISREG(mode):
        raise ValueError(f"{file} is not a regular file.")
    # Should the file be swapped for a FIFO after the check, opening it does not block
    # either, and the second check refuses it.
    try:
        descriptor = os.open(file, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as error:
        raise ValueError(f"{file} cannot be read: {error}.") from error
    handle = os.fdopen(descriptor, "rb")
    if not stat.S_ISREG(os.fstat(descriptor).st_mode):
        handle.close()
        raise ValueError(f"{file} is not a regular file.")
    return handle


def _parse_json(text: bytes, file: pathlib.Path, what: str) -> Any:
    try:
        return json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as error:
        # ValueError covers UnicodeDecodeError and json.JSONDecodeError.
        raise ValueError(
            f"{file}: {what} is not valid UTF-8 JSON ({error})."
        ) from error


def read_json(file: pathlib.Path) -> Any:
    """The JSON value in `file`, of at most `MAX_HEADER_SIZE` bytes."""
    with _open_regular_file(file) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_HEADER_SIZE:
            raise ValueError(
                f"{file} is {size} bytes long; a checkpoint's JSON file may be at "
                f"most {MAX_HEADER_SIZE} bytes."
            )
        # Not read(MAX_HEADER_SIZE): that would allocate the whole bound up front.
        text = handle.read(size)
    return _parse_json(text, file, "the file")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_layout(
    header: Any, data_size: int, file: pathlib.Path
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's dtype code and shape, in the file's order, after checking the
    parsed header of `file` as safetensors does, field by field: known fields, sizes
    that agree with the shapes, and byte ranges that tile the data section
    (`data_size` bytes) exactly."""

    def invalid(problem: str) -> ValueError:
        return ValueError(f"{file} is not a valid safetensors file: {problem}.")

    if not isinstance(header, dict):
        raise invalid(f"its header is a JSON {type(header).__name__}, not an object")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(value, str) for value in metadata.values()
    ):
        raise invalid("its __metadata__ must map strings to strings")
    ranges = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise invalid(f"the entry of {name!r} is not a JSON object")
        dtype, shape, offsets = (
            entry.get(key) for key in ("dtype", "shape", "data_offsets")
        )
        if not isinstance(dtype, str):
            raise invalid(f"{name!r} has dtype {dtype!r}, not a string")
        if dtype not in _ITEM_BYTES:
            raise invalid(
                f"{name!r} has the unsupported dtype {dtype!r} (supported: "
                f"{', '.join(_ITEM_BYTES)})"
            )
        if not isinstance(shape, list) or not all(map(_is_count, shape)):
            raise invalid(
                f"{name!r} has shape {shape!r}, not a list of non-negative integers"
            )
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(map(_is_count, offsets))
            or offsets[0] > offsets[1]
        ):
            raise invalid(
                f"{name!r} has data_offsets {offsets!r}, not two increasing "
                "non-negative integers"
            )
        start, end = offsets
        size = math.prod(shape) * _ITEM_BYTES[dtype]
        if end - start != size:
            raise invalid(
                f"{name!r} has {end - start} bytes of data, but its shape {shape} of "
                f"{dtype} needs {size}"
            )
        ranges[name] = (start, end, dtype, tuple(shape))
    covered = 0
    layout = {}
    for name, (start, end, dtype, shape) in sorted(
        ranges.items(), key=lambda item: item[1][:2]
    ):
        if start != covered:
            raise invalid(
                f"the data of {name!r} starts at byte {start} of the data section, "
                f"not at {covered} where the previous tensor ends"
            )
        covered = end
        layout[name] = (dtype, shape)
    if covered != data_size:
        raise invalid(
            f"its tensors cover {covered} bytes, but the data section after the "
            f"header holds {data_size}"
        )
    return layout


def _checked_safetensors(
    handle: BinaryIO, file: pathlib.Path
) -> dict[str, tuple[str, tuple[int, ...]]]:
    """`_checked_layout` of the safetensors file open in `handle`, its header's length
    bounded before the header is read. The format is an 8-byte little-endian header
    length, a JSON header, then the tensors' bytes."""
    file_size = os.fstat(handle.fileno()).st_size
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise ValueError(
            f"{file} is not a valid safetensors file: it is {len(prefix)} bytes "
            "long, too short for the 8-byte header length."
        )
    (header_size,) = struct.unpack("<Q", prefix)
    if header_size > MAX_HEADER_SIZE:
        raise ValueError(
            f"{file} is not a valid safetensors file: its header length, "
            f"{header_size} bytes, exceeds safetensors' limit of {MAX_HEADER_SIZE}."
        )
    if header_size > file_size - 8:
        raise ValueError(
            f"{file} is not a valid safetensors file: its header length, "
            f"{header_size} bytes, runs past the end of the file "
            f"({file_size} bytes)."
        )
    header = _parse_json(handle.read(header_size), file, "the safetensors header")
    return _checked_layout(header, file_size - 8 - header_size, file)


def _checked_file_name(handle: BinaryIO, file: pathlib.Path) -> str:
    """A name under which the library opens the very file that `handle` has open and
    checked: `/dev/fd/N` where the system has it, so that a file swapped for a FIFO
    after the check cannot make the library's own `open` block; else `file`."""
    descriptor_name = f"/dev/fd/{handle.fileno()}"
    return descriptor_name if os.path.exists(descriptor_name) else str(file)


def adoptable_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary,
    which JAX's CPU client adopts (`jax.device_put`) instead of copying."""
    size = math.prod(shape) * dtype.itemsize
    raw = np.empty(size + _ADOPTED_ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % _ADOPTED_ALIGNMENT
    return raw[start : start + size].view(dtype).reshape(shape)


def _read_rows(library_name: str, name: str, rows: slice | None) -> np.ndarray:
    """The `rows` of the tensor `name` (all of it for None), read through a memory map
    of their own, which goes (and with it the file's pages it made resident) when
    they are read."""
    from safetensors import safe_open

    with safe_open(library_name, framework="numpy") as library:
        if rows is None:
            return library.get_tensor(name)
        return library.get_slice(name)[rows]


def _read_tensor(
    library_name: str, name: str, dtype: str, shape: tuple[int, ...]
) -> np.ndarray:
    """The tensor `name` in an `adoptable_empty` array, read in blocks of rows of at
    most `_BLOCK_BYTES` (or a row)."""
    if not shape or math.prod(shape) * _ITEM_BYTES[dtype] <= _BLOCK_BYTES:
        # Whole, as the library slices no 0-d tensor and no empty range (and an empty
        # tensor's rows may be past counting).
        value = _read_rows(library_name, name, None)
        tensor = adoptable_empty(shape, value.dtype)
        tensor[...] = value
        return tensor
    rows = max(1, _BLOCK_BYTES // (math.prod(shape[1:]) * _ITEM_BYTES[dtype]))
    # The library refuses a stop past the end.
    blocks = [
        slice(start, min(start + rows, shape[0])) for start in range(0, shape[0], rows)
    ]
    first = _read_rows(library_name, name, blocks[0])
    tensor = adoptable_empty(shape, first.dtype)
    tensor[blocks[0]] = first
    del first
    for block in blocks[1:]:
        tensor[block] = _read_rows(library_name, name, block)
    return tensor


def read_safetensors(file: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of one `.safetensors` file as NumPy arrays that JAX can adopt
    (bfloat16 ones as ml_dtypes' `bfloat16`, which is JAX's), read by the
    `safetensors` library once `file` and its header pass our checks. Loading holds
    the tensors once, plus one block."""
    from safetensors import SafetensorError

    with _open_regular_file(file) as handle:
        layout = _checked_safetensors(handle, file)
        library_name = _checked_file_name(handle, file)
        try:
            return {
                name: _read_tensor(library_name, name, dtype, shape)
                for name, (dtype, shape) in layout.items()
            }
        except (SafetensorError, OSError) as error:
            # What the library refuses beyond our checks: a dimension past its
            # integers, a file cut short since they ran.
            raise ValueError(f"{file} cannot be read: {error}.") from error


def _is_file_name(entry: str) -> bool:
    return entry not in ("", ".", "..") and not any(c in entry for c in "/\\\0")


def _weight_map(index: pathlib.Path) -> dict[str, str]:
    """The `weight_map` of `index`, from weight names to file names in its directory."""
    values = read_json(index)
    weight_map = values.get("weight_map") if isinstance(values, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(value, str) for value in weight_map.values()
    ):
        raise ValueError(
            f"{index} must hold a JSON object whose 'weight_map' maps each weight "
            "name to the name of the file that holds it."
        )
    for entry in weight_map.values():
        if not _is_file_name(entry):
            raise ValueError(
                f"{index} lists the weight file {entry!r}, which is not a file name: "
                f"the files must lie in {index.parent} itself."
            )
    return weight_map


def checkpoint_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of the checkpoint in `directory`: `model.safetensors` if it
    is there (as transformers prefers it too), else the shards that
    `model.safetensors.index.json` lists."""
    if os.path.lexists(directory / WEIGHTS_NAME):
        return [directory / WEIGHTS_NAME]
    index = directory / INDEX_NAME
    if not os.path.lexists(index):
        raise ValueError(f"{directory} has neither {WEIGHTS_NAME} nor {INDEX_NAME}.")
    return [directory / name for name in sorted(set(_weight_map(index).values()))]


def _replaced_files(directory: pathlib.Path) -> list[pathlib.Path]:
    """The index and shards of a sharded checkpoint in `directory`, index first. Only
    `*.safetensors` files the index lists count as shards, so that an index cannot
    name other files for removal; an index that cannot be read is replaced alone."""
    index = directory / INDEX_NAME
    if not os.path.lexists(index):
        return []
    try:
        listed = set(_weight_map(index).values())
    except ValueError:
        listed = set()
    shards = [
        directory / name
        for name in sorted(listed - {WEIGHTS_NAME})
        if name.endswith(".safetensors") and os.path.lexists(directory / name)
    ]
    return [index, *shards]


def _temporary_file(directory: pathlib.Path, name: str) -> pathlib.Path:
    """A new empty file beside `directory / name`, with the permissions that the
    umask gives a new file."""
    path = directory / f".{name}.{secrets.token_hex(8)}.tmp"
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return path


def _sync(path: pathlib.Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_checkpoint_files(
    directory: pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    config: Mapping[str, Any],
) -> None:
    """Writes `model.safetensors` and then `config.json` to `directory`, replacing
    the checkpoint there: its `model.safetensors`, or its index and the shards the
    index lists, and its `generation_config.json` (which the caller writes next).
    Other files stay. Each file is written whole to a temporary name
    first; the old `config.json` goes before any old weight file, so a crash leaves
    either a complete checkpoint or one that has no `config.json`, never a mix."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    temporary = {
        name: _temporary_file(directory, name) for name in (WEIGHTS_NAME, CONFIG_NAME)
    }
    try:
        save_file(dict(tensors), temporary[WEIGHTS_NAME], metadata={"format": "pt"})
        temporary[CONFIG_NAME].write_text(json.dumps(config, indent=2) + "\n")
        for path in temporary.values():
            _sync(path)
        for old in [
            directory / CONFIG_NAME,
            directory / GENERATION_CONFIG_NAME,
            *_replaced_files(directory),
        ]:
            old.unlink(missing_ok=True)
        for name, path in temporary.items():
            os.replace(path, directory / name)
    finally:
        for path in temporary.values():
            path.unlink(missing_ok=True)
    if os.name == "posix":
        _sync(directory)


def write_json(file: pathlib.Path, values: Mapping[str, Any]) -> None:
    """Writes `values` to `file` through a temporary name, as the checkpoint's
    files are written."""
    temporary = _temporary_file(file.parent, file.name)
    try:
        temporary.write_text(json.dumps(values, indent=2) + "\n")
        _sync(temporary)
        os.replace(temporary, file)
    finally:
        temporary.unlink(missing_ok=True)
