"""Cross-entropy against a decode table without materialising the logits.

The plain loss builds the `(tokens, vocabulary)` logits, and its gradient builds
another array of that size: at 8,192 tokens and a 128k vocabulary that is several GiB.
Here the vocabulary is walked in blocks of `block_size` rows, and only one
`(tokens, block_size)` block of logits exists at a time:

- forward: one pass keeps a running log-sum-exp per token (`logaddexp` of the blocks'
  log-sum-exps) and picks out the target logits. The only residual is the
  log-sum-exp, one number per token.
- backward: a second pass recomputes each block of logits, turns it into the gradient
  with respect to the logits (`softmax * d_lse + one_hot * d_target`, times the soft
  cap's derivative `1 - tanh^2`), and contracts it at once with the table rows (into
  the hidden states' gradient, accumulated across blocks) and with the hidden states
  (into that block's rows of the table's gradient, written once).

That is four matmuls, one more than the plain loss. Computing the gradients during the
forward pass instead (Liger's scheme) does not save it over the vocabulary: the
softmax needs the final log-sum-exp, so the forward pass still needs two passes over
the vocabulary, and its table gradient would be stored at the size of the table and
be right only for a cotangent that is the same for every token (a mean or a sum), not
for per-token losses weighted by the caller. The fourth matmul is paid back by never
writing or reading the two logit-sized arrays. (For a loss reduced with weights known
up front, `_reduced_cross_entropy.py` walks token chunks instead: three matmuls.)

A vocabulary that is not a multiple of the block is not padded (padding would copy
the table): the last block starts at `vocabulary - block_size` instead and the columns
it shares with the block before are masked out of the log-sum-exp and the gradient.
A table that is itself padded (rows past the vocabulary, so that a device mesh can
split it evenly: `pad_vocabulary`) has those rows masked out the same way: they get
no gradient, and a target there is out of range.

XLA:CPU has no 16-bit float data movement: it would slice a bfloat16 table as a
float32 copy of the whole table, hoisted out of the loop. So blocks of a 16-bit table
are sliced from its bits as 16-bit integers, and the table rides through each loop's
carry behind an optimization barrier, so that the bit cast stays inside the loop
(hoisted, it would be a copy). The table's gradient is written block by block into
the loop-carried buffer that becomes the output, without reading it back (the last
block first), which XLA:CPU keeps in that one buffer even for bfloat16 (though for
16-bit tables each block's update is a pass over the whole table). What is left of the
temporaries is of order `tokens * (block_size + embedding_size)`; for bfloat16 on
CPU that includes float32 copies of the hidden states and of each block's
`d_logits`, which XLA:CPU makes for the table gradient's product.
"""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jaxtyping import Array, Bool, Float, Int

from ._contracts import check_positive
from ._mesh import (
    explicit_sharding,
    sharded_like,
    varying_like,
)
from ._numerics import accumulation_dtype

DEFAULT_BLOCK_SIZE = 2048
"""The default number of vocabulary rows per block."""


class _Blocking(NamedTuple):
    """The static configuration of one fused computation (hashable, for `jit`)."""

    block_size: int
    compute_dtype: jnp.dtype
    accumulate_dtype: jnp.dtype
    logit_soft_cap: float | None
    # The vocabulary: the table's rows from it on are padding (`pad_vocabulary`).
    num_rows: int
    # Inside a vocabulary-parallel shard_map, the mesh axes that split the rows:
    # the table is then this device's shard of them.
    vocab_axes: tuple[str, ...] = ()


def _contract(
    left: Array,
    right: Array,
    left_axis: int,
    right_axis: int,
    blocking: _Blocking,
    out_sharding=None,
) -> Array:
    # A dot_general rather than a matmul of a transpose, which XLA:CPU would copy.
    return lax.dot_general(
        left,
        right,
        (((left_axis,), (right_axis,)), ((), ())),
        preferred_element_type=blocking.accumulate_dtype,
        out_sharding=out_sharding,
    )


