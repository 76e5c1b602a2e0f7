"""Causal self-attention with grouped-query heads, an optional sliding window and an
optional soft cap on the scores."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

from ..nn._contracts import checked
from ..nn._numerics import soft_capped
from ..nn._rope_rotate import RopeRotation
from ._linear import Linear
from ._norms import LayerNorm, RMSNorm

NO_WINDOW = jnp.iinfo(jnp.int32).max
"""The window of a layer that attends to every earlier token."""

Window = int | None | Int[Array, ""]
"""A layer's sliding window: a static `int` (or `None`, no window) when every layer
of the model shares it, so that `jax.nn.dot_product_attention` gets it as its static
`local_window_size`; a traced scalar (`NO_WINDOW` for none) when it varies by layer."""


def causal_window_mask(seq_len: int, window: int | Int[Array, ""]) -> jax.Array:
    """`mask[query, key]`: whether `key` is at most `window - 1` tokens before `query`
    (by sequence index, as Hugging Face masks, whatever the positions)."""
    query = jnp.arange(seq_len)[:, None]
    key = jnp.arange(seq_len)[None, :]
    return (key <= query) & (query - key < window)


def segment_runs(segment_ids: Int[Array, " seq"]) -> tuple[jax.Array, jax.Array]:
    """For packed sequences: the run of each token (a count of the changes of segment
    id before it, so that `[0, 0, 1, 1, 0]` is three documents) and its position in
    its run, `0, 1, ...` restarting at every change."""
    index = jnp.arange(segment_ids.shape[0])
    starts = jnp.concatenate(
        [jnp.ones((1,), bool), segment_ids[1:] != segment_ids[:-1]]
    )
    runs = jnp.cumsum(starts) - 1
    run_start = jax.lax.cummax(jnp.where(starts, index, 0))
    return runs, index - run_start


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

    def _project(
        self, x: Float[Array, "seq hidden_size"], rotation: RopeRotation | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries `(seq, heads, head_dim)`, keys and values `(seq, kv_heads,
        head_dim)`; queries and keys normalised per head (Qwen3, Gemma 3) and rotated
        (unless `rotation` is `None`: positions added to the embeddings, GPT-2)."""
        seq_len = x.shape[0]
        queries = self.query_proj(x).reshape(seq_len, self.num_heads, self.head_dim)
        keys = self.key_proj(x).reshape(seq_len, self.num_kv_heads, self.head_dim)
        if self.query_norm is not None and self.key_norm is not None:
            queries, keys = self.query_norm(queries), self.key_norm(keys)
        if rotation is not None:
            queries, keys = rotation(queries), rotation(keys)
        values = self.value_proj(x).reshape(seq_len, self.num_kv_heads, self.head_dim)
        return queries, keys, values

    def _output(self, attended: Float[Array, "seq *heads head_dim"]) -> jax.Array:
        seq_len = attended.shape[0]
        return self.output_proj(
            attended.reshape(seq_len, self.num_heads * self.head_dim)
        )

    def _self_attend(
        self,
        x: Float[Array, "seq hidden_size"],
        rotation: RopeRotation | None,
        window: Window,
        segment_ids: Int[Array, " seq"] | None,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The attention output and the sequence's rotated keys and values."""
        seq_len = x.shape[0]
        queries, keys, values = self._project(x, rotation)
        # A position's non-finite value (the NaN row of a bad id) would reach every
        # earlier query through its zero attention weight (0 * NaN is NaN). Zeroed
        # for the products, it stays in its own and later positions: their scores
        # against its key, and its own residual, are NaN.
        finite_values = jnp.where(jnp.isfinite(values), values, 0)
        segment_mask = (
            None
            if segment_ids is None
            else segment_ids[:, None] == segment_ids[None, :]
        )
        if self.logit_soft_cap is None and not isinstance(window, jax.Array):
            # Everything static: jax.nn.dot_product_attention gets the causal mask
            # and window as flags (cuDNN's fused kernel on GPU), only segments as data.
            attended = jax.nn.dot_product_attention(
                queries,
                keys,
                finite_values,
                mask=segment_mask,
                scale=self.scale,
                is_causal=True,
                local_window_size=None if window is None else (window - 1, 0),
            )
            return self._output(attended), keys, values
        if window is None:
            window = NO_WINDOW
        mask = causal_window_mask(seq_len, window)
        if segment_mask is not None:
            mask = mask & segment_mask
        if self.logit_soft_cap is None:
            attended = jax.nn.dot_product_attention(
                queries, keys, finite_values, mask=mask, scale=self.scale
            )
            return self._output(attended), keys, values
        # The soft cap goes between the product and the mask, which
        # jax.nn.dot_product_attention cannot express.
        groups = self.num_heads // self.num_kv_heads
        grouped = queries.reshape(seq_len, self.num_kv_heads, groups, self.head_dim)
        scores = jnp.einsum(
            "qkgd,skd->kgqs", grouped, keys, preferred_element_type=jnp.float32
        )
        scores = soft_capped(scores * self.scale, self.logit_soft_cap)
        scores = jnp.where(mask, scores, -jnp.inf)
        weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
        attended = jnp.einsum("kgqs,skd->qkgd", weights, finite_values)
        return self._output(attended), keys, values

    @jax.named_scope("eqx_embed.Attention")
    @checked
    def __call__(
        self,
        x: Float[Array, "seq hidden_size"],
        *,
        rotation: RopeRotation | None,
        window: Window,
        segment_ids: Int[Array, " seq"] | None = None,
    ) -> Float[Array, "seq hidden_size"]:
        """**Arguments:**

        - `x`: the (normalised) hidden states of one sequence.
        - `rotation`: the [`RopeRotation`][eqx_embed.RopeRotation] of the tokens'
            positions, applied to queries and keys; `None` for a model whose
            positions are added to its embeddings (GPT-2).
        - `window`: how many of the most recent tokens (the current one included)
            each token attends to: an `int`, `None` or `NO_WINDOW` for all of them,
            or a traced scalar.
        - `segment_ids`: if given, a token attends only to tokens with its id
            (packed sequences).

        **Returns:**

        The attention output, projected back to `hidden_size`.
        """
        return self._self_attend(x, rotation, window, segment_ids)[0]

    @jax.named_scope("eqx_embed.Attention.prefill")
    def prefill(
        self,
        x: Float[Array, "seq hidden_size"],
        *,
        rotation: RopeRotation | None,
        window: Window,
    ) -> tuple[Float[Array, "seq hidden_size"], jax.Array, jax.Array]:
        """As `__call__`, also returning the rotated keys and values
        `(seq, kv_heads, head_dim)` for a cache."""
        return self._self_attend(x, rotation, window, None)

    @jax.named_scope("eqx_embed.Attention.decode")
    def decode(
        self,
        x: Float[Array, "1 hidden_size"],
        *,
        rotation: RopeRotation | None,
        cached_keys: Float[Array, "slots kv_heads head_dim"],
        cached_values: Float[Array, "slots kv_heads head_dim"],
        cached_mask: Bool[Array, " slots"],
    ) -> tuple[Float[Array, "1 hidden_size"], jax.Array, jax.Array]:
        """One new token attending to the cached ones and to itself.

        **Arguments:**

        - `x`: the (normalised) hidden state of the new token.
        - `rotation`: the rotation of its position.
        - `cached_keys`, `cached_values`: this layer's cache.
        - `cached_mask`: which cached slots the token attends to (filled, and
            inside the layer's window).

        **Returns:**

        The attention output and the token's rotated key and value
        `(1, kv_heads, head_dim)`, for the caller to write into the cache. The new
        key's score is computed beside the cached ones rather than after writing it
        into the cache, so that the cache is never copied.
        """
        queries, key, value = self._project(x, rotation)
        groups = self.num_heads // self.num_kv_heads
        grouped = queries.reshape(self.num_kv_heads, groups, self.head_dim)
        cached_scores = jnp.einsum(
            "kgd,skd->kgs", grouped, cached_keys, preferred_element_type=jnp.float32
        )
        own_scores = jnp.einsum(
            "kgd,kd->kg", grouped, key[0], preferred_element_type=jnp.float32
        )
        scores = jnp.concatenate([cached_scores, own_scores[..., None]], axis=-1)
        scores = soft_capped(scores * self.scale, self.logit_soft_cap)
        mask = jnp.concatenate([cached_mask, jnp.ones((1,), bool)])
        weights = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
        weights = weights.astype(cached_values.dtype)
        attended = (
            jnp.einsum("kgs,skd->kgd", weights[..., :-1], cached_values)
            + weights[..., -1:] * value[0][:, None, :]
        )
        return self._output(attended[None]), key, value
