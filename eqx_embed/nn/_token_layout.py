"""Token layouts that the decode and the fused loss cannot serve on a mesh.

With explicit mesh axes, every array's type says how it is split, so a layout that
would need the whole table on every device (or that the blockwise loss cannot carry)
is refused while tracing, with a `ValueError` naming the array and the mesh axis,
rather than failing deep inside XLA's sharding rules or gathering the table. Auto
axes carry no layout while tracing: there GSPMD places everything (see
`_vocab_parallel`), and nothing here applies.
"""

from collections.abc import Iterable

import jax
from jax._src import core as jax_core
from jax.sharding import AxisType
from jaxtyping import Array

from ._vocab_parallel import table_axes


def _explicit_axes(array: Array, dims: Iterable[int]) -> tuple[str, ...]:
    """The explicit mesh axes that split `array` along `dims`."""
    sharding = getattr(jax.typeof(array), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return ()
    kinds = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    spec = tuple(sharding.spec) + (None,) * (array.ndim - len(sharding.spec))
    found = []
    for dim in dims:
        entry = spec[dim]
        names = entry if isinstance(entry, tuple) else (entry,)
        found += [name for name in names if kinds.get(name) == AxisType.Explicit]
    return tuple(found)


def _vmapped_axes() -> frozenset[str]:
    """The explicit mesh axes that enclosing `jax.vmap`s map away: those splitting
    the batch of the arrays seen here one example at a time. (JAX keeps them in its
    axis environment, which has no public accessor.)"""
    return jax_core.get_axis_env().explicit_mesh_axis_names


def check_token_layout(
    table: Array, arrays: dict[str, Array], *, fused: bool, method: str
) -> None:
    """Raises a `ValueError` if `table` (a module's table) cannot serve tokens laid
    out as `arrays` (name -> array whose last axis, for hidden states, or whose only
    axis, for targets, follows the tokens) are.

    - Tokens split over a mesh axis that also splits the table's vocabulary: each
      device of that axis would need every row for its own tokens, that is the whole
      table.
    - For the fused loss (`fused=True`), a token axis split over any mesh axis: its
      blockwise loop walks the tokens whole on each device. Called per sequence
      under `jax.vmap`, the split stays on the batch axis, which it serves.
    """
    vocab_axes = set(table_axes(table)[0])
    vmapped = _vmapped_axes()
    for name, array in arrays.items():
        token_dims = range(array.ndim - 1 if name == "hidden" else array.ndim)
        token_axes = _explicit_axes(array, token_dims)
        shared = sorted(vocab_axes & (vmapped | set(token_axes)))
        if shared:
            raise ValueError(
                f"{method}: {name} is split over the mesh axis {shared[0]!r}, which "
                "also splits the table's vocabulary (its rows), so each device of "
                "that axis would need the whole table for its own tokens. Split the "
                "tokens over other mesh axes (the data or fsdp axes of "
                "eqx_embed.shard_batch) and the vocabulary over its own."
            )
        if fused and token_axes:
            raise ValueError(
                f"{method}: {name} is split over the mesh axes {token_axes} along its "
                "token axis, which the fused loss walks whole on each device. Call "
                "it per sequence under jax.vmap (the split then stays on the batch "
                "axis), or replicate the token axis with jax.reshard."
            )