class _Block(NamedTuple):
    rows: Array  # (block_size, embedding_size), the compute dtype
    logits: Array  # (tokens, block_size), soft-capped, the accumulation dtype
    cap_slope: Array | None  # d capped / d raw logits, when soft-capped
    columns: Array  # (block_size,), vocabulary index of each column
    # (block_size,), False for columns an earlier block covered and padding rows
    is_new: Array
    first_new: Array  # the first vocabulary index this block adds


def slice_in_place(slice_: Callable[[Array], Array], x: Array) -> Array:
    """`slice_(x)`, where `slice_` takes a slice of its argument. XLA:CPU moves
    16-bit floats as float32: slicing them would slice a float32 copy of the whole of
    `x`. Their bits, as 16-bit integers, are sliced in place."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize != 2:
        return slice_(x)
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    return lax.bitcast_convert_type(slice_(bits), x.dtype)


def _slice_rows(table: Array, start: Array, size: int) -> Array:
    return slice_in_place(lambda x: lax.dynamic_slice_in_dim(x, start, size), table)


def rows_in_use(table: Array, blocking: _Blocking) -> int | Array:
    """How many of `table`'s rows (this device's shard of them, inside a
    vocabulary-parallel shard_map) are in the vocabulary: the others are padding,
    which sits at the end of the whole table."""
    if not blocking.vocab_axes:
        return blocking.num_rows
    first_row = lax.axis_index(blocking.vocab_axes) * table.shape[0]
    return jnp.clip(blocking.num_rows - first_row, 0, table.shape[0])


def _block(table: Array, hidden: Array, index: Array, blocking: _Blocking) -> _Block:
    size = blocking.block_size
    first_new = index * size
    # The last block is shifted back to end at the last row rather than padded.
    start = jnp.minimum(first_new, table.shape[0] - size)
    rows = _slice_rows(table, start, size).astype(blocking.compute_dtype)
    logits = _contract(hidden, rows, 1, 1, blocking)
    cap_slope = None
    if blocking.logit_soft_cap is not None:
        squashed = jnp.tanh(logits / blocking.logit_soft_cap)
        logits = blocking.logit_soft_cap * squashed
        cap_slope = 1 - squashed**2
    columns = start + jnp.arange(size)
    is_new = columns >= first_new
    if blocking.vocab_axes or blocking.num_rows < table.shape[0]:
        is_new = is_new & (columns < rows_in_use(table, blocking))
    return _Block(rows, logits, cap_slope, columns, is_new, first_new)


def _num_blocks(table: Array, blocking: _Blocking) -> int:
    return -(-table.shape[0] // blocking.block_size)


# Each loop carries the table through an optimization barrier, so that it is not
# loop-invariant: otherwise XLA hoists the bit cast of a 16-bit table out of the
# loop, which copies the whole table.


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _lse_and_target_logit(
    table: Array, hidden: Array, targets: Array, blocking: _Blocking
) -> tuple[Array, Array]:
    hidden = hidden.astype(blocking.compute_dtype)

    def step(carry, index):
        lse, target_logit, table = carry
        table = lax.optimization_barrier(table)
        block = _block(table, hidden, index, blocking)
        masked = jnp.where(block.is_new, block.logits, -jnp.inf)
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(masked, axis=1))
        start = block.columns[0]
        in_block = (targets >= block.first_new) & (targets < start + len(block.columns))
        local = jnp.clip(targets - start, 0, len(block.columns) - 1)
        picked = jnp.take_along_axis(block.logits, local[:, None], axis=1)[:, 0]
        target_logit = target_logit + jnp.where(in_block, picked, 0)
        return (lse, target_logit, table), None

    dtype = blocking.accumulate_dtype
    initial = (
        # Laid out as the tokens are (they may be split over a mesh axis).
        varying_like(jnp.full_like(hidden[:, 0], -jnp.inf, dtype), table, hidden),
        varying_like(jnp.zeros_like(hidden[:, 0], dtype), table, hidden),
        table,
    )
    (lse, target_logit, _), _ = lax.scan(
        step, initial, jnp.arange(_num_blocks(table, blocking))
    )
    in_range = (targets >= 0) & (targets < rows_in_use(table, blocking))
    return lse, jnp.where(in_range, target_logit, jnp.nan)


def _lse_and_target_logit_fwd(table, hidden, targets, blocking):
    lse, target_logit = _lse_and_target_logit(table, hidden, targets, blocking)
    return (lse, target_logit), (table, hidden, targets, lse)


def _d_logits(
    block: _Block,
    targets: Array,
    lse: Array,
    d_lse: Array,
    d_target_logit: Array,
    blocking: _Blocking,
) -> Array:
    """The gradient with respect to a block's (raw) logits, in the compute dtype."""
    softmax = jnp.where(block.is_new, jnp.exp(block.logits - lse[:, None]), 0)
    is_target = block.is_new & (block.columns == targets[:, None])
    d_logits = softmax * d_lse[:, None] + jnp.where(
        is_target, d_target_logit[:, None], 0
    )
    if block.cap_slope is not None:
        d_logits = d_logits * block.cap_slope
    return d_logits.astype(blocking.compute_dtype)


