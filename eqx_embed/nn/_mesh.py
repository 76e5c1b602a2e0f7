"""Tables sharded over a device mesh: reading their layout, for the mesh layer of
the core (the vocabulary-parallel fused loss itself is `_loss_vocab_parallel.py`).

This is a layer on top of the one-device modules: each asks `on_explicit_mesh` once,
at the top of a call, and only where explicit mesh axes are involved (or a table is
padded for a mesh) does its mesh path use what is here. Everything is read through
public JAX: array types, the abstract mesh and `jax.shard_map`.

With a mesh set (`jax.set_mesh`) whose axes are explicit (the default of
`jax.make_mesh`), every array's type carries its `PartitionSpec`, so a module can see,
while tracing, how its table is laid out, and nothing needs to be configured:

- the lookup is a gather whose result keeps the table's embedding-axis sharding; a
  table split over its vocabulary compiles to a masked local gather and one
  all-reduce of the rows (never a gather of the table);
- the decode is a matmul whose logits come out split over the vocabulary as the
  table is;
- the fused loss is the hard part: its blockwise loop slices rows of the table, which
  GSPMD can only serve by gathering the whole table on every device. So when the
  table's vocabulary axis is split, the loss runs as Megatron-LM's
  `vocab_parallel_cross_entropy` under `jax.shard_map` (`_loss_vocab_parallel.py`):
  each device walks the blocks of its own rows, and collectives of per-token values
  over the vocabulary axis combine the shards.

With auto axes, arrays carry no layout while tracing, and GSPMD places everything:
the values are the same, but the fused loss's blockwise walk would gather the table.
A table placed by `shard_model` records its vocabulary's auto axes
(`Embedding.vocab_axes`), which the loss makes explicit around its walk
([`on_auto_vocab_axes`][]); for others, the documented way out ("Scaling out"
guide) is to make the axes explicit around the loss with
`jax.sharding.explicit_axes`, stating its arguments' layout.
"""

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jaxtyping import Array, ArrayLike

AxisNames = tuple[str, ...]


