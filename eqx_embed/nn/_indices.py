"""What happens to an index that falls outside its table.

Token ids, RoPE positions and loss targets all index a table. A bad index must never
come back as a valid-looking row, so every lookup in this library goes through the two
functions here and one policy:

- `"nan"` (the default): the bad index reads a row of NaNs (floating tables) or the
  dtype's minimum (integer tables). No host synchronisation, so it costs nothing under
  `jit`; the NaNs propagate into the loss, where they cannot be missed. This is what
  `flax.linen.Embed` does.
- `"error"`: raise. Concrete indices raise a `ValueError` at once; traced ones raise
  when the compiled program runs (a host callback that sees the whole batch, even under
  `jax.vmap`), with a message naming the bad index and the table size.
"""

from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Shaped

OutOfRange = Literal["nan", "error"]
"""The policy for indices outside their table: `"nan"` or `"error"` (see above)."""

OUT_OF_RANGE_POLICIES = ("nan", "error")


def check_policy(out_of_range: str) -> None:
    if out_of_range not in OUT_OF_RANGE_POLICIES:
        raise ValueError(
            f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, "
            f"got {out_of_range!r}."
        )


def valid_range(size: int, *, negative_from_end: bool) -> tuple[int, int]:
    """The half-open range `[low, size)` of valid indices."""
    return (-size if negative_from_end else 0), size


def _raise_on_bad_index(
    indices: ArrayLike, *, size: int, name: str, negative_from_end: bool
) -> np.ndarray:
    indices = np.asarray(indices)
    low, high = valid_range(size, negative_from_end=negative_from_end)
    bad = indices[(indices < low) | (indices >= high)]
    if bad.size:
        raise ValueError(
            f"{name} {int(bad.flat[0])} is out of range for a table of {size} rows "
            f"(valid: {low} <= {name} < {high}); {bad.size} bad value(s) in all."
        )
    return indices


def check_indices(
    indices: Shaped[ArrayLike, "*shape"],
    *,
    size: int,
    out_of_range: OutOfRange,
    name: str,
    negative_from_end: bool,
) -> Shaped[Array, "*shape"]:
    """Applies the `"error"` policy to `indices`; returns them unchanged otherwise.

    **Arguments:**

    - `indices`: integer indices of any shape, concrete or traced.
    - `size`: the number of rows of the table they index.
    - `out_of_range`: the policy, `"nan"` (no check) or `"error"`.
    - `name`: what the indices are, for the message (`"token id"`, `"position"`).
    - `negative_from_end`: whether `[-size, 0)` is valid and counts from the end.

    **Returns:**

    `indices` as a JAX array. In `"error"` mode, concrete indices raise `ValueError`
    here; traced ones raise when the computation runs.
    """
    if out_of_range == "nan":
        return jnp.asarray(indices)
    if not isinstance(indices, jax.core.Tracer):
        return jnp.asarray(
            _raise_on_bad_index(
                indices, size=size, name=name, negative_from_end=negative_from_end
            )
        )

    def callback(values):
        return _raise_on_bad_index(
            values, size=size, name=name, negative_from_end=negative_from_end
        )

    # The ids come back through the callback so that it cannot be dead-code
    # eliminated; "broadcast_all" hands it the whole vmapped batch in one call.
    return jax.pure_callback(
        callback,
        jax.ShapeDtypeStruct(indices.shape, indices.dtype),
        indices,
        vmap_method="broadcast_all",
    )


def gather_rows(
    table: Shaped[Array, "rows ..."],
    indices: Shaped[ArrayLike, "*shape"],
    *,
    negative_from_end: bool,
    out_sharding=None,
) -> Array:
    """`table[indices]`, with NaN (or the integer minimum) for out-of-range indices.

    With `negative_from_end=False`, negative indices are out of range too, instead of
    wrapping as `jnp.take` would make them. `out_sharding`: the result's
    `PartitionSpec`, which explicit mesh axes need for a sharded table.
    """
    if not negative_from_end:
        indices = jnp.where(jnp.asarray(indices) < 0, table.shape[0], indices)
    if jnp.issubdtype(table.dtype, jnp.inexact):
        fill = jnp.nan
    else:
        fill = jnp.iinfo(table.dtype).min
    return table.at[indices].get(
        mode="fill", fill_value=fill, out_sharding=out_sharding
    )