def _backward_pass(blocking, table, hidden, targets, lse, d_lse, d_target_logit):
    hidden_compute = hidden.astype(blocking.compute_dtype)

    def step(carry, index):
        d_hidden, d_table, table = carry
        table = lax.optimization_barrier(table)
        block = _block(table, hidden_compute, index, blocking)
        d_logits = _d_logits(block, targets, lse, d_lse, d_target_logit, blocking)
        d_hidden_block = _contract(d_logits, block.rows, 1, 0, blocking)
        d_hidden = d_hidden + sharded_like(d_hidden_block, d_hidden)
        # Summed over the tokens, which may be split over a mesh axis: the rows'
        # gradient takes the table's layout.
        d_rows = _contract(
            d_logits, hidden_compute, 0, 0, blocking, explicit_sharding(d_table)
        )
        # The blocks run from the last one: the rows that the shifted last block
        # shares with the block before are overwritten by that block. Writing
        # without reading keeps a 16-bit table's gradient in one buffer.
        d_table = lax.dynamic_update_slice_in_dim(
            d_table, d_rows.astype(table.dtype), block.columns[0], 0
        )
        return (d_hidden, d_table, table), None

    initial = (
        varying_like(jnp.zeros(hidden.shape, blocking.accumulate_dtype), table),
        jnp.zeros_like(table),
        table,
    )
    (d_hidden, d_table, _), _ = lax.scan(
        step, initial, jnp.arange(_num_blocks(table, blocking)), reverse=True
    )
    return d_table, d_hidden.astype(hidden.dtype)


def fold_batch_into_tokens(
    function: Callable, per_token_outputs: tuple[bool, ...] = (False, True)
) -> Callable:
    """`function(table, *per_token)`, which under `jax.vmap` with a shared table runs
    once on the batch folded into the token axis. Its outputs flagged in
    `per_token_outputs` have a token axis (unfolded back into the batch); the others
    are summed over the tokens (the table's gradient).

    Vmapped as it is, the backward pass would carry one table gradient per example
    (one call per sequence, say) and split the table-gradient matmul into small
    ones. Folded, it makes one pass and one table gradient, summed over the batch by
    the matmul itself.
    """

    @custom_vmap
    def folded(*arrays):
        return function(*arrays)

    @folded.def_vmap
    def fold(axis_size, in_batched, table, *per_token):
        if in_batched[0]:
            in_axes = tuple(0 if batched else None for batched in in_batched)
            outputs = jax.vmap(function, in_axes)(table, *per_token)
            return outputs, (True,) * len(outputs)
        per_token = [
            x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(per_token, in_batched[1:], strict=True)
        ]
        tokens = per_token[0].shape[1]
        flat = [x.reshape(axis_size * tokens, *x.shape[2:]) for x in per_token]
        outputs = list(folded(table, *flat))
        for i, out in enumerate(outputs):
            if per_token_outputs[i]:
                unfolded = out.reshape(axis_size, tokens, *out.shape[1:])
                # Laid out as the per-token input of its rank.
                like = next(x for x in per_token if x.ndim == unfolded.ndim)
                outputs[i] = sharded_like(unfolded, like)
        return tuple(outputs), per_token_outputs

    return folded


