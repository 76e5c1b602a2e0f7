"""The fused loss on a table whose rows are split over explicit mesh axes, without
gathering the table: Megatron-LM's `vocab_parallel_cross_entropy` under
`jax.shard_map`, in per-device memory that shrinks with the number of shards.

The shard_maps are manual over the vocabulary axes and over the axes that split the
tokens (a batch split over a data axis; under `jax.vmap` the batch is folded into the
token axis first): each device holds its rows of the table and its tokens, and
computes nothing twice.

Splitting the vocabulary alone would not shrink the blockwise loss's temporaries:
they are of order `tokens * (block_size + embedding_size)` (a block of logits, the
hidden states' float32 gradient), whatever the vocabulary. So each device also walks
its tokens in chunks, as many as there are vocabulary shards (at most: a divisor of
its tokens), and keeps one chunk's temporaries at a time:

- forward: for each chunk, the blockwise log-sum-exp and target logit over the
  device's own rows; then one collective of per-token scalars over the vocabulary
  axes (a max and two sums) combines the shards.
- backward, hidden states' gradient: chunk by chunk, the sum over the device's blocks
  of `d_logits @ rows`, accumulated in float32, summed in float32 over the
  vocabulary axes (one all-reduce of a chunk's gradient), then cast.
- backward, table's gradient: block by block of the device's rows, the sum over
  the chunks of `d_logits.T @ hidden`, accumulated in float32, summed in float32
  over the axes that split the tokens, then cast and written into that block's rows
  of the shard's gradient.

Each backward walk recomputes its blocks of logits: five matmuls in all, one more than
the one-device loss. Chunk `k` holds the tokens `k, k + n, k + 2n, ...` (a strided
view of the token axis, `n` the number of chunks).
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array

from ._loss_kernel import (
    Blocking,
    block,
    block_d_logits,
    check_differentiable,
    contract,
    num_blocks,
    shifted_start,
    slice_in_place,
)
from ._loss_per_token import fold_batch_into_tokens, lse_and_target_logit
from ._mesh import (
    explicit_sharding,
    split_axes,
    table_axes,
    varying_like,
)


class _Shards(NamedTuple):
    """The static layout of the table's rows over the mesh (hashable, for `jit`)."""

    mesh: Mesh
    vocab_axes: tuple[str, ...]
    num_shards: int  # the number of vocabulary shards
    rows: int  # rows per shard


def is_on_mesh(table: Array, hidden: Array, targets: Array) -> bool:
    """Whether the table's rows or the tokens are split over explicit mesh axes: the
    loss then runs per shard, here."""
    return bool(table_axes(table)[0] or split_axes(hidden, 0) or split_axes(targets, 0))


def vocab_parallel_lse_and_target_logit(
    table: Array, hidden: Array, targets: Array, blocking: Blocking
) -> tuple[Array, Array, Array]:
    """The blockwise log-sum-exp, target logit and logit sum per token (those of
    `lse_and_target_logit`), on each shard of a table whose rows are split over
    explicit mesh axes (or of a whole table, with tokens split over them), without
    gathering the table."""
    vocab_axes, embedding_axes = table_axes(table)
    if embedding_axes:
        # FSDP: each device's rows are gathered whole where they are used (their
        # gradient is scattered back by the transpose).
        gathered = PartitionSpec(vocab_axes or None, None)
        table = jax.sharding.reshard(table, _explicit(table).update(spec=gathered))
    mesh = jax.typeof(table).sharding.mesh
    count = 1
    for name in vocab_axes:
        count *= mesh.shape[name]
    shards = _Shards(mesh, vocab_axes, count, table.shape[0] // count)
    shard_blocking = blocking._replace(
        block_size=min(blocking.block_size, shards.rows), vocab_axes=vocab_axes
    )
    lse, target_logit, logit_sum = _sharded(
        table, hidden, targets, shard_blocking, shards
    )
    in_range = (targets >= 0) & (targets < blocking.num_rows)
    return lse, jnp.where(in_range, target_logit, jnp.nan), logit_sum


def _explicit(x: Array) -> NamedSharding:
    """The layout of `x`, split over explicit mesh axes (it is, here)."""
    sharding = explicit_sharding(x)
    if sharding is None:
        raise TypeError("Expected an array laid out over explicit mesh axes.")
    return sharding


def _token_axes(hidden: Array, shards: _Shards) -> tuple[str, ...]:
    """The explicit mesh axes (other than the vocabulary's) that split the tokens."""
    return tuple(a for a in split_axes(hidden, 0) if a not in shards.vocab_axes)


def _per_shard(function, shards: _Shards, hidden: Array, layouts: str, outputs: str):
    """`function(*arrays, token_axes=...)` under `jax.shard_map`, manual over the
    vocabulary axes and the axes that split `hidden`'s tokens: each array is laid out
    as its letter in `layouts` (and each result as its letter in `outputs`) says:
    `v` the table's rows, `t` the tokens. Other mesh axes keep their layout."""
    token_axes = _token_axes(hidden, shards)
    specs = dict(
        v=PartitionSpec(shards.vocab_axes, None),
        t=PartitionSpec(token_axes or None),
    )
    in_shards = jax.shard_map(
        partial(function, token_axes=token_axes),
        in_specs=tuple(specs[kind] for kind in layouts),
        out_specs=tuple(specs[kind] for kind in outputs),
        mesh=shards.mesh,
        axis_names=set(shards.vocab_axes) | set(token_axes),
    )

    def split_tokens(x: Array) -> Array:
        # The per-token arrays (targets, cotangents) split as the hidden states'
        # tokens are: each device then holds the same tokens of each.
        sharding = _explicit(x)
        spec = tuple(sharding.spec) + (None,) * (x.ndim - len(sharding.spec))
        if spec[0] == specs["t"][0]:
            return x
        spec = PartitionSpec(specs["t"][0], *spec[1:])
        return jax.sharding.reshard(x, sharding.update(spec=spec))

    def call(*arrays):
        arrays = [
            split_tokens(x) if kind == "t" else x
            for x, kind in zip(arrays, layouts, strict=True)
        ]
        return in_shards(*arrays)

    return call


def _local_targets(targets: Array, shards: _Shards) -> tuple[Array, Array]:
    """Inside the shard_map: each target's row in this shard (0 where another shard
    holds it), and whether this shard holds it."""
    if not shards.vocab_axes:  # a whole table, tokens split: every row is here
        return targets, jnp.ones(targets.shape, bool)
    local = targets - lax.axis_index(shards.vocab_axes) * shards.rows
    here = (local >= 0) & (local < shards.rows)
    return jnp.where(here, local, 0), here


def _across_shards(collective, x: Array, shards: _Shards) -> Array:
    """`collective(x)` over the vocabulary axes; `x` itself for a whole table (whose
    tokens alone are split)."""
    return collective(x, shards.vocab_axes) if shards.vocab_axes else x


def _num_chunks(tokens: int, shards: _Shards) -> int:
    """The number of chunks of a device's tokens: the largest divisor of `tokens`
    that is at most the number of vocabulary shards."""
    return next(
        n for n in range(min(shards.num_shards, tokens), 0, -1) if not tokens % n
    )


def _chunked(x: Array, chunks: int) -> Array:
    """`x` with its token axis split as `(tokens // chunks, chunks)`: chunk `k` is
    `[:, k]`, the tokens `k, k + chunks, ...`."""
    return x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:])


