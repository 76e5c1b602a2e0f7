"""Checkpoint directories that are bad, hostile or half-written: writing replaces a
checkpoint whole, reading stays inside the directory, and every malformed file gives
one `ValueError` that names it. The independent references are `safetensors`' own
reader and writer and `transformers.from_pretrained`."""

import contextlib
import json
import os
import re
import struct
import threading
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from eqx_embed import TransformerConfig, TransformerLM

CONFIG = TransformerConfig("llama", 32, 16, 24, 2, 2)


def tiny_model(seed: int) -> TransformerLM:
    return TransformerLM(CONFIG, key=jax.random.key(seed))


def assert_same_weights(model: TransformerLM, other: TransformerLM) -> None:
    """Bitwise: the same arrays written and read back, no arithmetic between."""
    leaves, structure = jax.tree.flatten(model)
    other_leaves, other_structure = jax.tree.flatten(other)
    assert structure == other_structure
    for leaf, other_leaf in zip(leaves, other_leaves, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(other_leaf))


@pytest.fixture
def checkpoint(tmp_path):
    """A valid checkpoint directory and the model written to it."""
    model = tiny_model(0)
    model.to_huggingface(tmp_path / "checkpoint")
    return tmp_path / "checkpoint", model


def write_sharded(directory, tensors, shard_names, weight_files=None) -> None:
    """`tensors` split over the files `shard_names` (round robin), with an index;
    `weight_files` overrides what the index lists for each shard."""
    groups = {name: {} for name in shard_names}
    for position, (name, array) in enumerate(sorted(tensors.items())):
        groups[shard_names[position % len(shard_names)]][name] = array
    weight_map = {}
    for shard, group in groups.items():
        save_file(group, directory / shard, metadata={"format": "pt"})
        listed = (weight_files or {}).get(shard, shard)
        weight_map.update(dict.fromkeys(group, listed))
    index = dict(metadata=dict(total_size=0), weight_map=weight_map)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def shard_checkpoint(directory, weight_files=None) -> None:
    """Replaces the checkpoint's model.safetensors by two shards and an index."""
    tensors = load_file(directory / "model.safetensors")
    os.remove(directory / "model.safetensors")
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    write_sharded(directory, tensors, names, weight_files)


@contextlib.contextmanager
def unblocked_after(fifo, seconds: float = 5.0):
    """Should a reader block opening `fifo`, a writer opens and closes it after
    `seconds`, so that a regression fails the test instead of hanging it."""

    def release():
        with contextlib.suppress(OSError):  # no reader waiting: nothing to release
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(seconds, release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def raises_naming(*parts: str):
    return pytest.raises(ValueError, match=".*".join(map(re.escape, parts)))


# ---------------------------------------------------------------- writing (item 1)


def test_writing_over_a_sharded_checkpoint_replaces_it(tmp_path):
    directory = tmp_path / "checkpoint"
    old = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=2,
            num_attention_heads=2,
        )
    )
    old.save_pretrained(directory, max_shard_size="8KB")
    shards = sorted(path.name for path in directory.glob("*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").exists()
    (directory / "notes.txt").write_text("the user's own file")
    other_files = sorted(
        path.name for path in directory.iterdir() if "safetensors" not in path.name
    )

    new = tiny_model(1)
    new.to_huggingface(directory)

    assert sorted(path.name for path in directory.iterdir()) == sorted(
        other_files + ["model.safetensors"]
    )
    assert (directory / "notes.txt").read_text() == "the user's own file"
    assert_same_weights(TransformerLM.from_huggingface(directory), new)
    # transformers reads the same new weights from the directory.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    np.testing.assert_array_equal(
        reloaded.model.embed_tokens.weight.detach().numpy(),
        np.asarray(new.embedding.embedding.weight),
    )


