"""Numerical conventions shared by every module: which dtypes accumulate in float32,
the default float dtype, the soft cap (its one definition in the package), and the
float32-accumulating product of a vector with every row of a table."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, DTypeLike, Float

from ._contracts import check_positive


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
    return jnp.dtype(jnp.float64 if jax.config.read("jax_enable_x64") else jnp.float32)


def soft_capped_and_slope(x: Array, cap: float | None) -> tuple[Array, Array | None]:
    """Gemma's soft cap, `cap * tanh(x / cap)`, and its slope with respect to `x`,
    `1 - tanh(x / cap)**2`; `(x, None)` when `cap` is None. Both in `x`'s dtype."""
    if cap is None:
        return x, None
    squashed = jnp.tanh(x / cap)
    return cap * squashed, 1 - squashed**2


def check_soft_cap(name: str, cap: Any) -> None:
    """Raises a `ValueError` naming `name` unless `cap` is a positive number that is
    finite in float32, the dtype the capped logits and scores are computed in (a
    Python float such as `1e39` is finite, its float32 is not)."""
    check_positive(name, cap)
    largest = float(np.finfo(np.float32).max)
    if float(cap) > largest:
        raise ValueError(
            f"{name} must be finite in float32 (at most {largest:.4g}), got {cap!r}."
        )


def soft_capped(x: Array, cap: float | None) -> Array:
    """`cap * tanh(x / cap)` (`x` itself when `cap` is None): logits or attention
    scores squashed into `(-cap, cap)`, nearly unchanged where they are small."""
    return soft_capped_and_slope(x, cap)[0]


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
    return soft_capped(product, soft_cap).astype(dtype)
