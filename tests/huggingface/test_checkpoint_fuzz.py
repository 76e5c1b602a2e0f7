"""Fuzz: the bytes of a small sharded checkpoint's safetensors header, index and
config.json, flipped, truncated, cut and grown. Reading either gives weights of the
shapes the config implies, or one `ValueError` that names the checkpoint's file (or
its directory); never another exception."""

import functools
import itertools
import json
import shutil
import struct

import equinox as eqx
import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from eqx_embed import TransformerConfig, TransformerLM
from eqx_embed.huggingface._checkpoint import read_config, read_weights
from eqx_embed.models._transformer_parts import initial_parts, named_leaves

SHARD = "model-00001-of-00002.safetensors"
FILES = {
    "header": SHARD,
    "index": "model.safetensors.index.json",
    "config": "config.json",
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny checkpoint in two shards with an index, as transformers shards them."""
    from safetensors.numpy import load_file, save_file

    directory = tmp_path_factory.mktemp("pristine")
    config = TransformerConfig("llama", 32, 16, 24, 2, 2)
    TransformerLM(config, key=jax.random.key(0)).to_huggingface(directory)
    tensors = load_file(directory / "model.safetensors")
    (directory / "model.safetensors").unlink()
    shards = {SHARD: {}, "model-00002-of-00002.safetensors": {}}
    for (name, array), shard in zip(sorted(tensors.items()), itertools.cycle(shards)):
        shards[shard][name] = array
    for shard, group in shards.items():
        save_file(group, directory / shard, metadata={"format": "pt"})
    weight_map = {name: shard for shard, group in shards.items() for name in group}
    index = dict(metadata=dict(total_size=0), weight_map=weight_map)
    (directory / FILES["index"]).write_text(json.dumps(index, indent=2))
    return directory


@functools.cache
def shapes(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    """The weight shapes that `config` implies, from an abstract model (no arrays)."""
    skeleton = eqx.filter_eval_shape(initial_parts, config, jax.random.key(0))
    return {name: leaf.shape for name, leaf in named_leaves(skeleton).items()}


mutation = st.one_of(
    st.tuples(st.just("set"), st.integers(0, 2**16), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 2**16)),
    st.tuples(
        st.just("insert"), st.integers(0, 2**16), st.binary(min_size=1, max_size=2)
    ),
    st.tuples(st.just("delete"), st.integers(0, 2**16), st.integers(1, 4)),
)


def mutated(content: bytes, mutations, span: int) -> bytes:
    """`content` with each mutation applied at a position among its first `span`
    bytes (the header, for a safetensors file)."""
    data = bytearray(content)
    for kind, position, *argument in mutations:
        position %= min(span, len(data)) + 1
        if kind == "set" and position < len(data):
            data[position] = argument[0]
        elif kind == "truncate":
            del data[position:]
        elif kind == "insert":
            data[position:position] = argument[0]
        elif kind == "delete":
            del data[position : position + argument[0]]
    return bytes(data)


@pytest.mark.parametrize("target", list(FILES))
@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_checkpoints_load_or_raise_a_clear_error(
    pristine, tmp_path, target, mutations
):
    directory = tmp_path / "checkpoint"
    shutil.rmtree(directory, ignore_errors=True)
    shutil.copytree(pristine, directory)
    file = directory / FILES[target]
    content = file.read_bytes()
    span = 8 + struct.unpack("<Q", content[:8])[0] if target == "header" else None
    file.write_bytes(mutated(content, mutations, span or len(content)))
    try:
        config = read_config(directory)
        expected = shapes(config)
        arrays = read_weights(directory, config, list(expected))
    except ValueError as error:
        assert str(directory) in str(error), error
        event("a ValueError")
        return
    event("loaded")
    assert arrays.keys() == expected.keys()
    for name, array in arrays.items():
        assert isinstance(array, np.ndarray)
        assert jax.numpy.issubdtype(array.dtype, jax.numpy.floating)
        if array.shape != expected[name]:
            # The loader checks shapes against the config after reading.
            with pytest.raises(ValueError, match=f"{directory}.*{name}"):
                TransformerLM.from_huggingface(directory)