def _lse_and_target_logit_bwd(blocking, residuals, cotangents):
    backward = fold_batch_into_tokens(partial(_backward_pass, blocking))
    d_table, d_hidden = backward(*residuals, *cotangents)
    return d_table, d_hidden, None


_lse_and_target_logit.defvjp(_lse_and_target_logit_fwd, _lse_and_target_logit_bwd)


def _any_table_lse_and_target_logit(table, hidden, targets, blocking):
    # Imported here: the vocabulary-parallel loss is built on this module's kernel.
    from ._vocab_parallel_loss import vocab_parallel_lse_and_target_logit

    # A table split over its vocabulary runs the kernel on each shard.
    return vocab_parallel_lse_and_target_logit(table, hidden, targets, blocking)


def _blocking(
    table: Array,
    hidden: Array,
    *,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
) -> _Blocking:
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    check_positive("block_size", block_size, integer=True)
    compute = jnp.result_type(table, hidden) if dtype is None else jnp.dtype(dtype)
    accumulate = accumulation_dtype(compute)
    return _Blocking(
        min(block_size, table.shape[0]),
        compute,
        accumulate,
        logit_soft_cap,
        table.shape[0] if num_rows is None else num_rows,
    )


def fused_log_sum_exp(
    table: Float[Array, "num_embeddings embedding_size"],
    hidden: Float[Array, "tokens embedding_size"],
    *,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
) -> Float[Array, " tokens"]:
    """`logsumexp(dot_with_rows(table, hidden, ...)[:, :num_rows], axis=-1)`,
    blockwise: `num_rows` (default: all) is the vocabulary, the rows of a padded
    table that are in use.

    Accumulated in float32 for a low-precision compute `dtype` (`None`: the promoted
    dtype of `table` and `hidden`), and returned in that accumulation dtype.
    """
    blocking = _blocking(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=block_size,
        num_rows=num_rows,
    )
    no_targets = jnp.zeros(hidden.shape[0], jnp.int32)
    lse, _ = _any_table_lse_and_target_logit(table, hidden, no_targets, blocking)
    return lse


def fused_cross_entropy(
    table: Float[Array, "num_embeddings embedding_size"],
    hidden: Float[Array, "tokens embedding_size"],
    targets: Int[Array, " tokens"],
    *,
    where: Bool[Array, " tokens"] | None,
    z_loss: float,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
) -> Float[Array, " tokens"]:
    """Per-token `lse - logit[target] + z_loss * lse**2`, zero where `where` is False.

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` gives a NaN loss. Dtypes and `num_rows` as
    [`fused_log_sum_exp`][].
    """
    blocking = _blocking(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=block_size,
        num_rows=num_rows,
    )
    if where is not None:
        # Zeroed before the matmuls, so that a NaN or an infinity in a masked-out row
        # cannot reach the table's gradient (in the backward pass, a masked row's zero
        # cotangent would meet its non-finite softmax: 0 * NaN is NaN).
        hidden = jnp.where(where[:, None], hidden, 0)
    lse, target_logit = _any_table_lse_and_target_logit(
        table, hidden, targets, blocking
    )
    losses = lse - target_logit
    if z_loss:
        losses = losses + z_loss * lse**2
    if where is not None:
        losses = jnp.where(where, losses, 0)
    return losses
