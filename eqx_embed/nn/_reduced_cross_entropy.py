"""A reduced (weighted-sum) cross-entropy whose gradients are computed in the forward
pass, as Liger-Kernel's fused linear cross-entropy.

[`fused_cross_entropy`][] returns per-token losses, so its backward pass needs each
token's cotangent, which is only known after the forward pass: it recomputes the
logits (four matmuls in all). A loss reduced with weights known up front,
`sum_i weights[i] * loss[i]` (a mean over `where` is `weights = where / count`),
has a cotangent of the form `scalar * weights`: the gradients for a cotangent of 1
can be computed in the forward pass and the backward pass only scales them.

Which walk gives three matmuls (the plain loss's count: logits, then the gradients of
the hidden states and of the table) in bounded memory? Walking the vocabulary in
blocks, as the per-token loss does, cannot: a block's softmax needs the final
log-sum-exp of its tokens, known only after a first pass over the whole vocabulary,
so the logits would be computed twice (four matmuls again). Walking the tokens in
chunks of `chunk_size` instead, each chunk against the whole vocabulary, can: a
chunk's `(chunk_size, vocabulary)` logits give its exact log-sum-exp, its losses and
its `d_logits` at once, which are contracted right away with the table (into that
chunk's rows of the hidden states' gradient) and with the chunk's hidden states
(accumulated into the table's gradient). One matmul of each kind per chunk: three in
all. The memory is bounded by the chunk: one chunk's logits and `d_logits`, of order
`chunk_size * vocabulary`, plus a `(vocabulary, width)` accumulator for the table's
gradient (float32 for low-precision tables, so that the sum over chunks keeps its
precision; for a float32 table it is the gradient itself).

A token count that is not a multiple of the chunk is not padded (padding would copy
the hidden states): the last chunk starts at `tokens - chunk_size` instead, its
tokens that the chunk before covers get weight zero, and the chunks run from the last
one so that the chunk before writes those tokens' gradient rows last.

A padded table (rows past the vocabulary, `pad_vocabulary`) has its padding columns
masked out of every chunk's logits: they count in no log-sum-exp and get no gradient.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Int

from ._cross_entropy import _Blocking, _blocking, _contract, fused_cross_entropy
from ._mesh import split_axes, table_axes, vmapped_mesh_axes

DEFAULT_CHUNK_ELEMENTS = 2**24
"""The default chunk holds about this many logits: `chunk_size * vocabulary`."""


class _Reduced(NamedTuple):
    total: Array  # the weighted sum of the losses, a scalar
    losses: Array  # (tokens,), per token, for the weights' gradient
    d_table: Array | None  # for a cotangent of 1
    d_hidden: Array | None


def _reduced_pass(
    table: Array,
    hidden: Array,
    targets: Array,
    weights: Array,
    blocking: _Blocking,
    z_loss: float,
    with_gradients: bool,
) -> _Reduced:
    tokens, size = hidden.shape[0], blocking.block_size
    accumulate = blocking.accumulate_dtype
    rows = table.astype(blocking.compute_dtype)
    hidden_compute = hidden.astype(blocking.compute_dtype)
    vocabulary = jnp.arange(table.shape[0])

    def step(carry, index):
        total, losses, d_table, d_hidden = carry
        first_new = index * size
        # The last chunk is shifted back to end at the last token rather than padded.
        start = jnp.minimum(first_new, tokens - size)
        is_new = start + jnp.arange(size) >= first_new
        chunk = lax.dynamic_slice_in_dim(hidden_compute, start, size)
        chunk_targets = lax.dynamic_slice_in_dim(targets, start, size)
        chunk_weights = lax.dynamic_slice_in_dim(weights, start, size)
        chunk_weights = jnp.where(is_new, chunk_weights, 0)
        logits = _contract(chunk, rows, 1, 1, blocking)
        if blocking.logit_soft_cap is not None:
            squashed = jnp.tanh(logits / blocking.logit_soft_cap)
            logits = blocking.logit_soft_cap * squashed
        if blocking.num_rows < table.shape[0]:
            logits = jnp.where(vocabulary < blocking.num_rows, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=1)
        in_range = (chunk_targets >= 0) & (chunk_targets < blocking.num_rows)
        local = jnp.clip(chunk_targets, 0, blocking.num_rows - 1)
        picked = jnp.take_along_axis(logits, local[:, None], axis=1)[:, 0]
        chunk_losses = lse - jnp.where(in_range, picked, jnp.nan)
        if z_loss:
            chunk_losses = chunk_losses + z_loss * lse**2
        total = total + jnp.sum(chunk_weights * chunk_losses)
        losses = lax.dynamic_update_slice_in_dim(losses, chunk_losses, start, 0)
        if with_gradients:
            d_lse = chunk_weights * (1 + 2 * z_loss * lse)
            is_target = vocabulary == chunk_targets[:, None]
            d_logits = jnp.exp(logits - lse[:, None]) * d_lse[:, None] - jnp.where(
                is_target, chunk_weights[:, None], 0
            )
            if blocking.logit_soft_cap is not None:
                d_logits = d_logits * (1 - squashed**2)
            d_logits = d_logits.astype(blocking.compute_dtype)
            d_chunk = _contract(d_logits, rows, 1, 0, blocking)
            d_hidden = lax.dynamic_update_slice_in_dim(
                d_hidden, d_chunk.astype(hidden.dtype), start, 0
            )
            d_table = d_table + _contract(d_logits, chunk, 0, 0, blocking)
        return (total, losses, d_table, d_hidden), None

    num_chunks = -(-tokens // size)
    initial = (
        jnp.zeros((), accumulate),
        jnp.zeros(tokens, accumulate),
        jnp.zeros(table.shape, accumulate) if with_gradients else None,
        jnp.zeros_like(hidden) if with_gradients else None,
    )
    (total, losses, d_table, d_hidden), _ = lax.scan(
        step, initial, jnp.arange(num_chunks), reverse=True
    )
    if with_gradients:
        d_table = d_table.astype(table.dtype)
    return _Reduced(total, losses, d_table, d_hidden)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _weighted_sum(table, hidden, targets, weights, blocking, z_loss):
    return _reduced_pass(table, hidden, targets, weights, blocking, z_loss, False).total


def _weighted_sum_fwd(table, hidden, targets, weights, blocking, z_loss):
    reduced = _reduced_pass(table, hidden, targets, weights, blocking, z_loss, True)
    return reduced.total, (reduced.d_table, reduced.d_hidden, reduced.losses)


def _weighted_sum_bwd(blocking, z_loss, residuals, d_total):
    d_table, d_hidden, losses = residuals

    def scale(gradient: Array) -> Array:
        return (d_total * gradient).astype(gradient.dtype)

    # d total / d weights[i] = losses[i]; targets are integers: no gradient.
    return scale(d_table), scale(d_hidden), None, d_total * losses


_weighted_sum.defvjp(_weighted_sum_fwd, _weighted_sum_bwd)


def fused_weighted_cross_entropy(
    table: Float[Array, "num_embeddings embedding_size"],
    hidden: Float[Array, "tokens embedding_size"],
    targets: Int[Array, " tokens"],
    weights: Float[Array, " tokens"],
    *,
    z_loss: float,
    dtype: jnp.dtype | None,
    logit_soft_cap: float | None,
    chunk_size: int | None,
    num_rows: int | None = None,
) -> Float[Array, ""]:
    """`sum(weights * (lse - logit[target] + z_loss * lse**2))`, with both gradients
    computed in the forward pass, `chunk_size` tokens at a time, over the first
    `num_rows` rows of `table` (default: all; the others are padding).

    `targets` must already have been checked against the caller's out-of-range
    policy; one outside `[0, num_rows)` gives a NaN loss for that token (and
    so a NaN total). A table whose vocabulary is split over explicit mesh axes takes
    the vocabulary-parallel per-token loss instead (`chunk_size` unused).
    Accumulated in float32 for a low-precision compute `dtype`
    (`None`: the promoted dtype of `table` and `hidden`), and returned in that
    accumulation dtype.
    """
    tokens, vocabulary = hidden.shape[0], table.shape[0]
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_ELEMENTS // vocabulary)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
    on_mesh = (
        table_axes(table)[0]
        or split_axes(hidden, 0)
        or split_axes(targets, 0)
        or vmapped_mesh_axes()
    )
    if on_mesh:
        # A table split over its vocabulary, or tokens split over explicit mesh axes
        # (a call's own, or a batch's under vmap): the vocabulary-parallel per-token
        # loss, weighted (its gradients in the backward pass, in memory bounded per
        # device). The walk here would need the whole vocabulary per chunk of
        # tokens, and its scan carries its tokens whole.
        losses = fused_cross_entropy(
            table,
            hidden,
            targets,
            where=None,
            z_loss=z_loss,
            dtype=dtype,
            logit_soft_cap=logit_soft_cap,
            block_size=None,
            num_rows=num_rows,
        )
        return jnp.sum(jnp.asarray(weights, losses.dtype) * losses)
    blocking = _blocking(
        table,
        hidden,
        dtype=dtype,
        logit_soft_cap=logit_soft_cap,
        block_size=None,
        num_rows=num_rows,
    )
    # A chunk of tokens, bounded by the tokens (not by the vocabulary, as a block).
    blocking = blocking._replace(block_size=max(1, min(chunk_size, tokens)))
    weights = jnp.asarray(weights, blocking.accumulate_dtype)
    return _weighted_sum(table, hidden, targets, weights, blocking, float(z_loss))
