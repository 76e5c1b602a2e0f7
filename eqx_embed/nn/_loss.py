"""The fused losses' entry points: cross-entropy and log-sum-exp against a decode
table without materialising the `(tokens, vocabulary)` logits.

Each entry point chooses its walk here, once: the per-token walk on one device
(`_loss_per_token.py`), the same walk on each shard of a table or of tokens split
over explicit mesh axes (`_loss_vocab_parallel.py`), or, for a weighted sum on one
device, the token-chunk walk (`_loss_mean.py`). All of them walk the blockwise step of
`_loss_kernel.py`, which is also where a new kind of table plugs in (`table_rows`).
"""

import math
import numbers
from functools import partial
from typing import Any, overload

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._loss_kernel import (
    AnyTable,
    Blocking,
    TableRows,
    blocking_for,
    per_token_loss,
    table_rows,
)
from ._loss_mean import DEFAULT_CHUNK_ELEMENTS, weighted_sum
from ._loss_per_token import lse_and_target_logit
from ._loss_vocab_parallel import is_on_mesh, vocab_parallel_lse_and_target_logit
from ._mesh import on_auto_vocab_axes, vmapped_mesh_axes


def check_loss_controls(z_loss: Any, label_smoothing: Any) -> None:
    """Raises a `ValueError` naming the argument unless `z_loss` is a finite
    non-negative number and `label_smoothing` one in `[0, 1)`: while tracing, before
    anything compiles."""
    for name, value, upper in (
        ("z_loss", z_loss, math.inf),
        ("label_smoothing", label_smoothing, 1),
    ):
        expected = "in [0, 1)" if upper == 1 else "non-negative and finite"
        try:  # a concrete number: the walks branch on it while tracing
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is None or not math.isfinite(number) or not 0 <= number < upper:
            raise ValueError(f"{name} must be {expected}, got {value!r}.")


def check_ignore_index(ignore_index: Any, num_rows: int) -> None:
    """Raises a `ValueError` unless `ignore_index` is `None` or an int that is not an
    id of the vocabulary `[0, num_rows)`: a real id would silently drop that token's
    loss everywhere it is a target (mask it with `where` instead)."""
    if ignore_index is None:
        return
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise ValueError(f"ignore_index must be an int or None, got {ignore_index!r}.")
    if 0 <= int(ignore_index) < num_rows:
        raise ValueError(
            f"ignore_index must not be an id of the vocabulary [0, {num_rows}) (-100 "
            "is Hugging Face's; mask real ids with `where`), got "
            f"{ignore_index}."
        )


@overload
def kept_where(targets: Any, where: Any, ignore_index: int) -> Array: ...
@overload
def kept_where(targets: Any, where: Any, ignore_index: None) -> Array | None: ...
def kept_where(targets: Any, where: Any, ignore_index: int | None) -> Array | None:
    """`where` (or all True) and False where a target is `ignore_index`, compared in
    the targets' own dtype (an int64 id must not wrap onto it)."""
    if ignore_index is None:
        return None if where is None else jnp.asarray(where)
    ids = targets if isinstance(targets, jax.Array) else np.asarray(targets)
    kept = jnp.asarray(ids != ignore_index)
    return kept if where is None else jnp.asarray(where) & kept


def _per_token_walk(
    table: AnyTable, hidden: Array, targets: Array, blocking: Blocking
) -> tuple[Array, Array, Array]:
    """Each token's log-sum-exp, target logit and sum of logits (zeros unless
    `blocking.with_logit_sum`), per shard of a table or of tokens split over
    explicit mesh axes, or on one device (always, for a table kind)."""
    if blocking.table_rows is table_rows and is_on_mesh(table, hidden, targets):
        return vocab_parallel_lse_and_target_logit(table, hidden, targets, blocking)
    return lse_and_target_logit(table, hidden, targets, blocking)


def fused_log_sum_exp(
    table: AnyTable,
    hidden: Float[Array, "tokens embedding_size"],
    *,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
    rows: TableRows = table_rows,
) -> Float[Array, " tokens"]:
    """`logsumexp(dot_with_rows(table, hidden, ...)[:, :num_rows], axis=-1)`,
    blockwise: `num_rows` (default: all) is the vocabulary, the rows of a padded
    table that are in use; `rows` reads the table's rows (its kind's `table_rows`).

    Accumulated in float32 for a low-precision compute `dtype` (`None`: the promoted
    dtype of `table` and `hidden`), and returned in that accumulation dtype.
    """
    blocking = blocking_for(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=block_size,
        num_rows=num_rows,
        rows=rows,
    )
    no_targets = jnp.zeros(hidden.shape[0], jnp.int32)
    lse, _, _ = _per_token_walk(table, hidden, no_targets, blocking)
    return lse


