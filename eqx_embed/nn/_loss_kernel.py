"""The blockwise step that every fused loss walks: one block of a table's rows against
some hidden states, as capped logits, their masks and their gradient.

The per-token loss (`_loss_per_token.py`) walks the vocabulary in blocks, the mean
loss (`_loss_mean.py`) walks the tokens in chunks against the whole table, and the
vocabulary-parallel loss (`_loss_vocab_parallel.py`) walks each device's shard of the
rows; all of them take their rows, logits, masks and `d_logits` from here.

**Adding a table kind.** A table is read only through [`table_rows`][] (the one
plug-in point): given the table (any pytree of arrays), a start and a size, it
returns that block of rows, `(size, width)`, in the compute dtype. A quantized or an
adapted table supplies its own function of the same signature in
`Blocking.table_rows` (`_table_kind.py` defines the kinds). The per-token walk writes
the plain table's gradient block by block as the gradient of those rows
(`d_table[start:start + size] = d_rows`); a kind's float leaves get theirs through
its `table_rows` ([`rows_gradient`][]), its integer leaves none. The token-chunk walk
of the mean loss reads the whole table at once: it takes plain tables only (see
[`check_differentiable`][]), and the entry points give a kind the per-token walk.

XLA:CPU has no 16-bit float data movement: it would slice a bfloat16 table as a
float32 copy of the whole table, hoisted out of the loop. So blocks of a 16-bit table
are sliced from its bits as 16-bit integers ([`slice_in_place`][]), and the walks
carry the table through each loop behind an optimization barrier, so that the bit
cast stays inside the loop (hoisted, it would be a copy).
"""

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._contracts import check_positive
from ._numerics import accumulation_dtype, check_soft_cap, soft_capped_and_slope

DEFAULT_BLOCK_SIZE = 2048
"""The default number of vocabulary rows per block."""


def slice_in_place(slice_: Callable[[Array], Array], x: Array) -> Array:
    """`slice_(x)`, where `slice_` takes a slice of its argument. XLA:CPU moves
    16-bit floats as float32: slicing them would slice a float32 copy of the whole of
    `x`. Their bits, as 16-bit integers, are sliced in place."""
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype.itemsize != 2:
        return slice_(x)
    bits = lax.bitcast_convert_type(x, jnp.uint16)
    return lax.bitcast_convert_type(slice_(bits), x.dtype)


def table_rows(table: Any, start: int | Array, size: int, dtype: jnp.dtype) -> Array:
    """The plug-in point of a table kind: rows `[start, start + size)` of `table`,
    shape `(size, width)`, in the compute `dtype`.

    **Arguments:**

    - `table`: the table as the loss received it. For this, the plain kind: a
        `(rows, width)` array.
    - `start`: the first row, a Python int or a traced int32 scalar, with
        `0 <= start <= rows - size` (the walks shift a last block back rather than
        pad it).
    - `size`: the number of rows, static.
    - `dtype`: the compute dtype.

    **Returns:**

    A `(size, width)` array of `dtype`. Called once per block inside the walks'
    loops, so it must not copy the whole table (a 16-bit table is sliced from its
    bits, see [`slice_in_place`][]); the whole table (`start` 0, `size` all its rows)
    is only cast.
    """
    if isinstance(start, int) and start == 0 and size == table.shape[0]:
        return table.astype(dtype)
    rows = slice_in_place(lambda x: lax.dynamic_slice_in_dim(x, start, size), table)
    return rows.astype(dtype)


TableRows = Callable[[Any, Any, int, jnp.dtype], Array]
"""The signature of a table kind's plug-in, as [`table_rows`][]."""

AnyTable = Any
"""A table as the walks take it: a plain `(rows, width)` array, or a table kind
(`_table_kind.py`), a module with a `shape` that they read only through
`Blocking.table_rows`."""


class Blocking(NamedTuple):
    """The static configuration of one fused computation (hashable, for `jit`)."""

    # Rows per block of the table (the per-token walks) or tokens per chunk (the
    # mean walk).
    block_size: int
    compute_dtype: jnp.dtype
    accumulate_dtype: jnp.dtype
    logit_soft_cap: float | None
    # The vocabulary: the table's rows from it on are padding (`pad_vocabulary`).
    num_rows: int
    # Inside a vocabulary-parallel shard_map, the mesh axes that split the rows:
    # the table is then this device's shard of them.
    vocab_axes: tuple[str, ...] = ()
    # How a block of rows is read from the table: the table kind's plug-in.
    table_rows: TableRows = table_rows
    # Whether the walk also sums each token's logits over the vocabulary (the
    # uniform part of label smoothing); without it, that sum is zero and unused.
    with_logit_sum: bool = False