def test_writing_leaves_files_that_are_no_listed_shards(checkpoint):
    """Files the old index does not list as shards stay, and so do files it lists
    that are no safetensors file: an index cannot have other files removed."""
    directory, _ = checkpoint
    shard_checkpoint(directory)
    save_file({"x": np.ones(2, "f4")}, directory / "adapter.safetensors")
    (directory / "tokenizer.json").write_text("{}")
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "tokenizer.json"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    tiny_model(2).to_huggingface(directory)
    assert sorted(path.name for path in directory.iterdir()) == [
        "adapter.safetensors",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ]


def test_a_failed_weight_write_keeps_the_old_checkpoint(checkpoint, monkeypatch):
    directory, model = checkpoint
    before = {path.name: path.read_bytes() for path in directory.iterdir()}

    def full_disk(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("safetensors.numpy.save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        tiny_model(3).to_huggingface(directory)
    assert {path.name: path.read_bytes() for path in directory.iterdir()} == before
    assert_same_weights(TransformerLM.from_huggingface(directory), model)


def test_a_crash_before_config_json_leaves_no_mixed_checkpoint(checkpoint, monkeypatch):
    directory, _ = checkpoint
    replace = os.replace

    def crash_on_config(source, destination):
        if os.path.basename(destination) == "config.json":
            raise KeyboardInterrupt
        replace(source, destination)

    monkeypatch.setattr(os, "replace", crash_on_config)
    with pytest.raises(KeyboardInterrupt):
        tiny_model(4).to_huggingface(directory)
    monkeypatch.undo()
    assert sorted(path.name for path in directory.iterdir()) == ["model.safetensors"]
    with raises_naming(str(directory), "no config.json"):
        TransformerLM.from_huggingface(directory)


# ------------------------------------------------------ index confinement (item 2)


def test_shards_linked_from_a_cache_load(checkpoint):
    """As in the Hugging Face cache: the snapshot's files link to blobs elsewhere."""
    directory, model = checkpoint
    shard_checkpoint(directory)
    blobs = directory.parent / "blobs"
    blobs.mkdir()
    for index, path in enumerate(sorted(directory.iterdir())):
        os.rename(path, blobs / f"blob{index}")
        os.symlink(os.path.join("..", "blobs", f"blob{index}"), path)
    assert_same_weights(TransformerLM.from_huggingface(directory), model)


@pytest.mark.parametrize(
    "entry",
    [
        "../other/model.safetensors",
        "OTHER_ABSOLUTE",
        "/etc/passwd",
        "/dev/urandom",
        "sub/../model-00001-of-00002.safetensors",
        "",
    ],
)
def test_index_entries_outside_the_directory_raise(checkpoint, entry):
    directory, _ = checkpoint
    # A valid checkpoint elsewhere, which the index must not reach.
    other = directory.parent / "other"
    tiny_model(5).to_huggingface(other)
    entry = entry.replace("OTHER_ABSOLUTE", str(other / "model.safetensors"))
    shard_checkpoint(
        directory, weight_files={"model-00001-of-00002.safetensors": entry}
    )
    with raises_naming(str(directory), repr(entry), "not a file name"):
        TransformerLM.from_huggingface(directory)


@pytest.mark.parametrize("target", ["fifo", "/dev/urandom", "directory", "missing"])
def test_index_entries_that_are_no_regular_file_raise(checkpoint, target):
    directory, _ = checkpoint
    shard_checkpoint(directory)
    shard = directory / "model-00001-of-00002.safetensors"
    os.remove(shard)
    if target == "fifo":
        os.mkfifo(shard)
    elif target == "directory":
        shard.mkdir()
    elif target != "missing":
        os.symlink(target, shard)
    message = "cannot be read" if target == "missing" else "not a regular file"
    with unblocked_after(shard), raises_naming(str(shard), message):
        TransformerLM.from_huggingface(directory)


@pytest.mark.parametrize(
    "index, problem",
    [
        (b"{not json", "not valid UTF-8 JSON"),
        (b"\xff\xfe{}", "not valid UTF-8 JSON"),
        (b"[" * 100_000, "not valid UTF-8 JSON"),
        (b"[]", "'weight_map'"),
        (b"{}", "'weight_map'"),
        (b'{"weight_map": []}', "'weight_map'"),
        (b'{"weight_map": {"model.norm.weight": 3}}', "'weight_map'"),
        (b'{"weight_map": {"model.norm.weight": null}}', "'weight_map'"),
    ],
)
def test_malformed_indices_raise(checkpoint, index, problem):
    directory, _ = checkpoint
    shard_checkpoint(directory)
    (directory / "model.safetensors.index.json").write_bytes(index)
    with raises_naming(str(directory / "model.safetensors.index.json"), problem):
        TransformerLM.from_huggingface(directory)


def test_model_safetensors_wins_over_an_index_as_in_transformers(tmp_path):
    """transformers loads model.safetensors when an index lies beside it."""
    directory = tmp_path / "checkpoint"
    tiny_model(6).to_huggingface(directory)
    shard_checkpoint(directory)
    model = tiny_model(7)
    model.to_huggingface(tmp_path / "single")
    os.rename(
        tmp_path / "single" / "model.safetensors", directory / "model.safetensors"
    )
    assert_same_weights(TransformerLM.from_huggingface(directory), model)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(directory)
    np.testing.assert_array_equal(
        reloaded.model.embed_tokens.weight.detach().numpy(),
        np.asarray(model.embedding.embedding.weight),
    )


@pytest.mark.parametrize("content", [b"{oops", b"[1, 2]", "fifo"])
def test_malformed_config_json_raises(checkpoint, content):
    directory, _ = checkpoint
    config = directory / "config.json"
    os.remove(config)
    if content == "fifo":
        os.mkfifo(config)
    else:
        config.write_bytes(content)
    with unblocked_after(config), raises_naming(str(config)):
        TransformerLM.from_huggingface(directory)


# ------------------------------------------------- malformed safetensors (item 3)


def safetensors_bytes(header, data: bytes = b"", header_size: int | None = None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(text) if header_size is None else header_size
    return struct.pack("<Q", size) + text + data


NORM = "model.norm.weight"
F32_NORM = dict(dtype="F32", shape=[16], data_offsets=[0, 64])


@pytest.mark.parametrize(
    "content, problem",
    [
        (b"", "too short for the 8-byte header length"),
        (b"\x10\x00\x00", "too short for the 8-byte header length"),
        (safetensors_bytes(b"{}", header_size=2**62), "exceeds safetensors' limit"),
        (safetensors_bytes(b"{}", header_size=2**64 - 1), "exceeds safetensors' limit"),
        (
            safetensors_bytes(b"{}", header_size=3),
            "runs past the end of the file (10 bytes)",
        ),
        (safetensors_bytes(b"{\xff}"), "not valid UTF-8 JSON"),
        (safetensors_bytes(b"{"), "not valid UTF-8 JSON"),
        (safetensors_bytes([1]), "header is a JSON list"),
        (safetensors_bytes({NORM: [1]}), "'model.norm.weight' is not a JSON object"),
        (safetensors_bytes({NORM: dict(shape=[16])}), "dtype None"),
        (
            safetensors_bytes({NORM: {**F32_NORM, "dtype": "F8_E4M3"}}, b"\0" * 16),
            "unsupported dtype 'F8_E4M3'",
        ),
        (safetensors_bytes({NORM: {**F32_NORM, "dtype": 4}}), "dtype 4"),
        (safetensors_bytes({NORM: {**F32_NORM, "shape": [-16]}}), "shape [-16]"),
        (safetensors_bytes({NORM: {**F32_NORM, "shape": [16.0]}}), "shape [16.0]"),
        (safetensors_bytes({NORM: {**F32_NORM, "shape": [True]}}), "shape [True]"),
        (safetensors_bytes({NORM: {**F32_NORM, "shape": 16}}), "shape 16"),
        (
            safetensors_bytes({NORM: {**F32_NORM, "data_offsets": [0, 64, 1]}}),
            "data_offsets [0, 64, 1]",
        ),
        (
            safetensors_bytes({NORM: {**F32_NORM, "data_offsets": [64, 0]}}),
            "data_offsets [64, 0]",
        ),
        (
            safetensors_bytes({NORM: {**F32_NORM, "shape": [2**64, 2**64]}}),
            "needs 1361129467683753853853498429727072845824",
        ),
        (safetensors_bytes({NORM: F32_NORM}, b"\0" * 60), "holds 60"),
        (safetensors_bytes({NORM: F32_NORM}, b"\0" * 68), "holds 68"),
        (
            safetensors_bytes(
                {NORM: {**F32_NORM, "data_offsets": [4, 68]}}, b"\0" * 68
            ),
            "starts at byte 4",
        ),
        (
            safetensors_bytes({"__metadata__": {"format": 1}, NORM: F32_NORM}),
            "__metadata__",
        ),
    ],
    ids=lambda value: value if isinstance(value, str) else "file",
)
def test_malformed_safetensors_raise(checkpoint, content, problem):
    directory, _ = checkpoint
    file = directory / "model.safetensors"
    file.write_bytes(content)
    with raises_naming(str(file), problem):
        TransformerLM.from_huggingface(directory)


def test_a_huge_header_is_refused_before_it_is_read(checkpoint):
    """A 142 MiB header (a sparse file) is over safetensors' bound: nothing of it is
    read, so the refusal costs no memory."""
    directory, _ = checkpoint
    file = directory / "model.safetensors"
    size = 142 * 2**20
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", size))
        handle.truncate(8 + size)
    tracemalloc.start()
    try:
        with raises_naming(str(file), "exceeds safetensors' limit of 100000000"):
            TransformerLM.from_huggingface(directory)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 2**20


def test_safetensors_own_reader_agrees_on_valid_files(checkpoint):
    """What safetensors' reader returns, ours returns, dtypes and shapes included."""
    from eqx_embed.huggingface._safetensors import read_safetensors

    directory, _ = checkpoint
    tensors = {
        "f16": np.arange(6, dtype=np.float16).reshape(2, 3),
        "f64": np.linspace(0, 1, 5),
        "empty": np.zeros((0, 3), np.float32),
        "scalar": np.array(2.5, np.float32),
        "i8": np.arange(-3, 3, dtype=np.int8),
        "u16": np.arange(4, dtype=np.uint16),
        "bool": np.array([True, False]),
    }
    save_file(tensors, directory / "all.safetensors")
    expected = load_file(directory / "all.safetensors")
    ours = read_safetensors(directory / "all.safetensors")
    assert ours.keys() == expected.keys()
    for name, array in expected.items():
        assert ours[name].dtype == array.dtype and ours[name].shape == array.shape
        np.testing.assert_array_equal(ours[name], array)


# ----------------------------------------------------- non-float weights (item 4)


@pytest.mark.parametrize("dtype", ["int32", "uint8", "int64", "bool"])
def test_integer_and_boolean_weights_raise(checkpoint, dtype):
    directory, _ = checkpoint
    file = directory / "model.safetensors"
    tensors = load_file(file)
    tensors[NORM] = np.ones(tensors[NORM].shape, dtype)
    save_file(tensors, file, metadata={"format": "pt"})
    with raises_naming(str(file), NORM, dtype, "floating-point"):
        TransformerLM.from_huggingface(directory)


def test_bfloat16_weights_still_load(checkpoint):
    """The float check admits bfloat16 (stored by torch, read back bitwise)."""
    directory, _ = checkpoint
    file = directory / "model.safetensors"
    from safetensors.torch import load_file as torch_load, save_file as torch_save

    tensors = {k: v.to(torch.bfloat16) for k, v in torch_load(file).items()}
    torch_save(tensors, file, metadata={"format": "pt"})
    model = TransformerLM.from_huggingface(directory)
    np.testing.assert_array_equal(
        np.asarray(model.final_norm.weight, np.float32),
        tensors[NORM].float().numpy(),
    )
