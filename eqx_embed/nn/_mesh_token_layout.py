"""Token layouts that the decode and the fused loss cannot serve on a mesh.

With explicit mesh axes, every array's type says how it is split, so a layout that
would need the whole table on every device is refused while tracing, with a
`ValueError` naming the array and the mesh axis, rather than failing deep inside
XLA's sharding rules or gathering the table. Auto axes carry no layout while
tracing: there GSPMD places everything (see `_mesh`), and nothing here
applies.
"""

from jaxtyping import Array

from ._mesh import split_axes, table_axes, vmapped_mesh_axes


def check_token_layout(table: Array, arrays: dict[str, Array], *, method: str) -> None:
    """Raises a `ValueError` if `table` (a module's table) cannot serve tokens laid
    out as `arrays` (name -> array whose last axis, for hidden states, or whose only
    axis, for targets, follows the tokens) are.

    - Tokens split over a mesh axis that also splits the table's vocabulary: each
      device of that axis would need every row for its own tokens, that is the whole
      table.

    Tokens split over other axes are served: the fused losses then walk each
    device's own tokens (see `_vocab_parallel_loss`).
    """
    vocab_axes = set(table_axes(table)[0])
    vmapped = vmapped_mesh_axes()
    for name, array in arrays.items():
        token_dims = range(array.ndim - 1 if name == "hidden" else array.ndim)
        token_axes = {axis for dim in token_dims for axis in split_axes(array, dim)}
        shared = sorted(vocab_axes & (vmapped | token_axes))
        if shared:
            raise ValueError(
                f"{method}: {name} is split over the mesh axis {shared[0]!r}, which "
                "also splits the table's vocabulary (its rows), so each device of "
                "that axis would need the whole table for its own tokens. Split the "
                "tokens over other mesh axes (the data or fsdp axes of "
                "eqx_embed.shard_batch) and the vocabulary over its own."
            )
