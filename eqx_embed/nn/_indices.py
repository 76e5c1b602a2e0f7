"""What happens to an index that falls outside its table.

Token ids, RoPE positions and loss targets all index a table. A bad index must never
come back as a valid-looking row, so every lookup in this library goes through
`check_indices` and one policy:

- `"nan"` (the default): the bad index reads a row of NaNs (floating tables) or the
  dtype's minimum (integer tables). No host synchronisation, so it costs nothing under
  `jit`; the NaNs propagate into the loss, where they cannot be missed. This is what
  `flax.linen.Embed` does.
- `"error"`: raise, with a message naming the argument, a bad index and the table size.
  Indices known when the call is made (Python ints and sequences, NumPy arrays,
  concrete JAX arrays) raise `ValueError` at once. Traced ones (under `jit` or
  `jax.vmap`) raise when the program runs, through `equinox.branched_error_if`, so
  Equinox's `EQX_ON_ERROR` applies: `equinox.EquinoxRuntimeError` (a `RuntimeError`)
  under `equinox.filter_jit` and under `jax.vmap` outside `jit`,
  `jax.errors.JaxRuntimeError` (also a `RuntimeError`, its text containing the message)
  under a bare `jax.jit`. Catch `(ValueError, RuntimeError)` to cover both. With
  `EQX_ON_ERROR=nan` or `off` the bad index reads NaNs, as with `"nan"`. On a device
  mesh set with `jax.set_mesh`, every device raises (see `_error_if_any_bad`).

The range is checked in the index's own dtype, before any cast: an int64 id of
`2**32 + 5` (NumPy, or JAX with `jax_enable_x64`) is out of range, not row 5, and a
uint8 or uint32 id past the table is out of range, never wrapped. Every integer dtype
and Python sequences of ints are accepted. Integers that index no table (segment
ids, a batch on its way to a mesh) go through `checked_integers`:
the same check in their own dtype, against a range of their own.
"""

import dataclasses
from collections.abc import Sequence
from typing import Literal, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.custom_batching import custom_vmap
from jax.sharding import PartitionSpec
from jaxtyping import Array, ArrayLike, Bool, Int, Integer, Shaped

from ._mesh import vmapped_mesh_axes

OutOfRange = Literal["nan", "error"]
"""The policy for indices outside their table: `"nan"` or `"error"` (see above)."""

OUT_OF_RANGE_POLICIES = ("nan", "error")

IntegerSequence = Sequence[int | np.integer]
"""A Python sequence of ints: accepted wherever an integer index array is."""


def check_policy(out_of_range: str) -> None:
    if out_of_range not in OUT_OF_RANGE_POLICIES:
        raise ValueError(
            f"out_of_range must be one of {OUT_OF_RANGE_POLICIES}, "
            f"got {out_of_range!r}."
        )


def valid_range(size: int, *, negative_from_end: bool) -> tuple[int, int]:
    """The half-open range `[low, size)` of valid indices."""
    return (-size if negative_from_end else 0), size


def _out_of_range_message(name: str, value: int, size: int, low: int) -> str:
    return (
        f"{name} {value} is out of range for a table of {size} rows "
        f"(valid: {low} <= {name} < {size})"
    )


@dataclasses.dataclass(frozen=True)
class _MessageForValue:
    """The messages of `equinox.branched_error_if`, one per bad value: it raises
    `messages[index]`, and the index passed is the bad value itself (the largest one,
    across a `vmap`ped batch too), so the message can name it. Equinox only indexes
    it, so it stands for the `Sequence[str]` that Equinox's signature names."""

    name: str
    size: int
    low: int

    def __getitem__(self, value: int) -> str:
        return _out_of_range_message(self.name, value, self.size, self.low) + "."


@dataclasses.dataclass(frozen=True)
class _BoundsMessage:
    """The messages of `error_if_outside`, as `_MessageForValue`'s: `template` with
    the bad value for `{value}`. `size`: what a bad value becomes where Equinox lets
    it through (`EQX_ON_ERROR=nan`)."""

    template: str
    size: int

    def __getitem__(self, value: int) -> str:
        return self.template.format(value=value)


def error_if_outside(
    values: Int[Array, "*shape"], *, low: int, high: int, message: str
) -> Int[Array, "*shape"]:
    """Traced integer `values`, checked to lie in `[low, high]` when the computation
    runs, by the `"error"` policy's mechanism (see the module's docstring for the
    exception): `message`, its `{value}` the largest bad value, where one is not."""
    outside = (values < low) | (values > high)
    smallest = jnp.iinfo(values.dtype).min
    largest_bad = jnp.max(jnp.where(outside, values, smallest), initial=smallest)
    return _error_if_any_bad(
        values, outside, largest_bad, _BoundsMessage(message, high + 1)
    )