def _axes(entry) -> AxisNames:
    """One entry of a `PartitionSpec` as a tuple of mesh axis names."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def on_explicit_mesh(*arrays: ArrayLike) -> bool:
    """Whether explicit mesh axes are involved: the mesh set with `jax.set_mesh` has
    some, or one of `arrays` is laid out on a mesh that has.

    The modules ask this once, at the top of a call, to choose between their
    one-device path (as equinox's, no mesh helper on it) and their mesh path. It reads
    types only: free while tracing.
    """
    meshes = [jax.sharding.get_abstract_mesh()]
    meshes += [getattr(jax.typeof(array).sharding, "mesh", None) for array in arrays]
    return any(
        mesh is not None and AxisType.Explicit in mesh.axis_types for mesh in meshes
    )


def split_axes(array: Array, dim: int) -> AxisNames:
    """The explicit mesh axes that split `array` along `dim`: `()` without a mesh,
    with auto axes or where that dimension is whole."""
    sharding = getattr(jax.typeof(array), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if sharding is None or mesh is None or mesh.empty:
        return ()
    spec = tuple(sharding.spec) + (None,) * (array.ndim - len(sharding.spec))
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    }
    return tuple(name for name in _axes(spec[dim]) if name in explicit)


def table_axes(table: Array) -> tuple[AxisNames, AxisNames]:
    """The explicit mesh axes that split `table`'s vocabulary (rows) and embedding
    (columns) axes: `((), ())` without a mesh, with auto axes or for a replicated
    table."""
    return split_axes(table, 0), split_axes(table, 1)


def row_sharding(table: Array) -> NamedSharding | None:
    """The `out_sharding` of one row gathered from `table`: whole (its batch of rows
    is split as the token ids are, which may use the table's embedding axes too, as
    under FSDP), or `None` where the mesh has no explicit axes to resolve."""
    sharding = explicit_sharding(table)
    return None if sharding is None else sharding.update(spec=PartitionSpec(None))


def varying_like(x: Array, *references: Array) -> Array:
    """`x`, made to vary over the manual mesh axes that `references` vary over:
    inside `jax.shard_map`, a loop's initial carry must have the type of what the loop
    computes from the shards. A no-op elsewhere (where nothing varies), which asks
    only the mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not mesh.manual_axes:
        return x
    varying = set().union(*(jax.typeof(r).mat.varying for r in references))
    missing = tuple(sorted(varying - jax.typeof(x).mat.varying))
    return lax.pcast(x, missing, to="varying") if missing else x


def explicit_sharding(reference: Array) -> NamedSharding | None:
    """`reference`'s layout where its mesh has explicit axes (an `out_sharding` for
    results that must match it), else `None`."""
    sharding = getattr(jax.typeof(reference), "sharding", None)
    if sharding is None or AxisType.Explicit not in sharding.mesh.axis_types:
        return None
    return sharding


def sharded_like(x: Array, reference: Array) -> Array:
    """`x`, resharded to `reference`'s explicit layout (same rank), so that it can be
    added to `reference`. A no-op without explicit mesh axes."""
    sharding = explicit_sharding(reference)
    return x if sharding is None else jax.sharding.reshard(x, sharding)


def vmapped_mesh_axes() -> frozenset[str]:
    """The explicit mesh axes that enclosing `jax.vmap`s map away: those splitting
    the batch of the arrays seen here one example at a time.

    JAX keeps them in its axis environment, which has no public accessor, and the
    type of an example drops its batch axis with its sharding. But `jax.shard_map`
    left to choose its manual axes takes every mesh axis that is not vmapped away:
    a shard_map of nothing, traced abstractly, says which axes those are. Inside a
    `shard_map` (manual axes) there is nothing to ask: `frozenset()`.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes or AxisType.Explicit not in mesh.axis_types:
        return frozenset()
    manual: list[frozenset[str]] = []

    def record_manual_axes():
        manual.append(frozenset(jax.sharding.get_abstract_mesh().manual_axes))
        return jnp.zeros(())

    jax.eval_shape(
        jax.shard_map(
            record_manual_axes, mesh=mesh, in_specs=(), out_specs=PartitionSpec()
        )
    )
    return frozenset(mesh.axis_names) - manual[0]


def first_columns(logits: Array, size: int) -> Array:
    """The first `size` entries of `logits`' last (vocabulary) axis: the logits of
    the rows in use of a table padded past its vocabulary. Where explicit mesh axes
    split that axis, it is gathered first: `size` need not be divisible by them."""
    if logits.shape[-1] == size:
        return logits
    sharding = explicit_sharding(logits)
    if sharding is not None:
        spec = tuple(sharding.spec) + (None,) * (logits.ndim - len(sharding.spec))
        if spec[-1] is not None:
            unsplit = PartitionSpec(*spec[:-1], None)
            logits = jax.sharding.reshard(logits, sharding.update(spec=unsplit))
    return logits[..., :size]


_AUTO_AXES_WARNING = (
    "The fused loss runs under auto mesh axes, where it cannot see how the table is "
    "split: if its vocabulary is split over a mesh axis, GSPMD gathers the whole table "
    "on every device (twice with the gradient). Shard the model with "
    "eqx_embed.shard_model, which records the table's axes, or make the axes explicit "
    "around the loss with jax.sharding.explicit_axes (the Scaling out guide's recipe)."
)
_warned_auto_axes = False


def on_auto_vocab_axes(
    function: Callable[..., Any], vocab_axes: tuple[str, ...] | None
) -> Callable[..., Any]:
    """`function(table, *per_token)`, served under auto mesh axes without gathering
    the table: where its rows are split over `vocab_axes` (recorded by
    `shard_model`), those axes are made explicit around it (the table split over
    them, the per-token arrays whole along them), so that the walk runs on each
    shard. Where the layout is not known (`vocab_axes` is `None`), a warning, once,
    names the recipe. Without auto axes, `function` itself."""
    global _warned_auto_axes
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.manual_axes:
        return function
    auto = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Auto and mesh.shape[name] > 1
    }
    if not auto:
        return function
    if vocab_axes is None:
        if not _warned_auto_axes:
            _warned_auto_axes = True
            warnings.warn(_AUTO_AXES_WARNING, stacklevel=4)
        return function
    if not vocab_axes or not set(vocab_axes) <= auto:
        return function

    def explicit(table, *per_token):
        in_sharding = (PartitionSpec(vocab_axes, None),)
        in_sharding += tuple(PartitionSpec() for _ in per_token)
        return jax.sharding.explicit_axes(
            function, axes=vocab_axes, in_sharding=in_sharding
        )(table, *per_token)

    return explicit