def _chunk(x: Array, k: Array) -> Array:
    """Chunk `k` of `_chunked(x)`, sliced in place as the kernel slices a table's
    rows."""
    return slice_in_place(
        lambda x: lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False), x
    )


# Both passes take the tokens flat: under `jax.vmap`, the batch is folded into them,
# so that the tokens' split over the mesh (say, the batch's over a data axis) is
# the shard_map's, and the table's gradient is one.


def _sharded_forward(
    table: Array, hidden: Array, targets: Array, blocking: Blocking, shards: _Shards
) -> tuple[Array, Array, Array]:
    def forward(table, hidden, targets):
        function = partial(_forward_shard, blocking=blocking, shards=shards)
        in_shards = _per_shard(function, shards, hidden, "vtt", "ttt")
        return in_shards(table, hidden, targets)

    return fold_batch_into_tokens(forward, (True, True, True))(table, hidden, targets)


_sharded = jax.custom_vjp(_sharded_forward, nondiff_argnums=(3, 4))


def _forward_shard(table, hidden, targets, *, blocking, shards, token_axes):
    del token_axes  # each token's sums are over the vocabulary axes only
    local, here = _local_targets(targets, shards)
    chunks = _num_chunks(hidden.shape[0], shards)
    hidden_chunks, target_chunks = _chunked(hidden, chunks), _chunked(local, chunks)

    def chunk_step(hidden_chunks, k):
        # Through a barrier, as in the backward pass: hoisted out of the loop, the
        # bit cast that slices a 16-bit chunk would copy all the hidden states.
        hidden_chunks = lax.optimization_barrier(hidden_chunks)
        chunk, chunk_targets = _chunk(hidden_chunks, k), _chunk(target_chunks, k)
        return hidden_chunks, lse_and_target_logit(
            table, chunk, chunk_targets, blocking
        )

    _, per_chunk = lax.scan(chunk_step, hidden_chunks, jnp.arange(chunks))
    # (chunks, tokens // chunks), back to the token order.
    lse, target_logit, logit_sum = (x.T.reshape(hidden.shape[0]) for x in per_chunk)
    # The max only steadies the exponentials.
    peak = _across_shards(lax.pmax, lse, shards)
    peak = jnp.where(jnp.isfinite(peak), peak, 0)
    total = _across_shards(lax.psum, jnp.exp(lse - peak), shards)
    target_logit = _across_shards(lax.psum, jnp.where(here, target_logit, 0), shards)
    if blocking.with_logit_sum:
        logit_sum = _across_shards(lax.psum, logit_sum, shards)
    else:  # zeros, the same on every shard (the walk's vary with its rows)
        logit_sum = jnp.zeros_like(target_logit)
    return jnp.log(total) + peak, target_logit, logit_sum