def _host_integers(indices, plural: str) -> np.ndarray:
    """`indices` (a Python int or sequence, a NumPy array or a concrete JAX array) as
    a NumPy integer array in their own dtype; Python ints past int64 stay exact, as
    objects. `plural` names them in the message if they are not integers."""
    try:
        array = np.asarray(indices)
    except OverflowError:
        array = np.asarray(indices, dtype=object)
    if array.size == 0 and not isinstance(indices, np.ndarray | jax.Array):
        return array.astype(np.int32)  # `[]`, which NumPy makes float64
    is_python_int = np.vectorize(
        lambda x: isinstance(x, int | np.integer) and not isinstance(x, bool),
        otypes=[bool],
    )
    if array.dtype.kind in "iu" or (
        array.dtype == object and array.size and is_python_int(array).all()
    ):
        return array
    raise ValueError(
        f"{plural} must be integers, got {array.dtype} values of shape {array.shape}."
    )


def _outside(indices, low: int, high: int, xp):
    """`(indices < low) | (indices >= high)`, compared in the indices' own dtype:
    a bound the dtype cannot hold excludes nothing (and would not convert)."""
    outside = xp.zeros(indices.shape, bool)
    if indices.dtype == object:
        return (indices < low) | (indices >= high)
    info = xp.iinfo(indices.dtype)
    if low > info.min:
        outside = outside | (indices < low)
    if high <= info.max:
        outside = outside | (indices >= high)
    return outside


def _normalise(indices, outside, where, size: int, xp):
    """The valid indices counted from 0 (negative ones from the end), as int32; `size`
    (one past the table, which reads NaN) for the bad ones; 0 where `where` is False."""
    dtype = np.int32 if size < np.iinfo(np.int32).max else np.int64
    # Bad values are replaced before the cast, so that none wraps onto a valid one.
    safe = xp.where(outside, 0, indices).astype(dtype)
    safe = xp.where(safe < 0, safe + size, safe)
    if where is not None:
        safe = xp.where(where, safe, 0)
        outside = outside & where
    return xp.where(outside, size, safe), outside


def check_indices(
    indices: Integer[ArrayLike, "*shape"] | IntegerSequence,
    *,
    size: int,
    out_of_range: OutOfRange,
    name: str,
    negative_from_end: bool,
    where: Bool[ArrayLike, "*shape"] | None = None,
) -> Int[Array, "*shape"]:
    """Checks `indices` against a table of `size` rows, in their own dtype, and
    applies the policy.

    **Arguments:**

    - `indices`: integer indices of any shape and integer dtype, concrete or traced, or
        a Python int or sequence of ints.
    - `size`: the number of rows of the table they index.
    - `out_of_range`: the policy, `"nan"` or `"error"`.
    - `name`: what the indices are, for the message (`"token id"`, `"position"`).
    - `negative_from_end`: whether `[-size, 0)` is valid and counts from the end.
    - `where`: optional, where `False` the index is ignored (never an error) and comes
        back as 0.

    **Returns:**

    The indices as int32 in `[0, size]`: valid ones counted from 0, and `size` (one
    past the table, so that `gather_rows` reads NaN there) for bad ones. In `"error"`
    mode, indices known now raise `ValueError` here; traced ones raise when the
    computation runs (see the module's docstring for the exception).
    """
    low, high = valid_range(size, negative_from_end=negative_from_end)
    traced = isinstance(indices, Tracer) or isinstance(where, Tracer)
    if not traced:
        host = _host_integers(indices, f"{name}s")
        mask = None if where is None else np.asarray(where, dtype=bool)
        safe, outside = _normalise(host, _outside(host, low, high, np), mask, size, np)
        if out_of_range == "error" and outside.any():
            raise ValueError(
                _out_of_range_message(name, int(host[outside].flat[0]), size, low)
                + f"; {int(outside.sum())} bad value(s) in all."
            )
        return jnp.asarray(safe)
    indices = jnp.asarray(indices)
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"{name}s must be integers, got dtype {indices.dtype}.")
    outside = _outside(indices, low, high, jnp)
    safe, outside = _normalise(indices, outside, where, size, jnp)
    if out_of_range == "error":
        smallest = jnp.iinfo(indices.dtype).min
        largest_bad = jnp.max(jnp.where(outside, indices, smallest), initial=smallest)
        safe = _error_if_any_bad(
            safe, outside, largest_bad, _MessageForValue(name, size, low)
        )
    return safe