def fused_cross_entropy(
    table: AnyTable,
    hidden: Float[Array, "tokens embedding_size"],
    targets: Int[Array, " tokens"],
    *,
    where: Bool[Array, " tokens"] | None,
    z_loss: float,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    block_size: int | None,
    num_rows: int | None = None,
    rows: TableRows = table_rows,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    vocab_axes: tuple[str, ...] | None = None,
) -> Float[Array, " tokens"]:
    """Per-token `lse - (1 - s) * logit[target] - s * mean(logits) + z_loss *
    lse**2` (`s` the `label_smoothing`, the mean over the `num_rows` ids), zero
    where `where` is False or the target is `ignore_index`: those of torch's
    `F.cross_entropy(..., label_smoothing=s, ignore_index=ignore_index,
    reduction="none")`, plus the z-loss.

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` (other than `ignore_index`) gives a NaN
    loss. Dtypes, `num_rows` and `rows` as [`fused_log_sum_exp`][]. Under auto mesh
    axes, `vocab_axes` says which split the table's rows (see
    [`on_auto_vocab_axes`][]).
    """
    check_loss_controls(z_loss, label_smoothing)
    blocking = blocking_for(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=block_size,
        num_rows=num_rows,
        rows=rows,
        with_logit_sum=bool(label_smoothing),
    )
    check_ignore_index(ignore_index, blocking.num_rows)
    if ignore_index is not None:
        where = kept_where(targets, where, ignore_index)
        targets = jnp.where(where, targets, 0)

    def walk(table, hidden, targets, *where):
        mask = where[0] if where else None
        return _losses(table, hidden, targets, mask, z_loss, label_smoothing, blocking)

    masks = () if where is None else (where,)
    return on_auto_vocab_axes(walk, vocab_axes)(table, hidden, targets, *masks)


def _losses(
    table: AnyTable,
    hidden: Array,
    targets: Array,
    where: Array | None,
    z_loss: float,
    label_smoothing: float,
    blocking: Blocking,
) -> Array:
    """[`fused_cross_entropy`][], configured."""
    if where is not None:
        # Zeroed before the matmuls, so that a NaN or an infinity in a masked-out row
        # cannot reach the table's gradient (in the backward pass, a masked row's zero
        # cotangent would meet its non-finite softmax: 0 * NaN is NaN).
        hidden = jnp.where(where[:, None], hidden, 0)
    lse, target_logit, logit_sum = _per_token_walk(table, hidden, targets, blocking)
    losses = per_token_loss(
        lse,
        target_logit,
        logit_sum,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        num_rows=blocking.num_rows,
    )
    if where is not None:
        losses = jnp.where(where, losses, 0)
    return losses


def fused_weighted_cross_entropy(
    table: AnyTable,
    hidden: Float[Array, "tokens embedding_size"],
    targets: Int[Array, " tokens"],
    weights: Float[Array, " tokens"],
    *,
    z_loss: float,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    chunk_size: int | None,
    num_rows: int | None = None,
    rows: TableRows = table_rows,
    label_smoothing: float = 0.0,
    ignore_index: int | None = None,
    vocab_axes: tuple[str, ...] | None = None,
) -> Float[Array, ""]:
    """`sum(weights * losses)`, the losses those of [`fused_cross_entropy`][] (label
    smoothing, and weight 0 where the target is `ignore_index`), with both
    gradients computed in the forward pass, `chunk_size` tokens at a time, over the
    first `num_rows` rows of `table` (default: all; the others are padding).

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` (other than `ignore_index`) gives a NaN
    loss for that token (and so a NaN total). A table whose vocabulary is split over
    explicit mesh axes takes the vocabulary-parallel per-token loss instead
    (`chunk_size` unused). Dtypes and `rows` as [`fused_log_sum_exp`][],
    `vocab_axes` as [`fused_cross_entropy`][].
    """
    tokens, vocabulary = hidden.shape[0], table.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocabulary)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    check_loss_controls(z_loss, label_smoothing)
    blocking = blocking_for(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=None,
        num_rows=num_rows,
        rows=rows,
        with_logit_sum=bool(label_smoothing),
    )
    check_ignore_index(ignore_index, blocking.num_rows)
    if ignore_index is not None:
        kept = kept_where(targets, None, ignore_index)
        targets = jnp.where(kept, targets, 0)
        weights = jnp.where(kept, weights, 0)
        hidden = jnp.where(kept[:, None], hidden, 0)
    if tokens == 0:
        # No tokens: 0, as for tokens that are all masked out, and no gradient.
        return jnp.zeros((), blocking.accumulate_dtype)
    return on_auto_vocab_axes(
        partial(
            _weighted_walk,
            blocking=blocking,
            controls=(float(z_loss), float(label_smoothing)),
            chunk_size=chunk_size,
        ),
        vocab_axes,
    )(table, hidden, targets, weights)


def _weighted_walk(
    table,
    hidden,
    targets,
    weights,
    *,
    blocking: Blocking,
    controls: tuple[float, float],
    chunk_size: int,
):
    """[`fused_weighted_cross_entropy`][], checked and configured."""
    if (
        blocking.table_rows is not table_rows
        or is_on_mesh(table, hidden, targets)
        or vmapped_mesh_axes()
    ):
        # A table kind (read block by block, never whole), a table split over its
        # vocabulary, or tokens split over explicit mesh axes (a call's own, or a
        # batch's under vmap): the per-token loss, weighted (its gradients in the
        # backward pass, in memory bounded per device). The token walk would need
        # the whole vocabulary per chunk of tokens, and its scan carries its
        # tokens whole.
        losses = _losses(table, hidden, targets, None, *controls, blocking)
        return jnp.sum(jnp.asarray(weights, losses.dtype) * losses)
    # A chunk of tokens, bounded by the tokens (not by the vocabulary, as a block).
    tokens = hidden.shape[0]
    blocking = blocking._replace(block_size=max(1, min(chunk_size, tokens)))
    weights = jnp.asarray(weights, blocking.accumulate_dtype)
    return weighted_sum(table, hidden, targets, weights, blocking, *controls)