def blocking_for(
    table: AnyTable,
    hidden: Array,
    *,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
    rows: TableRows = table_rows,
    with_logit_sum: bool = False,
) -> Blocking:
    """The configuration of a loss of `hidden` against `table`: `block_size`
    (default [`DEFAULT_BLOCK_SIZE`][]) at most the table's rows, the compute dtype
    `dtype` (`None`: the promoted dtype of `table` and `hidden`), `num_rows` (default:
    all) the vocabulary, `rows` the table kind's [`table_rows`][], and
    `with_logit_sum` whether the walk sums each token's logits too."""
    if block_size is None:
        block_size = DEFAULT_BLOCK_SIZE
    check_positive("block_size", block_size, integer=True)
    if logit_soft_cap is not None:
        check_soft_cap("logit_soft_cap", logit_soft_cap)
    compute = jnp.result_type(table, hidden) if dtype is None else jnp.dtype(dtype)
    return Blocking(
        block_size=min(block_size, table.shape[0]),
        compute_dtype=compute,
        accumulate_dtype=accumulation_dtype(compute),
        logit_soft_cap=logit_soft_cap,
        num_rows=table.shape[0] if num_rows is None else num_rows,
        table_rows=rows,
        with_logit_sum=with_logit_sum,
    )


def is_plain_kind(blocking: Blocking) -> bool:
    """Whether the table is of the plain kind, an array whose gradient the walks
    write block by block (see the module's docstring)."""
    return blocking.table_rows is table_rows


def float_leaves(table: Any) -> Any:
    """The float leaves of a table kind (its other leaves `None`): what the fused
    losses differentiate, and the structure of its gradient."""
    return eqx.filter(table, eqx.is_inexact_array)


def rows_gradient(table: Any, start: Array, d_rows: Array, blocking: Blocking) -> Any:
    """The gradient of a table kind's float leaves (others `None`) from the
    cotangent `d_rows` of its rows `[start, start + len(d_rows))`, through its
    `table_rows` (a kind reads a block from small float leaves, so their whole
    gradient per block is cheap)."""
    floats, others = eqx.partition(table, eqx.is_inexact_array)

    def rows(floats: Any) -> Array:
        table = eqx.combine(floats, others)
        return blocking.table_rows(table, start, len(d_rows), blocking.compute_dtype)

    _, pullback = jax.vjp(rows, floats)
    return pullback(d_rows.astype(blocking.compute_dtype))[0]


def add_rows_gradient(
    table: Any, gradient: Any, start: Array, d_rows: Array, blocking: Blocking
) -> Any:
    """`gradient` (of a table kind's float leaves, as [`float_leaves`][]) plus what
    the cotangent `d_rows` of its rows `[start, start + len(d_rows))` gives them.

    A kind that knows how a block's gradient reaches its arrays says so with a
    method `add_rows_gradient(gradient, start, d_rows, blocking)` of the same contract
    (a LoRA table writes the block's rows of its `up` factor and adds to its small
    `down`, rather than add a whole-table pullback per block); the others get
    [`rows_gradient`][] added. Blocks run from the last: a kind may write a block's
    rows of its gradient without reading them, as the plain walk does (the rows the
    shifted last block shares with the block before have a zero cotangent there and
    are written again by that block)."""
    own = getattr(table, "add_rows_gradient", None)
    if own is not None:
        return own(gradient, start, d_rows, blocking)
    block = rows_gradient(table, start, d_rows, blocking)
    return jax.tree.map(jnp.add, gradient, block)


def check_differentiable(blocking: Blocking) -> None:
    """Raises unless the table is of the plain kind, the one whose gradient the walks
    know how to write (see the module's docstring)."""
    if blocking.table_rows is not table_rows:
        raise NotImplementedError(
            "The fused losses differentiate only a plain table, got one read by "
            f"{blocking.table_rows!r}."
        )


def contract(
    left: Array,
    right: Array,
    left_axis: int,
    right_axis: int,
    blocking: Blocking,
    out_sharding: Any = None,
) -> Array:
    """`left` and `right` contracted over one axis each, accumulated in the
    accumulation dtype. A dot_general rather than a matmul of a transpose, which
    XLA:CPU would copy."""
    return lax.dot_general(
        left,
        right,
        (((left_axis,), (right_axis,)), ((), ())),
        preferred_element_type=blocking.accumulate_dtype,
        out_sharding=out_sharding,
    )


def shifted_start(index: Array, size: int, length: int) -> tuple[Array, Array]:
    """Block `index` of `size` along an axis of `length`: the first position it adds
    and where it starts. A `length` that `size` does not divide is not padded
    (padding would copy): the last block is shifted back to end at `length`, and the
    positions it shares with the block before (those below the first it adds) are
    masked out by the caller, or overwritten when the blocks run from the last."""
    first_new = index * size
    return first_new, jnp.minimum(first_new, length - size)


