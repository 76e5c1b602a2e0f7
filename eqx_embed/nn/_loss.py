"""The fused losses' entry points: cross-entropy and log-sum-exp against a decode
table without materialising the `(tokens, vocabulary)` logits.

Each entry point chooses its walk here, once: the per-token walk on one device
(`_loss_per_token.py`), the same walk on each shard of a table or of tokens split
over explicit mesh axes (`_loss_vocab_parallel.py`), or, for a weighted sum on one
device, the token-chunk walk (`_loss_mean.py`). All of them walk the blockwise step of
`_loss_kernel.py`, which is also where a new kind of table plugs in (`table_rows`).
"""

import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from ._loss_kernel import AnyTable, Blocking, TableRows, blocking_for, table_rows
from ._loss_mean import DEFAULT_CHUNK_ELEMENTS, weighted_sum
from ._loss_per_token import lse_and_target_logit
from ._loss_vocab_parallel import is_on_mesh, vocab_parallel_lse_and_target_logit
from ._mesh import vmapped_mesh_axes


def _per_token_walk(
    table: AnyTable, hidden: Array, targets: Array, blocking: Blocking
) -> tuple[Array, Array]:
    """Each token's log-sum-exp and target logit, per shard of a table or of tokens
    split over explicit mesh axes, or on one device (always, for a table kind)."""
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
    lse, _ = _per_token_walk(table, hidden, no_targets, blocking)
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
) -> Float[Array, " tokens"]:
    """Per-token `lse - logit[target] + z_loss * lse**2`, zero where `where` is False.

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` gives a NaN loss. Dtypes, `num_rows` and
    `rows` as [`fused_log_sum_exp`][].
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
    return _losses(table, hidden, targets, where, z_loss, blocking)


def _losses(
    table: AnyTable,
    hidden: Array,
    targets: Array,
    where: Array | None,
    z_loss: float,
    blocking: Blocking,
) -> Array:
    """[`fused_cross_entropy`][], configured."""
    if where is not None:
        # Zeroed before the matmuls, so that a NaN or an infinity in a masked-out row
        # cannot reach the table's gradient (in the backward pass, a masked row's zero
        # cotangent would meet its non-finite softmax: 0 * NaN is NaN).
        hidden = jnp.where(where[:, None], hidden, 0)
    lse, target_logit = _per_token_walk(table, hidden, targets, blocking)
    losses = lse - target_logit
    if z_loss:
        losses = losses + z_loss * lse**2
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
) -> Float[Array, ""]:
    """`sum(weights * (lse - logit[target] + z_loss * lse**2))`, with both gradients
    computed in the forward pass, `chunk_size` tokens at a time, over the first
    `num_rows` rows of `table` (default: all; the others are padding).

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` gives a NaN loss for that token (and
    so a NaN total). A table whose vocabulary is split over explicit mesh axes takes
    the vocabulary-parallel per-token loss instead (`chunk_size` unused). Dtypes and
    `rows` as [`fused_log_sum_exp`][].
    """
    tokens, vocabulary = hidden.shape[0], table.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocabulary)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    blocking = blocking_for(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=None,
        num_rows=num_rows,
        rows=rows,
    )
    if (
        rows is not table_rows
        or is_on_mesh(table, hidden, targets)
        or vmapped_mesh_axes()
    ):
        # A table kind (read block by block, never whole), a table split over its
        # vocabulary, or tokens split over explicit mesh axes (a call's own, or a
        # batch's under vmap): the per-token loss, weighted (its gradients in the
        # backward pass, in memory bounded per device). The token walk would need
        # the whole vocabulary per chunk of tokens, and its scan carries its
        # tokens whole.
        losses = _losses(table, hidden, targets, None, z_loss, blocking)
        return jnp.sum(jnp.asarray(weights, losses.dtype) * losses)
    # A chunk of tokens, bounded by the tokens (not by the vocabulary, as a block).
    blocking = blocking._replace(block_size=max(1, min(chunk_size, tokens)))
    weights = jnp.asarray(weights, blocking.accumulate_dtype)
    return weighted_sum(table, hidden, targets, weights, blocking, float(z_loss))
