"""A reduced (weighted-sum) cross-entropy whose gradients are computed in the forward
pass, as Liger-Kernel's fused linear cross-entropy.

The per-token loss (`_loss_per_token.py`) needs each token's cotangent, which is only
known after the forward pass: it recomputes the logits (four matmuls in all). A loss
reduced with weights known up front, `sum_i weights[i] * loss[i]` (a mean over
`where` is `weights = where / count`), has a cotangent of the form
`scalar * weights`: the gradients for a cotangent of 1 can be computed in the forward
pass and the backward pass only scales them.

Which walk gives three matmuls (the plain loss's count: logits, then the gradients of
the hidden states and of the table) in bounded memory? Walking the vocabulary in
blocks cannot: a block's softmax needs the final log-sum-exp of its tokens, known
only after a first pass over the whole vocabulary, so the logits would be computed
twice. Walking the tokens in chunks of `chunk_size` instead, each chunk against the
whole vocabulary, can: a chunk's `(chunk_size, vocabulary)` logits give its exact
log-sum-exp, its losses and its `d_logits` at once, which are contracted right away
with the table (into that chunk's rows of the hidden states' gradient) and with the
chunk's hidden states (accumulated into the table's gradient). The memory is bounded
by the chunk: one chunk's logits and `d_logits`, of order `chunk_size * vocabulary`,
plus a `(vocabulary, width)` accumulator for the table's gradient (float32 for
low-precision tables, so that the sum over chunks keeps its precision; for a float32
table it is the gradient itself).

The chunks are the kernel's blocks along the token axis: the last one is shifted
back, its tokens that the chunk before covers get weight zero, and the chunks run
from the last one so that the chunk before writes those tokens' gradient rows last.
A padded table's padding columns are masked out of every chunk's logits.
"""

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._loss_kernel import (
    Blocking,
    check_differentiable,
    contract,
    d_logits,
    num_blocks,
    per_token_loss,
    rows_in_use,
    shifted_start,
)
from ._numerics import soft_capped_and_slope

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
    blocking: Blocking,
    z_loss: float,
    label_smoothing: float,
    with_gradients: bool,
) -> _Reduced:
    if with_gradients:
        check_differentiable(blocking)
    tokens, size = hidden.shape[0], blocking.block_size
    vocabulary = table.shape[0]
    rows = blocking.table_rows(table, 0, vocabulary, blocking.compute_dtype)
    hidden_compute = hidden.astype(blocking.compute_dtype)
    columns = jnp.arange(vocabulary)

    def step(carry, index):
        total, losses, d_table, d_hidden = carry
        first_new, start = shifted_start(index, size, tokens)
        is_new = start + jnp.arange(size) >= first_new
        chunk = lax.dynamic_slice_in_dim(hidden_compute, start, size)
        chunk_targets = lax.dynamic_slice_in_dim(targets, start, size)
        chunk_weights = lax.dynamic_slice_in_dim(weights, start, size)
        chunk_weights = jnp.where(is_new, chunk_weights, 0)
        logits, cap_slope = soft_capped_and_slope(
            contract(chunk, rows, 1, 1, blocking), blocking.logit_soft_cap
        )
        in_use = None
        if blocking.num_rows < vocabulary:
            in_use = columns < rows_in_use(table, blocking)
            logits = jnp.where(in_use, logits, -jnp.inf)
        lse = jax.nn.logsumexp(logits, axis=1)
        in_range = (chunk_targets >= 0) & (chunk_targets < blocking.num_rows)
        local = jnp.clip(chunk_targets, 0, blocking.num_rows - 1)
        picked = jnp.take_along_axis(logits, local[:, None], axis=1)[:, 0]
        logit_sum = None
        if blocking.with_logit_sum:
            real = logits if in_use is None else jnp.where(in_use, logits, 0)
            logit_sum = jnp.sum(real, axis=1)
        chunk_losses = per_token_loss(
            lse,
            jnp.where(in_range, picked, jnp.nan),
            logit_sum,
            z_loss=z_loss,
            label_smoothing=label_smoothing,
            num_rows=blocking.num_rows,
        )
        total = total + jnp.sum(chunk_weights * chunk_losses)
        losses = lax.dynamic_update_slice_in_dim(losses, chunk_losses, start, 0)
        if with_gradients:
            d_chunk_logits = d_logits(
                logits,
                cap_slope,
                lse,
                chunk_weights * (1 + 2 * z_loss * lse),
                columns == chunk_targets[:, None],
                -(1 - label_smoothing) * chunk_weights,
                blocking,
                # Padding columns get no share of the smoothing's uniform term.
                in_use if blocking.with_logit_sum else None,
                -(label_smoothing / blocking.num_rows) * chunk_weights,
            )
            d_chunk = contract(d_chunk_logits, rows, 1, 0, blocking)
            d_hidden = lax.dynamic_update_slice_in_dim(
                d_hidden, d_chunk.astype(hidden.dtype), start, 0
            )
            d_table = d_table + contract(d_chunk_logits, chunk, 0, 0, blocking)
        return (total, losses, d_table, d_hidden), None

    accumulate = blocking.accumulate_dtype
    initial = (
        jnp.zeros((), accumulate),
        jnp.zeros(tokens, accumulate),
        jnp.zeros(table.shape, accumulate) if with_gradients else None,
        jnp.zeros_like(hidden) if with_gradients else None,
    )
    (total, losses, d_table, d_hidden), _ = lax.scan(
        step, initial, jnp.arange(num_blocks(tokens, size)), reverse=True
    )
    if d_table is not None:
        d_table = d_table.astype(table.dtype)
    return _Reduced(total, losses, d_table, d_hidden)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def weighted_sum(
    table: Array,
    hidden: Array,
    targets: Array,
    weights: Array,
    blocking: Blocking,
    z_loss: float,
    label_smoothing: float,
) -> Array:
    """`sum(weights * losses)`, the losses those of [`per_token_loss`][] (z-loss and
    label smoothing included), in the accumulation dtype, `blocking.block_size`
    tokens at a time, each chunk against the whole table (its rows past
    `blocking.num_rows` masked out); a target outside them gives a NaN.
    Differentiable with respect to `table`, `hidden` and `weights`, the first two
    computed in the forward pass."""
    controls = (z_loss, label_smoothing)
    return _reduced_pass(
        table, hidden, targets, weights, blocking, *controls, False
    ).total


def _forward(table, hidden, targets, weights, blocking, z_loss, label_smoothing):
    controls = (z_loss, label_smoothing)
    reduced = _reduced_pass(table, hidden, targets, weights, blocking, *controls, True)
    return reduced.total, (reduced.d_table, reduced.d_hidden, reduced.losses)


def _backward(blocking, z_loss, label_smoothing, residuals, d_total):
    d_table, d_hidden, losses = residuals

    def scale(gradient: Array) -> Array:
        return (d_total * gradient).astype(gradient.dtype)

    # d total / d weights[i] = losses[i]; targets are integers: no gradient.
    return scale(d_table), scale(d_hidden), None, d_total * losses


weighted_sum.defvjp(_forward, _backward)
