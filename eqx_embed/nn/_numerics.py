"""Numerical conventions shared by every module: which dtypes accumulate in float32,
the default float dtype, and the float32-accumulating product of a vector with every
row of a table."""

import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float


def is_low_precision(dtype: DTypeLike) -> bool:
    """Whether `dtype` is a float narrower than float32 (bfloat16, float16, ...)."""
    return jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def accumulation_dtype(dtype: DTypeLike) -> jnp.dtype:
    """The dtype that sums and products of `dtype` values are carried out in: float32
    for low-precision floats, `dtype` itself otherwise."""
    return jnp.dtype(jnp.float32 if is_low_precision(dtype) else dtype)


def default_float_dtype() -> jnp.dtype:
    """float64 when JAX runs in 64-bit mode (`jax_enable_x64`), float32 otherwise, as
    `jax.numpy` picks for a Python float."""
    return jnp.dtype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)


def dot_with_rows(
    rows: Float[Array, "num_rows width"],
    x: Float[Array, "*batch width"],
    *,
    dtype: DTypeLike | None,
    soft_cap: float | None = None,
) -> Float[Array, "*batch num_rows"]:
    """`x @ rows.T`: the dot product of `x` with every row of `rows`, optionally
    soft-capped (`soft_cap * tanh(product / soft_cap)`), in the compute dtype `dtype`.

    Both operands are cast to the compute dtype (`None`: their promoted dtype); a
    low-precision product accumulates in float32 and is soft-capped there, then cast
    once at the end.
    """
    dtype = jnp.result_type(rows, x) if dtype is None else jnp.dtype(dtype)
    product = jnp.matmul(
        x.astype(dtype),
        rows.astype(dtype).T,
        preferred_element_type=accumulation_dtype(dtype),
    )
    if soft_cap is not None:
        product = soft_cap * jnp.tanh(product / soft_cap)
    return product.astype(dtype)
