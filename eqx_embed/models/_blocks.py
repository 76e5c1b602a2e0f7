"""One decoder layer: attention and MLP, each behind a norm, with residual
connections in the family's layout.

```
pre-norm (Llama, Mistral, Qwen2, Qwen3,     x = x + attention(norm(x))
          Gemma, GPT-2)                     x = x + mlp(norm(x))
sandwich (Gemma 2, Gemma 3)                 x = x + norm(attention(norm(x)))
                                            x = x + norm(mlp(norm(x)))
parallel (GPT-NeoX)                         x = x + attention(norm(x)) + mlp(norm(x))
```
"""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PRNGKeyArray

from ..nn._contracts import checked
from ..nn._rope_rotate import RopeRotation
from ._attention import Attention, Window
from ._config import ACTIVATIONS, TransformerConfig
from ._linear import Linear
from ._norms import LayerNorm, RMSNorm

Norm = RMSNorm | LayerNorm


def make_norm(config: TransformerConfig, size: int | None = None) -> Norm:
    """The family's norm over `size` (default `hidden_size`), as a new (identity)
    module."""
    size = config.hidden_size if size is None else size
    dtypes = dict(
        dtype=jnp.dtype(config.activation_dtype),
        param_dtype=jnp.dtype(config.param_dtype),
    )
    if config.norm == "layer":
        return LayerNorm(size, eps=config.norm_eps, **dtypes)
    return RMSNorm(
        size,
        eps=config.norm_eps,
        unit_offset=config.norm == "rms_unit_offset",
        **dtypes,
    )


class MLP(eqx.Module):
    """The feed-forward network: `down(act(gate(x)) * up(x))` when gated (SwiGLU,
    GeGLU), `down(act(up(x)))` otherwise."""

    gate: Linear | None
    up: Linear
    down: Linear
    activation: str = eqx.field(static=True)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        gated: bool,
        activation: str,
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `hidden_size`, `intermediate_size`: the outer and inner widths.
        - `gated`: whether the activation multiplies a second projection.
        - `activation`: a key of `ACTIVATIONS` (a Hugging Face `hidden_act` name).
        - `use_bias`: biases on every projection.
        - `dtype`, `param_dtype`: compute and weight dtypes.
        - `key`: a `jax.random.PRNGKey`.
        """
        gate_key, up_key, down_key = jax.random.split(key, 3)
        common: dict[str, Any] = dict(
            use_bias=use_bias, dtype=dtype, param_dtype=param_dtype
        )
        self.gate = (
            Linear(hidden_size, intermediate_size, key=gate_key, **common)
            if gated
            else None
        )
        self.up = Linear(hidden_size, intermediate_size, key=up_key, **common)
        self.down = Linear(intermediate_size, hidden_size, key=down_key, **common)
        self.activation = activation

    @jax.named_scope("eqx_embed.MLP")
    @checked
    def __call__(
        self, x: Float[Array, "*batch hidden_size"]
    ) -> Float[Array, "*batch hidden_size"]:
        """**Arguments:**

        - `x`: the (normalised) hidden states.

        **Returns:**

        The MLP's output, of the same shape.
        """
        activation = ACTIVATIONS[self.activation]
        if self.gate is None:
            inner = activation(self.up(x))
        else:
            inner = activation(self.gate(x)) * self.up(x)
        return self.down(inner)


class DecoderBlock(eqx.Module):
    """One decoder layer (see the module's diagram). `TransformerLM` stacks them along
    a leading layer axis and scans over it."""

    attention_norm: Norm
    attention: Attention
    attention_output_norm: Norm | None
    mlp_norm: Norm
    mlp: MLP
    mlp_output_norm: Norm | None
    parallel_residual: bool = eqx.field(static=True)

    def __init__(self, config: TransformerConfig, *, key: PRNGKeyArray):
        """**Arguments:**

        - `config`: the model's [`TransformerConfig`][eqx_embed.TransformerConfig].
        - `key`: a `jax.random.PRNGKey`.
        """
        attention_key, mlp_key = jax.random.split(key)
        dtypes = dict(
            dtype=jnp.dtype(config.activation_dtype),
            param_dtype=jnp.dtype(config.param_dtype),
        )
        sandwich = config.sandwich_norms
        scalar = config.query_pre_attn_scalar or config.head_dim
        self.attention_norm = make_norm(config)
        self.attention = Attention(
            config.hidden_size,
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            scale=float(scalar) ** -0.5,
            logit_soft_cap=config.attention_logit_soft_cap,
            qkv_bias=config.attention_bias,
            output_bias=config.attention_output_bias,
            key=attention_key,
            query_norm=make_norm(config, config.head_dim) if config.qk_norm else None,
            key_norm=make_norm(config, config.head_dim) if config.qk_norm else None,
            **dtypes,
        )
        self.attention_output_norm = make_norm(config) if sandwich else None
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(
            config.hidden_size,
            config.intermediate_size,
            gated=config.gated_mlp,
            activation=config.hidden_act,
            use_bias=config.mlp_bias,
            key=mlp_key,
            **dtypes,
        )
        self.mlp_output_norm = make_norm(config) if sandwich else None
        self.parallel_residual = config.parallel_residual

    def _residual(
        self, x: jax.Array, attend: Callable[[jax.Array], tuple[jax.Array, Any]]
    ) -> tuple[jax.Array, Any]:
        """The layer around `attend(normed x) -> (attended, extra)`; returns the new
        hidden states and `extra`."""
        attended, extra = attend(self.attention_norm(x))
        if self.attention_output_norm is not None:
            attended = self.attention_output_norm(attended)
        if self.parallel_residual:
            return x + attended + self.mlp(self.mlp_norm(x)), extra
        x = x + attended
        transformed = self.mlp(self.mlp_norm(x))
        if self.mlp_output_norm is not None:
            transformed = self.mlp_output_norm(transformed)
        return x + transformed, extra

    @jax.named_scope("eqx_embed.DecoderBlock")
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

        - `x`: the hidden states of one sequence.
        - `rotation`, `window`, `segment_ids`: as for `Attention`.

        **Returns:**

        The hidden states after this layer.
        """

        def attend(normed):
            out = self.attention(
                normed, rotation=rotation, window=window, segment_ids=segment_ids
            )
            return out, None

        return self._residual(x, attend)[0]

    def prefill(
        self,
        x: Float[Array, "seq hidden_size"],
        *,
        rotation: RopeRotation | None,
        window: Window,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """As `__call__`, also returning this layer's keys and values."""

        def attend(normed):
            out, keys, values = self.attention.prefill(
                normed, rotation=rotation, window=window
            )
            return out, (keys, values)

        return self._residual(x, attend)

    def decode(
        self,
        x: Float[Array, "1 hidden_size"],
        *,
        rotation: RopeRotation | None,
        cached_keys: jax.Array,
        cached_values: jax.Array,
        cached_mask: jax.Array,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
        """One new token through the layer, attending to the cache (see
        `Attention.decode`); also returns its key and value."""

        def attend(normed):
            out, key, value = self.attention.decode(
                normed,
                rotation=rotation,
                cached_keys=cached_keys,
                cached_values=cached_values,
                cached_mask=cached_mask,
            )
            return out, (key, value)

        return self._residual(x, attend)
