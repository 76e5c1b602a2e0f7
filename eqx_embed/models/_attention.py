"""Causal self-attention with grouped-query heads, an optional sliding window and an
optional soft cap on the scores."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..nn._contracts import checked
from ..nn._rope import RopeRotation
from ._linear import Linear
from ._norms import LayerNorm, RMSNorm

NO_WINDOW = jnp.iinfo(jnp.int32).max
"""The window of a layer that attends to every earlier token."""


def causal_window_mask(seq_len: int, window: Int[Array, ""]) -> jax.Array:
    """`mask[query, key]`: whether `key` is at most `window - 1` tokens before `query`
    (by sequence index, as Hugging Face masks, whatever the positions)."""
    query = jnp.arange(seq_len)[:, None]
    key = jnp.arange(seq_len)[None, :]
    return (key <= query) & (query - key < window)


class Attention(eqx.Module):
    """Multi-head causal self-attention over one sequence.

    Query heads come in `num_kv_heads` groups that share a key/value head (grouped-query
    attention; multi-head when `num_kv_heads == num_heads`), query head `h` using
    key/value head `h // (num_heads // num_kv_heads)` as Hugging Face's `repeat_kv`.
    Scores are computed and soft-maxed in float32.
    """

    query_proj: Linear
    key_proj: Linear
    value_proj: Linear
    output_proj: Linear
    query_norm: RMSNorm | LayerNorm | None
    key_norm: RMSNorm | LayerNorm | None
    num_heads: int = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    logit_soft_cap: float | None = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        *,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        logit_soft_cap: float | None,
        qkv_bias: bool,
        output_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        key: PRNGKeyArray,
        query_norm: RMSNorm | LayerNorm | None = None,
        key_norm: RMSNorm | LayerNorm | None = None,
    ):
        """**Arguments:**

        - `hidden_size`: the width of the input and output.
        - `num_heads`, `num_kv_heads`, `head_dim`: the query heads, the key/value
            heads (dividing `num_heads`) and the width of every head.
        - `scale`: what the scores `q . k` are multiplied by.
        - `logit_soft_cap`: if given, scores become `cap * tanh(scores / cap)` before
            the mask (Gemma 2).
        - `qkv_bias`, `output_bias`: biases on the query/key/value projections and on
            the output projection.
        - `dtype`, `param_dtype`: compute and weight dtypes.
        - `key`: a `jax.random.PRNGKey`.
        - `query_norm`, `key_norm`: norms over `head_dim` applied to each query and
            key head before the rotation (Qwen3, Gemma 3), or `None`.
        """
        query_key, key_proj_key, value_key, output_key = jax.random.split(key, 4)
        common: dict[str, Any] = dict(dtype=dtype, param_dtype=param_dtype)
        self.query_proj = Linear(
            hidden_size,
            num_heads * head_dim,
            use_bias=qkv_bias,
            key=query_key,
            **common,
        )
        self.key_proj = Linear(
            hidden_size,
            num_kv_heads * head_dim,
            use_bias=qkv_bias,
            key=key_proj_key,
            **common,
        )
        self.value_proj = Linear(
            hidden_size,
            num_kv_heads * head_dim,
            use_bias=qkv_bias,
            key=value_key,
            **common,
        )
        self.output_proj = Linear(
            num_heads * head_dim,
            hidden_size,
            use_bias=output_bias,
            key=output_key,
            **common,
        )
        self.query_norm = query_norm
        self.key_norm = key_norm
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.logit_soft_cap = logit_soft_cap

    @jax.named_scope("eqx_embed.Attention")
    @checked
    def __call__(
        self,
        x: Float[Array, "seq hidden_size"],
        *,
        rotation: RopeRotation | None,
        window: Int[Array, ""],
    ) -> Float[Array, "seq hidden_size"]:
        """**Arguments:**

        - `x`: the (normalised) hidden states of one sequence.
        - `rotation`: the [`RopeRotation`][eqx_embed.RopeRotation] of the tokens'
            positions, applied to queries and keys; `None` for a model whose
            positions are added to its embeddings (GPT-2).
        - `window`: how many of the most recent tokens (the current one included)
            each token attends to; `NO_WINDOW` for all of them.

        **Returns:**

        The attention output, projected back to `hidden_size`.
        """
        seq_len = x.shape[0]
        groups = self.num_heads // self.num_kv_heads
        queries = self.query_proj(x).reshape(seq_len, self.num_heads, self.head_dim)
        keys = self.key_proj(x).reshape(seq_len, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None:
            queries, keys = self.query_norm(queries), self.key_norm(keys)
        if rotation is not None:
            queries, keys = rotation(queries), rotation(keys)
        values = self.value_proj(x).reshape(seq_len, self.num_kv_heads, self.head_dim)
        queries = queries.reshape(seq_len, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum(
            "qkgd,skd->kgqs", queries, keys, preferred_element_type=jnp.float32
        )
        scores = scores * self.scale
        if self.logit_soft_cap is not None:
            scores = self.logit_soft_cap * jnp.tanh(scores / self.logit_soft_cap)
        mask = causal_window_mask(seq_len, window)
        scores = jnp.where(mask, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        attended = jnp.einsum("kgqs,skd->qkgd", weights, values)
        return self.output_proj(
            attended.reshape(seq_len, self.num_heads * self.head_dim)
        )
