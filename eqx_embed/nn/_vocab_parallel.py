"""Tables sharded over a device mesh: reading their layout, and the
vocabulary-parallel fused loss.

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
  `vocab_parallel_cross_entropy` under `jax.shard_map`: each device walks the blocks of
  its own rows, giving a log-sum-exp and (for the targets it holds) a target logit
  per token, and one collective of per-token scalars over the vocabulary axis
  (a max and two sums) combines them. The backward pass of each shard is the local
  blockwise one: it writes that shard's rows of the table's gradient and a partial
  gradient of the hidden states, summed over the vocabulary axis by the transpose of
  the shard_map's replicated input.

With auto axes, arrays carry no layout while tracing, and GSPMD places everything:
the values are the same, but the fused loss gathers the table.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jaxtyping import Array

AxisNames = tuple[str, ...]


def _axes(entry) -> AxisNames:
    """One entry of a `PartitionSpec` as a tuple of mesh axis names."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def table_axes(table: Array) -> tuple[AxisNames, AxisNames]:
    """The explicit mesh axes that split `table`'s vocabulary (rows) and embedding
    (columns) axes: `((), ())` without a mesh, with auto axes or for a replicated
    table."""
    sharding = getattr(jax.typeof(table), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:
        return (), ()
    spec = tuple(sharding.spec) + (None,) * (table.ndim - len(sharding.spec))
    explicit = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Explicit
    }
    rows, columns = (tuple(a for a in _axes(e) if a in explicit) for e in spec[:2])
    return rows, columns


def row_sharding(table: Array) -> NamedSharding | None:
    """The `out_sharding` of one row gathered from `table`: whole (its batch of rows
    is split as the token ids are, which may use the table's embedding axes too, as
    under FSDP), or `None` where the mesh has no explicit axes to resolve."""
    sharding = explicit_sharding(table)
    return None if sharding is None else sharding.update(spec=PartitionSpec(None))


def vocab_parallel_lse_and_target_logit(
    table: Array,
    hidden: Array,
    targets: Array,
    row_limit: Array,
    blocking,
    *,
    local: Callable,
) -> tuple[Array, Array]:
    """`local(table, hidden, targets, row_limit, blocking)` (the blockwise log-sum-exp
    and target logit per token, over the table's first `row_limit` rows: the others
    are padding) for a table whose rows are split over explicit mesh axes, without
    gathering the table. Other arguments: as `local`'s. Returns what `local` would on
    the whole table."""
    vocab_axes, embedding_axes = table_axes(table)
    if not vocab_axes:
        return local(table, hidden, targets, row_limit, blocking)
    if embedding_axes:
        # FSDP: each device's rows are gathered whole where they are used (their
        # gradient is scattered back by the transpose).
        gathered = PartitionSpec(vocab_axes, None)
        table = jax.sharding.reshard(
            table, explicit_sharding(table).update(spec=gathered)
        )
    mesh = jax.typeof(table).sharding.mesh
    shards = 1
    for name in vocab_axes:
        shards *= mesh.shape[name]
    rows_per_shard = table.shape[0] // shards
    shard_blocking = blocking._replace(
        block_size=min(blocking.block_size, rows_per_shard)
    )

    def per_shard(table_shard, hidden, targets):
        hidden, targets = (varying_like(x, table_shard) for x in (hidden, targets))
        first_row = lax.axis_index(vocab_axes) * rows_per_shard
        local_targets = targets - first_row
        here = (local_targets >= 0) & (local_targets < rows_per_shard)
        # The padding rows of a padded table sit at its end: in the last shard(s).
        rows_in_use = jnp.clip(row_limit - first_row, 0, rows_per_shard)
        lse, target_logit = local(
            table_shard,
            hidden,
            jnp.where(here, local_targets, 0),
            rows_in_use,
            shard_blocking,
        )
        # The max only steadies the exponentials: no gradient flows through it.
        peak = lax.pmax(lax.stop_gradient(lse), vocab_axes)
        peak = jnp.where(jnp.isfinite(peak), peak, 0)
        total = lax.psum(jnp.exp(lse - peak), vocab_axes)
        target_logit = lax.psum(jnp.where(here, target_logit, 0), vocab_axes)
        return jnp.log(total) + peak, target_logit

    lse, target_logit = jax.shard_map(
        per_shard,
        in_specs=(PartitionSpec(vocab_axes), PartitionSpec(), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        mesh=mesh,
        axis_names=set(vocab_axes),
    )(table, hidden, targets)
    in_range = (targets >= 0) & (targets < row_limit)
    return lse, jnp.where(in_range, target_logit, jnp.nan)


def varying_like(x: Array, reference: Array) -> Array:
    """`x`, made to vary over the manual mesh axes that `reference` varies over:
    inside `jax.shard_map`, a loop's initial carry must have the type of what the loop
    computes from a shard. A no-op elsewhere."""
    varying = jax.typeof(reference).mat.varying - jax.typeof(x).mat.varying
    missing = tuple(sorted(varying))
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