def _sharded_fwd(table, hidden, targets, blocking, shards):
    outputs = _sharded(table, hidden, targets, blocking, shards)
    return outputs, (table, hidden, targets, outputs[0])


def _backward_shard(
    table,
    hidden,
    targets,
    lse,
    d_lse,
    d_target,
    d_logit_sum=None,
    *,
    blocking,
    shards,
    token_axes,
):
    check_differentiable(blocking)
    local, here = _local_targets(targets, shards)
    # The target logit's cotangent belongs to the shard that holds the target.
    d_target = jnp.where(here, d_target, 0)
    chunks = _num_chunks(hidden.shape[0], shards)
    # Varying as the table and the hidden states, with which they ride through loops.
    per_token = tuple(
        varying_like(_chunked(x, chunks), table, hidden)
        for x in (hidden.astype(blocking.compute_dtype), local, lse, d_lse, d_target)
        + (() if d_logit_sum is None else (d_logit_sum,))
    )
    accumulate = blocking.accumulate_dtype

    # The loops carry the table and the per-token arrays through an optimization
    # barrier (as the kernel's loops carry the table), so that the casts of a 16-bit
    # table or of the hidden states are not hoisted out as copies of the whole.
    def tile(operands, k, index):
        """Chunk `k`'s tokens against block `index` of this shard's rows."""
        table, per_token = operands
        chunk, targets, lse, d_lse, d_target, *d_sum = (_chunk(x, k) for x in per_token)
        d_sum = d_sum[0] if d_sum else None
        this = block(table, chunk, index, blocking)
        d_logits = block_d_logits(this, targets, lse, d_lse, d_target, blocking, d_sum)
        return chunk, this, d_logits

    def summed(contribution, count, initial, operands):
        """`initial + sum(contribution(operands, i) for i in range(count))`, in a
        loop that carries `operands` through the barrier."""

        def step(carry, i):
            total, operands = carry
            operands = lax.optimization_barrier(operands)
            return (total + contribution(operands, i), operands), None

        (total, operands), _ = lax.scan(step, (initial, operands), jnp.arange(count))
        return total, operands

    def hidden_chunk_step(carry, k):
        d_hidden, operands = carry

        def from_block(operands, index):
            _, this, d_logits = tile(operands, k, index)
            return contract(d_logits, this.rows, 1, 0, blocking)

        initial = jnp.zeros_like(_chunk(per_token[0], k), accumulate)
        initial = varying_like(initial, table, hidden)
        d_chunk, operands = summed(
            from_block,
            num_blocks(table.shape[0], blocking.block_size),
            initial,
            operands,
        )
        # Summed over the shards in float32, then cast: one chunk at a time.
        d_chunk = _across_shards(lax.psum, d_chunk, shards).astype(hidden.dtype)
        d_hidden = lax.dynamic_update_index_in_dim(d_hidden, d_chunk, k, axis=1)
        return (d_hidden, operands), None

    (d_hidden, operands), _ = lax.scan(
        hidden_chunk_step,
        (
            varying_like(jnp.zeros_like(_chunked(hidden, chunks)), hidden),
            (varying_like(table, hidden), per_token),
        ),
        jnp.arange(chunks),
    )

    def table_block_step(carry, index):
        d_table, operands = carry

        shape = (blocking.block_size, table.shape[1])
        initial = varying_like(jnp.zeros(shape, accumulate), table, hidden)

        def from_chunk(operands, k):
            chunk, _, d_logits = tile(operands, k, index)
            layout = explicit_sharding(initial)
            return contract(d_logits, chunk, 0, 0, blocking, layout)

        d_rows, operands = summed(from_chunk, chunks, initial, operands)
        if token_axes:
            # Summed over the devices that split the tokens, in float32.
            d_rows = lax.psum(d_rows, token_axes)
        # The blocks run from the last one, writing without reading: the rows the
        # shifted last block shares with the block before are overwritten.
        _, start = shifted_start(index, blocking.block_size, table.shape[0])
        d_table = lax.dynamic_update_slice_in_dim(
            d_table, d_rows.astype(table.dtype), start, 0
        )
        return (d_table, operands), None

    (d_table, _), _ = lax.scan(
        table_block_step,
        (jnp.zeros_like(table), operands),
        jnp.arange(num_blocks(table.shape[0], blocking.block_size)),
        reverse=True,
    )
    return d_table, d_hidden.reshape(hidden.shape)


def _sharded_bwd(blocking, shards, residuals, cotangents):
    def backward(table, hidden, *per_token):
        function = partial(_backward_shard, blocking=blocking, shards=shards)
        layouts = "v" + "t" * (1 + len(per_token))
        return _per_shard(function, shards, hidden, layouts, "vt")(
            table, hidden, *per_token
        )

    if not blocking.with_logit_sum:  # its cotangent is unused: not carried
        cotangents = cotangents[:2]
    d_table, d_hidden = fold_batch_into_tokens(backward)(*residuals, *cotangents)
    return d_table, d_hidden, None


_sharded.defvjp(_sharded_fwd, _sharded_bwd)
