"""The fused loss on a table whose rows are split over explicit mesh axes, without
gathering the table: Megatron-LM's `vocab_parallel_cross_entropy` under
`jax.shard_map`, in per-device memory that shrinks with the number of shards.

Splitting the vocabulary alone would not shrink the blockwise loss's temporaries:
they are of order `tokens * (block_size + embedding_size)` (a block of logits, the
hidden states' float32 gradient), whatever the vocabulary. So each device also walks
the tokens in chunks, as many as there are vocabulary shards (at most; a divisor of
the tokens that each split of the token axis holds), and keeps one chunk's
temporaries at a time:

- forward: for each chunk, the blockwise log-sum-exp and target logit over the
  device's own rows; then one collective of per-token scalars over the vocabulary
  axes (a max and two sums) combines the shards.
- backward, hidden states' gradient: chunk by chunk, the sum over the device's blocks
  of `d_logits @ rows`, accumulated in float32, summed in float32 over the
  vocabulary axes (one all-reduce of a chunk's gradient), then cast.
- backward, table's gradient: block by block of the device's rows, the sum over
  the chunks of `d_logits.T @ hidden`, accumulated in float32, then cast and
  written into that block's rows of the shard's gradient.

Each backward walk recomputes its blocks of logits: five matmuls in all, one more than
the one-device loss. Chunk `k` holds the tokens `k, k + n, k + 2n, ...` (a strided
view of the token axis, `n` the number of chunks): every chunk then has its share of
each split of the token axis (as under data parallelism), and slicing one never moves
tokens between devices.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import Array

from ._cross_entropy import (
    _block,
    _Blocking,
    _contract,
    _d_logits,
    _lse_and_target_logit,
    _num_blocks,
    fold_batch_into_tokens,
)
from ._vocab_parallel import explicit_sharding, table_axes, varying_like


class _Shards(NamedTuple):
    """The static layout of the table's rows over the mesh (hashable, for `jit`)."""

    mesh: Mesh
    vocab_axes: tuple[str, ...]
    count: int  # the number of vocabulary shards
    rows: int  # rows per shard


