"""`TransformerLM` files written by `eqx.tree_serialise_leaves` before the package
layout (commit 5944356, by `tests/data/write_old_format.py`) still load into a model
built by today's code, and give the logits they gave then."""

import json
import pathlib

import equinox as eqx
import jax
import numpy as np
import pytest
from _tolerances import tolerance

from eqx_embed import TransformerConfig, TransformerLM

DATA = pathlib.Path(__file__).parent.parent / "data"
TOKENS = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int32)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_an_old_file_loads_and_gives_the_same_logits(family):
    config = TransformerConfig.from_dict(
        json.loads((DATA / f"transformer_{family}.json").read_text())
    )
    skeleton = TransformerLM(config, key=jax.random.key(1))
    model = eqx.tree_deserialise_leaves(DATA / f"transformer_{family}.eqx", skeleton)
    expected = np.load(DATA / f"transformer_{family}_logits.npy")
    # The weights load bitwise, but the program that wrote the logits (attention by
    # einsum then) is not today's (jax.nn.dot_product_attention), and the file may be
    # read on another CPU: equal to within float32 roundings over every layer's
    # reductions (the MLP's the longest).
    reduction = config.num_layers * (config.hidden_size + config.intermediate_size)
    np.testing.assert_allclose(
        np.asarray(model(TOKENS)),
        expected,
        **tolerance(np.float32, reduction, scale=float(np.abs(expected).max())),
    )
    # Not the skeleton's own weights.
    assert not np.allclose(np.asarray(skeleton(TOKENS)), expected)
