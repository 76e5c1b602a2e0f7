"""`ReversibleEmbedding` files written by `eqx.tree_serialise_leaves` before the
package layout (commit 5944356, by `tests/data/write_old_format.py`) still load into a
module built by today's code, and decode as they did then."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tolerance

from eqx_embed import ReversibleEmbedding

DATA = pathlib.Path(__file__).parent.parent / "data"
HIDDEN = np.linspace(-1.0, 1.0, 3 * 8, dtype=np.float32).reshape(3, 8)


@pytest.mark.parametrize("tie_weights", [True, False])
def test_an_old_file_loads_and_decodes_the_same(tie_weights):
    name = "tied" if tie_weights else "untied"
    skeleton = ReversibleEmbedding(
        16, 8, tie_weights=tie_weights, padding_idx=0, key=jax.random.key(0)
    )
    embedding = eqx.tree_deserialise_leaves(DATA / f"reversible_{name}.eqx", skeleton)
    expected = np.load(DATA / f"reversible_{name}_logits.npy")
    logits = jax.vmap(embedding.decode)(jnp.asarray(HIDDEN))
    # A matmul of width 8, which another CPU may round differently.
    np.testing.assert_allclose(
        np.asarray(logits), expected, **tolerance(np.float32, 8, scale=8.0)
    )
    assert not np.allclose(jax.vmap(skeleton.decode)(jnp.asarray(HIDDEN)), expected)
    assert embedding.tie_weights == tie_weights
