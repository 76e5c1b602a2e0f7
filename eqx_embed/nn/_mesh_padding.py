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

import math
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec
from jaxtyping import Array

from ._contracts import MAX_TABLE_BYTES, check_positive
from ._embedding import Embedding
from ._mesh import explicit_sharding, split_axes
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
    padding_bytes = (
        (rows - embedding.num_embeddings)
        * math.prod(weight.shape[1:])
        * np.dtype(weight.dtype).itemsize
    )
    if padding_bytes > MAX_TABLE_BYTES:
        raise ValueError(
            f"multiple_of={multiple_of} would pad a table of "
            f"{embedding.num_embeddings} rows to {rows}, {padding_bytes / 2**30:.1f} "
            f"GiB of padding; the limit is {MAX_TABLE_BYTES // 2**30} GiB (pass "
            "the number of devices that split the vocabulary)."
        )
    sharding = explicit_sharding(weight)
    if sharding is not None and split_axes(weight, 0):
        # JAX pads or slices an axis split over explicit mesh axes only to a size
        # they divide: the rows are made whole first, and split again after where
        # the new size allows it (removing the padding leaves them whole).
        spec = tuple(sharding.spec) + (None,) * (weight.ndim - len(sharding.spec))
        whole_rows = sharding.update(spec=PartitionSpec(None, *spec[1:]))
        devices = math.prod(sharding.mesh.shape[axis] for axis in split_axes(weight, 0))
        padded = _padded_rows(jax.sharding.reshard(weight, whole_rows), rows)
        if rows % devices == 0:
            padded = jax.sharding.reshard(padded, sharding)
        weight = padded
    else:
        weight = _padded_rows(weight, rows)
    return eqx.tree_at(lambda e: e.weight, embedding, weight)


def _padded_rows(weight: Array, rows: int) -> Array:
    # Padding rows only ever follow the vocabulary, so a negative pad (a table
    # padded before to another multiple) drops padding rows only.
    return lax.pad(
        jnp.asarray(weight),
        jnp.zeros((), weight.dtype),
        ((0, rows - weight.shape[0], 0), (0, 0, 0)),
    )


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

    A table already sharded (by [`shard_model`][eqx_embed.shard_model]) keeps its
    layout where its devices divide the new number of rows; where they do not (the
    padding removed, with `1`), its vocabulary comes back whole on every device,
    the other axes still split.

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

    - `ValueError`: a `multiple_of` that is not a positive integer, or one that
        would append more than 4 GiB of padding to a table (a typo, not a mesh).

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