def checked_integers(
    values: Integer[ArrayLike, "*shape"] | IntegerSequence,
    *,
    name: str,
    low: int | None = None,
    high: int | None = None,
) -> Integer[np.ndarray, "*shape"] | Integer[Array, "*shape"]:
    """Integers that are not indices into a table (lengths, segment ids, a batch's
    ids on their way to a device), checked where they are known now, in their own
    dtype, as `check_indices` checks indices: never narrowed first.

    **Arguments:**

    - `values`: integers of any dtype, concrete or traced, or a Python int or
        sequence of ints.
    - `name`: the argument, for the message.
    - `low`, `high`: the valid range, `[low, high)`. Each defaults to the bound of
        the dtype JAX holds the values in (int32 without `jax_enable_x64`), so that
        none can wrap on its way to a device.

    **Returns:**

    Values known now as a NumPy array in that dtype; traced values as they are.

    **Raises:**

    - `ValueError`, naming `name`, the range and a bad value: a value known now
        outside the range, or values that are not integers.
    """
    if isinstance(values, Tracer):
        if not jnp.issubdtype(values.dtype, jnp.integer):
            raise ValueError(f"{name} must be integers, got dtype {values.dtype}.")
        return values
    host = _host_integers(values, name)
    dtype = jax.dtypes.canonicalize_dtype(
        np.int64 if host.dtype == object else host.dtype
    )
    info = np.iinfo(dtype)
    low = info.min if low is None else low
    high = info.max + 1 if high is None else high
    outside = _outside(host, low, high, np)
    if outside.any():
        raise ValueError(
            f"{name} must be in [{low}, {high}) (as {dtype}, the dtype JAX holds "
            f"them in), got {int(host[outside].flat[0])}; {int(outside.sum())} "
            "bad value(s) in all."
        )
    return host.astype(dtype)


def _error_if_any_bad(
    safe, outside, largest_bad, messages: _MessageForValue | _BoundsMessage
):
    """`equinox.branched_error_if(safe, outside.any(), largest_bad, messages)`: as
    Equinox does it on one device, and on every device of the mesh set with
    `jax.set_mesh` (`_error_on_every_device`)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        # One device, or inside a `shard_map` (whose callbacks already run per
        # device).
        return eqx.branched_error_if(
            safe, outside.any(), largest_bad, cast(Sequence[str], messages)
        )
    return _error_on_every_device(safe, outside, largest_bad, messages)


def _error_on_every_device(
    safe, outside, largest_bad, messages: _MessageForValue | _BoundsMessage
):
    """The `"error"` policy on a mesh.

    Equinox's error branch runs its callback on one device and broadcasts the result:
    the raising device never joins that collective, and the others wait at it until
    XLA's rendezvous gives up (40 s on CPU) and aborts the process. So the predicate
    and the bad value are first reduced over the whole batch, vmapped axes and mesh
    axes alike (one all-reduce of two scalars, after which every device holds the same
    ones), and the error is raised inside a `jax.shard_map` over every mesh axis, where
    each device runs its own callback: all take the same branch and raise, and none
    waits for another. Only the `"error"` policy pays for this.

    A callback needs every mesh axis manual, but under `jax.vmap` over an array split
    on an explicit mesh axis, `shard_map` leaves that axis out. So the `shard_map` is
    built in a `custom_vmap` rule: JAX runs batching rules outside the `vmap`, where
    the axis is the mesh's again, and the rule reduces the batch first.
    """

    def raise_on_every_device(any_bad, largest_bad):
        # False, or True where `EQX_ON_ERROR=nan` replaces the raise.
        return eqx.branched_error_if(
            jnp.array(False), any_bad, largest_bad, cast(Sequence[str], messages)
        )

    @custom_vmap
    def poisoned(any_bad, largest_bad):
        if vmapped_mesh_axes():
            # Traced inside such a `vmap`, this is used only where the indices do not
            # vary over it (else the rule below replaces it), and no `shard_map` over
            # every axis can be built here: Equinox's error, on one device, as
            # without this function.
            return raise_on_every_device(any_bad, largest_bad)
        return jax.shard_map(
            raise_on_every_device,
            mesh=jax.sharding.get_abstract_mesh(),
            in_specs=(PartitionSpec(), PartitionSpec()),
            out_specs=PartitionSpec(),
        )(any_bad, largest_bad)

    @poisoned.def_vmap
    def reduce_the_batch_first(axis_size, in_batched, any_bad, largest_bad):
        del axis_size
        if in_batched[0]:
            any_bad = jnp.any(any_bad, axis=0)
        if in_batched[1]:
            largest_bad = jnp.max(largest_bad, axis=0)
        return poisoned(any_bad, largest_bad), False

    # The data dependency keeps the check: a result nobody used would be dropped.
    return jnp.where(poisoned(outside.any(), largest_bad), messages.size, safe)


def gather_rows(
    table: Shaped[ArrayLike, "rows ..."],
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
    # A NumPy table (equinox's and flax's embeddings take one) has no `.at`.
    table = jnp.asarray(table)
    if not negative_from_end:
        indices = jnp.where(jnp.asarray(indices) < 0, table.shape[0], indices)
    if jnp.issubdtype(table.dtype, jnp.inexact):
        fill = jnp.nan
    else:
        fill = jnp.iinfo(table.dtype).min
    return table.at[indices].get(
        mode="fill", fill_value=fill, out_sharding=out_sharding
    )
