"""Padding a vocabulary that a device mesh does not divide.

JAX splits an array's axis over mesh devices only evenly (`jax.device_put`,
`jax.jit`'s shardings and `jax.shard_map` all refuse 50,257 rows on 8 devices), so a
table whose vocabulary the devices do not divide gets rows appended: zeros, which
the modules never read. Each `Embedding` keeps its vocabulary as `num_embeddings`
(static), and everything that reads its table stops there: an id at or past it is
out of range (NaNs or an error, as before), the decode returns `num_embeddings`
logits, and the fused losses leave the padding rows out of every log-sum-exp, so
that they never get a gradient.
"""

from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax

from ._contracts import check_positive
from ._embedding import Embedding
from ._table_kind import TableKind

Tree = TypeVar("Tree")


def _padded(embedding: Embedding, multiple_of: int) -> Embedding:
    rows = -(-embedding.num_embeddings // multiple_of) * multiple_of
    weight = embedding.weight
    if weight.shape[0] == rows:
        return embedding
    if isinstance(weight, TableKind):
        raise ValueError(
            "pad_vocabulary pads float tables, got a table of kind "
            f"{type(weight).__name__}: pad the vocabulary before quantizing."
        )
    # Padding rows only ever follow the vocabulary, so a negative pad (a table
    # padded before to another multiple) drops padding rows only.
    weight = lax.pad(
        weight,
        jnp.zeros((), weight.dtype),
        ((0, rows - weight.shape[0], 0), (0, 0, 0)),
    )
    return eqx.tree_at(lambda e: e.weight, embedding, weight)


def pad_vocabulary(tree: Tree, multiple_of: int) -> Tree:
    """Every [`Embedding`][eqx_embed.Embedding] in `tree` (a model, a
    [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding], an embedding) with its
    table padded to a number of rows that `multiple_of` divides, so that a device
    mesh can split its vocabulary evenly (JAX splits an axis only evenly: 50,257 rows
    over 8 devices are refused). [`shard_model`][eqx_embed.shard_model] calls it
    itself.

    The padding rows are zeros that are never read: each embedding keeps its
    vocabulary as `num_embeddings`, and every result is that of the unpadded table,
    on one device or on a mesh. An id `>= num_embeddings` stays out of range (NaNs,
    or an error under `out_of_range="error"`), the decode and `attend` return
    `num_embeddings` logits (where explicit mesh axes split the vocabulary, they come
    back whole, as the `num_embeddings` entries cannot be split evenly), the fused
    losses leave the padding out of every log-sum-exp, and the padding rows get zero
    gradients. A tied table stays one leaf. `TransformerLM.to_huggingface` writes the
    unpadded table.

    **Arguments:**

    - `tree`: any pytree; the embeddings in it are padded, everything else is left
        as it is.
    - `multiple_of`: a positive integer, usually the number of devices that split
        the vocabulary. Each table gets `ceil(num_embeddings / multiple_of) *
        multiple_of` rows (padding from an earlier call is dropped or extended to
        that): `1` removes the padding.

    **Returns:**

    `tree`, its embeddings' tables padded.

    **Raises:**

    - `ValueError`: a `multiple_of` that is not a positive integer.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    layer = eqx_embed.ReversibleEmbedding(61, 16, key=jax.random.key(0))
    padded = eqx_embed.pad_vocabulary(layer, 8)
    assert padded.weight.shape == (64, 16) and padded.embedding.num_embeddings == 61
    hidden = jnp.ones((3, 16))
    assert jax.vmap(padded.decode)(hidden).shape == (3, 61)
    assert jnp.isnan(padded(61)).all()  # past the vocabulary: out of range
    assert jnp.allclose(
        padded.cross_entropy(hidden, jnp.array([0, 5, 60])),
        layer.cross_entropy(hidden, jnp.array([0, 5, 60])),
    )
    assert eqx_embed.pad_vocabulary(padded, 1).weight.shape == (61, 16)
    ```
    """
    check_positive("multiple_of", multiple_of, integer=True)

    def pad(node):
        return _padded(node, multiple_of) if isinstance(node, Embedding) else node

    return jax.tree.map(pad, tree, is_leaf=lambda node: isinstance(node, Embedding))
