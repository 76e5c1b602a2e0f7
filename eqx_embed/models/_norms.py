"""The normalisations of the decoder blocks, computed in float32 whatever the
activation dtype, and cast once at the end."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ..nn._contracts import checked


class RMSNorm(eqx.Module):
    """Root-mean-square normalisation with a learned scale, as Llama's; with
    `unit_offset=True`, the scale is stored as `scale - 1` (Gemma's `1 + weight`)."""

    weight: Float[Array, " size"]
    eps: float = eqx.field(static=True)
    unit_offset: bool = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        size: int,
        *,
        eps: float,
        unit_offset: bool = False,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
    ):
        """**Arguments:**

        - `size`: the width normalised.
        - `eps`: added to the mean square.
        - `unit_offset`: whether the weight is stored as `scale - 1`.
        - `dtype`: the dtype of the output.
        - `param_dtype`: the dtype of the weight, which starts as the identity.
        """
        fill = 0.0 if unit_offset else 1.0
        self.weight = jnp.full((size,), fill, dtype=param_dtype)
        self.eps = eps
        self.unit_offset = unit_offset
        self.dtype = dtype

    @jax.named_scope("eqx_embed.RMSNorm")
    @checked
    def __call__(self, x: Float[Array, "*batch size"]) -> Float[Array, "*batch size"]:
        """**Arguments:**

        - `x`: activations whose last axis is normalised.

        **Returns:**

        The normalised, scaled activations, in `dtype`.
        """
        x = x.astype(jnp.float32)
        normalised = x * jax.lax.rsqrt(
            jnp.mean(x * x, axis=-1, keepdims=True) + self.eps
        )
        scale = self.weight.astype(jnp.float32)
        if self.unit_offset:
            scale = 1.0 + scale
        return (normalised * scale).astype(self.dtype)


class LayerNorm(eqx.Module):
    """Layer normalisation with a learned scale and bias, as GPT-NeoX's."""

    weight: Float[Array, " size"]
    bias: Float[Array, " size"]
    eps: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self, size: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype
    ):
        """**Arguments:**

        - `size`: the width normalised.
        - `eps`: added to the variance.
        - `dtype`: the dtype of the output.
        - `param_dtype`: the dtype of the weight (starting at one) and bias (zero).
        """
        self.weight = jnp.ones((size,), dtype=param_dtype)
        self.bias = jnp.zeros((size,), dtype=param_dtype)
        self.eps = eps
        self.dtype = dtype

    @jax.named_scope("eqx_embed.LayerNorm")
    @checked
    def __call__(self, x: Float[Array, "*batch size"]) -> Float[Array, "*batch size"]:
        """**Arguments:**

        - `x`: activations whose last axis is normalised.

        **Returns:**

        The normalised, scaled and shifted activations, in `dtype`.
        """
        x = x.astype(jnp.float32)
        centred = x - jnp.mean(x, axis=-1, keepdims=True)
        variance = jnp.mean(centred * centred, axis=-1, keepdims=True)
        normalised = centred * jax.lax.rsqrt(variance + self.eps)
        output = normalised * self.weight.astype(jnp.float32) + self.bias.astype(
            jnp.float32
        )
        return output.astype(self.dtype)
