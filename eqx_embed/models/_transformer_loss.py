"""The training losses of a `TransformerLM` (`model` below): its hidden states
through the fused cross-entropy of its embedding's decode table, per token of one
sequence (`model.loss`) or reduced over a batch (`model.mean_loss`)."""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import Array, ArrayLike

from ..nn._loss import kept_where
from ._transformer_forward import flat_hidden_states, flat_rows

LossControls = tuple[float, float, int | None]
"""`(z_loss, label_smoothing, ignore_index)`, as the fused losses take them."""


def unread_after_last_kept(tokens: Any, where: Array | None) -> Any:
    """`tokens` with those after the last position that `where` keeps (in each row,
    along the last axis) replaced by 0: a causal model's kept losses cannot depend
    on them, so they are never read, even out of range (padding, say), as the
    masked targets are not. Read, a bad id's NaN row would give the gradient a NaN
    (its position's zero cotangent times its NaN softmax). Compared in the ids' own
    dtype where they are not yet JAX arrays."""
    if where is None:
        return tokens
    traced = isinstance(tokens, jax.Array) or isinstance(where, Tracer)
    xp = jnp if traced else np
    kept = xp.asarray(where)
    read = xp.flip(xp.cumsum(xp.flip(kept, -1), -1), -1) > 0
    return xp.where(read, tokens, xp.zeros((), xp.asarray(tokens).dtype))


def sequence_loss(
    model: Any,
    tokens: Any,
    targets: Any,
    where: Any,
    positions: tuple[Any, Any],
    controls: LossControls,
) -> Array:
    """`model.loss`: the per-token fused loss of one sequence, `positions` its
    `(token_positions, segment_ids)`."""
    token_positions, segment_ids = positions
    z_loss, label_smoothing, ignore_index = controls
    read = unread_after_last_kept(tokens, kept_where(targets, where, ignore_index))
    hidden = model.hidden_states(
        read, token_positions=token_positions, segment_ids=segment_ids
    )
    return model.embedding.cross_entropy(
        hidden,
        targets,
        where=where,
        z_loss=z_loss,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )


def batch_mean_loss(
    model: Any,
    tokens: ArrayLike,
    targets: ArrayLike,
    per_token: tuple[Any, Any, Any, Any],
    controls: LossControls,
    chunk_size: int | None,
) -> Array:
    """`model.mean_loss`: the reduced fused loss of a `(batch, seq)` batch,
    `per_token` its `(where, weights, token_positions, segment_ids)`. A batch of
    no tokens (batch or sequence 0) gives 0 and no gradient, as one whose tokens
    are all masked out."""
    where, weights, token_positions, segment_ids = per_token
    z_loss, label_smoothing, ignore_index = controls
    tokens = unread_after_last_kept(tokens, kept_where(targets, where, ignore_index))
    if np.size(tokens):
        # In their own dtype: `flat_hidden_states` checks them before narrowing.
        hidden = flat_hidden_states(model, tokens, token_positions, segment_ids)
    else:
        # The trunk cannot run on no tokens; the loss still checks its arguments.
        one = jax.eval_shape(model.hidden_states, jnp.zeros(1, jnp.int32))
        hidden = jnp.zeros((0, one.shape[-1]), one.dtype)
    flat = functools.partial(flat_rows, size=hidden.shape[0])
    return model.embedding.mean_cross_entropy(
        hidden,
        flat(targets),
        where=flat(where),
        weights=flat(weights),
        z_loss=z_loss,
        chunk_size=chunk_size,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
    )