def num_blocks(length: int, size: int) -> int:
    """The number of blocks of `size` that cover `length`."""
    return -(-length // size)


def rows_in_use(table: AnyTable, blocking: Blocking) -> int | Array:
    """How many of `table`'s rows (this device's shard of them, inside a
    vocabulary-parallel shard_map) are in the vocabulary: the others are padding,
    which sits at the end of the whole table."""
    if not blocking.vocab_axes:
        return blocking.num_rows
    first_row = lax.axis_index(blocking.vocab_axes) * table.shape[0]
    return jnp.clip(blocking.num_rows - first_row, 0, table.shape[0])


class Block(NamedTuple):
    """One block of rows against some hidden states."""

    rows: Array  # (block_size, embedding_size), the compute dtype
    logits: Array  # (tokens, block_size), soft-capped, the accumulation dtype
    cap_slope: Array | None  # d capped / d raw logits, when soft-capped
    columns: Array  # (block_size,), vocabulary index of each column
    # (block_size,), False for columns an earlier block covered and padding rows
    is_new: Array
    first_new: Array  # the first vocabulary index this block adds


def block(table: Any, hidden: Array, index: Array, blocking: Blocking) -> Block:
    """Block `index` of the table's rows against `hidden` (in the compute dtype)."""
    size, length = blocking.block_size, table.shape[0]
    first_new, start = shifted_start(index, size, length)
    rows = blocking.table_rows(table, start, size, blocking.compute_dtype)
    logits, cap_slope = soft_capped_and_slope(
        contract(hidden, rows, 1, 1, blocking), blocking.logit_soft_cap
    )
    columns = start + jnp.arange(size)
    is_new = columns >= first_new
    if blocking.vocab_axes or blocking.num_rows < length:
        is_new = is_new & (columns < rows_in_use(table, blocking))
    return Block(rows, logits, cap_slope, columns, is_new, first_new)


def d_logits(
    logits: Array,
    cap_slope: Array | None,
    lse: Array,
    d_lse: Array,
    is_target: Array,
    d_target_logit: Array,
    blocking: Blocking,
    is_new: Array | None = None,
    d_logit_sum: Array | None = None,
) -> Array:
    """The gradient with respect to raw logits, in the compute dtype, given the
    cotangents of each token's log-sum-exp (`d_lse`), of its target logit
    (`d_target_logit`, where `is_target`) and, with `blocking.with_logit_sum`, of
    the sum of its logits over the vocabulary (`d_logit_sum`, on every column of
    `is_new`): `softmax * d_lse + is_target * d_target_logit + d_logit_sum`, times
    the soft cap's slope. Columns outside `is_new` (when given) get no softmax term
    and no share of the sum."""
    softmax = jnp.exp(logits - lse[:, None])
    if is_new is not None:
        softmax = jnp.where(is_new, softmax, 0)
    d = softmax * d_lse[:, None] + jnp.where(is_target, d_target_logit[:, None], 0)
    if blocking.with_logit_sum:  # every caller then passes `d_logit_sum`
        uniform = cast(Array, d_logit_sum)[:, None]
        d = d + (uniform if is_new is None else jnp.where(is_new, uniform, 0))
    if cap_slope is not None:
        d = d * cap_slope
    return d.astype(blocking.compute_dtype)


def block_d_logits(
    block: Block,
    targets: Array,
    lse: Array,
    d_lse: Array,
    d_target_logit: Array,
    blocking: Blocking,
    d_logit_sum: Array | None = None,
) -> Array:
    """[`d_logits`][] of a block, its target columns those of `targets` it adds."""
    is_target = block.is_new & (block.columns == targets[:, None])
    return d_logits(
        block.logits,
        block.cap_slope,
        lse,
        d_lse,
        is_target,
        d_target_logit,
        blocking,
        block.is_new,
        d_logit_sum,
    )


def block_logit_sum(block: Block) -> Array:
    """Each token's sum of the block's logits over the columns it adds (not those an
    earlier block covered, nor padding rows, nor other shards' rows)."""
    return jnp.sum(jnp.where(block.is_new, block.logits, 0), axis=1)


def per_token_loss(
    lse: Array,
    target_logit: Array,
    logit_sum: Array | None,
    *,
    z_loss: float,
    label_smoothing: float,
    num_rows: int,
) -> Array:
    """The loss of each token from its walk's sums: the cross-entropy against the
    target mixed with the uniform distribution over the `num_rows` ids of the
    vocabulary (torch's `label_smoothing`), `lse - (1 - s) * target_logit - s *
    mean(logits)`, plus PaLM's `z_loss * lse**2`."""
    if label_smoothing:  # every walk then sums the logits (`with_logit_sum`)
        uniform = cast(Array, logit_sum) * (label_smoothing / num_rows)
        losses = lse - (1 - label_smoothing) * target_logit - uniform
    else:
        losses = lse - target_logit
    if z_loss:
        losses = losses + z_loss * lse**2
    return losses
