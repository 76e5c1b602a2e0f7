"""The per-token fused loss on one device: each token's log-sum-exp and target logit
against a table, walked in blocks of the table's rows, without materialising the
logits.

The plain loss builds the `(tokens, vocabulary)` logits, and its gradient builds
another array of that size. Here only one `(tokens, block_size)` block of logits
exists at a time:

- forward: one pass keeps a running log-sum-exp per token (`logaddexp` of the blocks'
  log-sum-exps) and picks out the target logits. The only residual is the
  log-sum-exp, one number per token.
- backward: a second pass recomputes each block of logits, turns it into `d_logits`
  and contracts it at once with the table rows (into the hidden states' gradient,
  accumulated across blocks) and with the hidden states (into that block's rows of
  the table's gradient, written once).

That is four matmuls, one more than the plain loss. Computing the gradients during the
forward pass instead (Liger's scheme) does not save it over the vocabulary: the
softmax needs the final log-sum-exp, so the forward pass would still need two passes
over the vocabulary, and its table gradient would be right only for a cotangent that
is the same for every token (a mean or a sum), not for per-token losses weighted by
the caller. The fourth matmul is paid back by never writing or reading the two
logit-sized arrays. (For a loss reduced with weights known up front, `_loss_mean.py`
walks token chunks instead: three matmuls.)

The table's gradient is written block by block into the loop-carried buffer that
becomes the output, without reading it back (the last block first, so that the rows
the shifted last block shares with the block before are overwritten by that block),
which XLA:CPU keeps in that one buffer even for bfloat16 (though for 16-bit tables
each block's update is a pass over the whole table). What is left of the temporaries
is of order `tokens * (block_size + embedding_size)`; for bfloat16 on CPU that
includes float32 copies of the hidden states and of each block's `d_logits`, which
XLA:CPU makes for the table gradient's product.
"""

from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jaxtyping import Array

from ._loss_kernel import (
    AnyTable,
    Blocking,
    add_rows_gradient,
    block,
    block_d_logits,
    block_logit_sum,
    contract,
    float_leaves,
    is_plain_kind,
    num_blocks,
    rows_in_use,
)
from ._mesh import explicit_sharding, sharded_like, varying_like

# Each loop carries the table through an optimization barrier, so that it is not
# loop-invariant: otherwise XLA hoists the bit cast of a 16-bit table out of the
# loop, which copies the whole table.


def _lse_and_target_logit(
    table: AnyTable, hidden: Array, targets: Array, blocking: Blocking
) -> tuple[Array, Array, Array]:
    """Each token's log-sum-exp over the table's rows in use, its target's logit
    (NaN for a target outside them) and, with `blocking.with_logit_sum`, the sum of
    its logits over those rows (else zeros), in the accumulation dtype;
    differentiable with respect to `table` and `hidden` (a custom VJP: the backward
    pass recomputes the blocks)."""
    hidden = hidden.astype(blocking.compute_dtype)

    def step(carry, index):
        lse, target_logit, logit_sum, table = carry
        table = lax.optimization_barrier(table)
        this = block(table, hidden, index, blocking)
        masked = jnp.where(this.is_new, this.logits, -jnp.inf)
        lse = jnp.logaddexp(lse, jax.nn.logsumexp(masked, axis=1))
        start = this.columns[0]
        in_block = (targets >= this.first_new) & (targets < start + len(this.columns))
        local = jnp.clip(targets - start, 0, len(this.columns) - 1)
        picked = jnp.take_along_axis(this.logits, local[:, None], axis=1)[:, 0]
        target_logit = target_logit + jnp.where(in_block, picked, 0)
        if blocking.with_logit_sum:
            logit_sum = logit_sum + block_logit_sum(this)
        return (lse, target_logit, logit_sum, table), None

    dtype = blocking.accumulate_dtype
    # Laid out as the tokens are (they may be split over a mesh axis).
    zeros = varying_like(
        jnp.zeros_like(hidden[:, 0], dtype), *jax.tree.leaves(table), hidden
    )
    initial = (
        varying_like(
            jnp.full_like(hidden[:, 0], -jnp.inf, dtype),
            *jax.tree.leaves(table),
            hidden,
        ),
        zeros,
        # Carried only when summed: otherwise the loop is as without smoothing.
        zeros if blocking.with_logit_sum else None,
        table,
    )
    (lse, target_logit, logit_sum, _), _ = lax.scan(
        step,
        initial,
        jnp.arange(num_blocks(table.shape[0], blocking.block_size)),
    )
    in_range = (targets >= 0) & (targets < rows_in_use(table, blocking))
    logit_sum = zeros if logit_sum is None else logit_sum
    return lse, jnp.where(in_range, target_logit, jnp.nan), logit_sum