def vocab_parallel_lse_and_target_logit(
    table: Array, hidden: Array, targets: Array, blocking: _Blocking
) -> tuple[Array, Array]:
    """The blockwise log-sum-exp and target logit per token (those of
    `_lse_and_target_logit`), on each shard of a table whose rows are split over
    explicit mesh axes, without gathering the table. Other tables: the one-device
    kernel."""
    vocab_axes, embedding_axes = table_axes(table)
    if not vocab_axes:
        return _lse_and_target_logit(table, hidden, targets, blocking)
    if embedding_axes:
        # FSDP: each device's rows are gathered whole where they are used (their
        # gradient is scattered back by the transpose).
        gathered = PartitionSpec(vocab_axes, None)
        table = jax.sharding.reshard(
            table, explicit_sharding(table).update(spec=gathered)
        )
    mesh = jax.typeof(table).sharding.mesh
    count = 1
    for name in vocab_axes:
        count *= mesh.shape[name]
    shards = _Shards(mesh, vocab_axes, count, table.shape[0] // count)
    shard_blocking = blocking._replace(block_size=min(blocking.block_size, shards.rows))
    lse, target_logit = _sharded(table, hidden, targets, shard_blocking, shards)
    in_range = (targets >= 0) & (targets < table.shape[0])
    return lse, jnp.where(in_range, target_logit, jnp.nan)


def _per_shard(function, shards: _Shards, in_vocab: tuple[bool, ...], out_vocab):
    """`function` under `jax.shard_map`, manual over the vocabulary axes only: the
    arguments flagged in `in_vocab` (and results in `out_vocab`) are split over them,
    the others replicated; other mesh axes keep their layout."""

    def spec(split):
        return PartitionSpec(shards.vocab_axes) if split else PartitionSpec()

    return jax.shard_map(
        function,
        in_specs=tuple(spec(split) for split in in_vocab),
        out_specs=tuple(spec(split) for split in out_vocab),
        mesh=shards.mesh,
        axis_names=set(shards.vocab_axes),
    )


def _local_targets(targets: Array, shards: _Shards) -> tuple[Array, Array]:
    """Inside the shard_map: each target's row in this shard (0 where another shard
    holds it), and whether this shard holds it."""
    local = targets - lax.axis_index(shards.vocab_axes) * shards.rows
    here = (local >= 0) & (local < shards.rows)
    return jnp.where(here, local, 0), here


def _num_chunks(hidden: Array, shards: _Shards) -> int:
    """The number of token chunks: at most the number of vocabulary shards, and a
    divisor of the tokens that each split of the token axis holds."""
    tokens, splits = hidden.shape[0], 1
    spec = getattr(jax.typeof(hidden).sharding, "spec", None) or (None,)
    for name in spec[0] if isinstance(spec[0], tuple) else (spec[0],):
        if isinstance(name, str):
            splits *= shards.mesh.shape[name]
    per_split = tokens // splits if tokens % splits == 0 else tokens
    return next(
        n for n in range(min(shards.count, per_split), 0, -1) if not per_split % n
    )


def _chunked(x: Array, chunks: int) -> Array:
    """`x` with its token axis split as `(tokens // chunks, chunks)`: chunk `k` is
    `[:, k]`, the tokens `k, k + chunks, ...`."""
    return x.reshape(x.shape[0] // chunks, chunks, *x.shape[1:])


def _chunk(x: Array, k: Array) -> Array:
    """Chunk `k` of `_chunked(x)`. As the kernel slices a table's rows: a 16-bit
    float array is sliced from its bits, which XLA:CPU does not copy to float32."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize != 2:
        return lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False)
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    chunk = lax.dynamic_index_in_dim(bits, k, axis=1, keepdims=False)
    return lax.bitcast_convert_type(chunk, x.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _sharded(table, hidden, targets, blocking: _Blocking, shards: _Shards):
    forward = partial(_forward_shard, blocking=blocking, shards=shards)
    return _per_shard(forward, shards, (True, False, False), (False, False))(
        table, hidden, targets
    )


def _forward_shard(table, hidden, targets, *, blocking, shards):
    local, here = _local_targets(targets, shards)
    chunks = _num_chunks(hidden, shards)
    hidden_chunks, target_chunks = _chunked(hidden, chunks), _chunked(local, chunks)

    def chunk_step(hidden_chunks, k):
        # Through a barrier, as in the backward pass: hoisted out of the loop, the
        # bit cast that slices a 16-bit chunk would copy all the hidden states.
        hidden_chunks = lax.optimization_barrier(hidden_chunks)
        chunk, chunk_targets = _chunk(hidden_chunks, k), _chunk(target_chunks, k)
        return hidden_chunks, _lse_and_target_logit(
            table, chunk, chunk_targets, blocking
        )

    _, per_chunk = lax.scan(chunk_step, hidden_chunks, jnp.arange(chunks))
    # (chunks, tokens // chunks), back to the token order.
    lse, target_logit = (x.T.reshape(hidden.shape[0]) for x in per_chunk)
    # The max only steadies the exponentials.
    peak = lax.pmax(lse, shards.vocab_axes)
    peak = jnp.where(jnp.isfinite(peak), peak, 0)
    total = lax.psum(jnp.exp(lse - peak), shards.vocab_axes)
    target_logit = lax.psum(jnp.where(here, target_logit, 0), shards.vocab_axes)
    return jnp.log(total) + peak, target_logit


def _sharded_fwd(table, hidden, targets, blocking, shards):
    lse, target_logit = _sharded(table, hidden, targets, blocking, shards)
    return (lse, target_logit), (table, hidden, targets, lse)


def _backward_shard(table, hidden, targets, lse, d_lse, d_target, *, blocking, shards):
    local, here = _local_targets(targets, shards)
    # The target logit's cotangent belongs to the shard that holds the target.
    d_target = jnp.where(here, d_target, 0)
    chunks = _num_chunks(hidden, shards)
    # Varying over the vocabulary axes, as the table they ride with through the loops.
    per_token = tuple(
        varying_like(_chunked(x, chunks), table)
        for x in (hidden.astype(blocking.compute_dtype), local, lse, d_lse, d_target)
    )
    accumulate = blocking.accumulate_dtype

    # The loops carry the table and the per-token arrays through an optimization
    # barrier (as the kernel's loops carry the table), so that the casts of a 16-bit
    # table or of the hidden states are not hoisted out as copies of the whole.
    def tile(operands, k, index):
        """Chunk `k`'s tokens against block `index` of this shard's rows."""
        table, per_token = operands
        chunk, *rest = (_chunk(x, k) for x in per_token)
        block = _block(table, chunk, index, blocking)
        return chunk, block, _d_logits(block, *rest, blocking)

    def hidden_chunk_step(carry, k):
        d_hidden, operands = carry

        def block_step(carry, index):
            d_chunk, operands = carry
            operands = lax.optimization_barrier(operands)
            _, block, d_logits = tile(operands, k, index)
            d_chunk = d_chunk + _contract(d_logits, block.rows, 1, 0, blocking)
            return (d_chunk, operands), None

        # Laid out as a chunk of the hidden states (the tokens may be split).
        initial = jnp.zeros_like(_chunk(per_token[0], k), accumulate)
        (d_chunk, operands), _ = lax.scan(
            block_step, (initial, operands), jnp.arange(_num_blocks(table, blocking))
        )
        # Summed over the shards in float32, then cast: one chunk at a time.
        d_chunk = lax.psum(d_chunk, shards.vocab_axes).astype(hidden.dtype)
        d_hidden = lax.dynamic_update_index_in_dim(d_hidden, d_chunk, k, axis=1)
        return (d_hidden, operands), None

    (d_hidden, operands), _ = lax.scan(
        hidden_chunk_step,
        (jnp.zeros_like(_chunked(hidden, chunks)), (table, per_token)),
        jnp.arange(chunks),
    )

    def table_block_step(carry, index):
        d_table, operands = carry

        def chunk_step(carry, k):
            d_rows, operands = carry
            operands = lax.optimization_barrier(operands)
            chunk, _, d_logits = tile(operands, k, index)
            # Summed over the chunk's tokens, which may be split over a mesh axis.
            d_rows = d_rows + _contract(
                d_logits, chunk, 0, 0, blocking, explicit_sharding(d_rows)
            )
            return (d_rows, operands), None

        shape = (blocking.block_size, table.shape[1])
        initial = varying_like(jnp.zeros(shape, accumulate), table)
        (d_rows, operands), _ = lax.scan(
            chunk_step, (initial, operands), jnp.arange(chunks)
        )
        # As in the kernel: the last block is shifted back to end at the last row,
        # and the blocks run from the last one, writing without reading.
        start = jnp.minimum(index * blocking.block_size, table.shape[0] - shape[0])
        d_table = lax.dynamic_update_slice_in_dim(
            d_table, d_rows.astype(table.dtype), start, 0
        )
        return (d_table, operands), None

    (d_table, _), _ = lax.scan(
        table_block_step,
        (jnp.zeros_like(table), operands),
        jnp.arange(_num_blocks(table, blocking)),
        reverse=True,
    )
    return d_table, d_hidden.reshape(hidden.shape)


def _sharded_bwd(blocking, shards, residuals, cotangents):
    backward = partial(_backward_shard, blocking=blocking, shards=shards)
    in_vocab = (True, False, False, False, False, False)
    backward = fold_batch_into_tokens(
        _per_shard(backward, shards, in_vocab, (True, False))
    )
    d_table, d_hidden = backward(*residuals, *cotangents)
    return d_table, d_hidden, None


_sharded.defvjp(_sharded_fwd, _sharded_bwd)