lse_and_target_logit = jax.custom_vjp(_lse_and_target_logit, nondiff_argnums=(3,))


def _forward(table, hidden, targets, blocking):
    outputs = lse_and_target_logit(table, hidden, targets, blocking)
    return outputs, (table, hidden, targets, outputs[0])


def _backward_pass(
    blocking, table, hidden, targets, lse, d_lse, d_target_logit, d_logit_sum
):
    plain = is_plain_kind(blocking)
    hidden_compute = hidden.astype(blocking.compute_dtype)

    def step(carry, index):
        d_hidden, d_table, table = carry
        table = lax.optimization_barrier(table)
        this = block(table, hidden_compute, index, blocking)
        d_logits = block_d_logits(
            this, targets, lse, d_lse, d_target_logit, blocking, d_logit_sum
        )
        d_hidden_block = contract(d_logits, this.rows, 1, 0, blocking)
        d_hidden = d_hidden + sharded_like(d_hidden_block, d_hidden)
        # Summed over the tokens, which may be split over a mesh axis: the rows'
        # gradient takes the table's layout.
        d_rows = contract(
            d_logits,
            hidden_compute,
            0,
            0,
            blocking,
            explicit_sharding(d_table) if plain else None,
        )
        if not plain:
            # A table kind: the gradient of its float leaves, through its rows.
            d_table = add_rows_gradient(
                table, d_table, this.columns[0], d_rows, blocking
            )
            return (d_hidden, d_table, table), None
        # Writing without reading keeps a 16-bit table's gradient in one buffer.
        d_table = lax.dynamic_update_slice_in_dim(
            d_table, d_rows.astype(table.dtype), this.columns[0], 0
        )
        return (d_hidden, d_table, table), None

    initial = (
        varying_like(
            jnp.zeros(hidden.shape, blocking.accumulate_dtype), *jax.tree.leaves(table)
        ),
        jnp.zeros_like(table)
        if plain
        else jax.tree.map(jnp.zeros_like, float_leaves(table)),
        table,
    )
    (d_hidden, d_table, _), _ = lax.scan(
        step,
        initial,
        jnp.arange(num_blocks(table.shape[0], blocking.block_size)),
        reverse=True,
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
        if any(jax.tree.leaves(in_batched[0])):  # the table, or a table kind's leaves
            in_axes = tuple(0 if batched else None for batched in in_batched)
            outputs = jax.vmap(function, in_axes)(table, *per_token)
            return outputs, _spec(outputs, (True,) * len(outputs))
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
        return tuple(outputs), _spec(outputs, per_token_outputs)

    return folded


def _spec(outputs: Any, batched: tuple[bool, ...]) -> tuple[Any, ...]:
    """The batching flag of each output, for each of its leaves (a table kind's
    gradient is a pytree)."""
    return tuple(
        jax.tree.map(partial(_constant, flag), out)
        for out, flag in zip(outputs, batched, strict=True)
    )


def _constant(value: Any, _: Any) -> Any:
    return value


def _backward(blocking, residuals, cotangents):
    backward = fold_batch_into_tokens(partial(_backward_pass, blocking))
    d_table, d_hidden = backward(*residuals, *cotangents)
    return d_table, d_hidden, None


lse_and_target_logit.defvjp(_forward, _backward)
