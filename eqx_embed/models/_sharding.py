"""Sharding a `TransformerLM` and its batches over a device mesh, by rules.

Every array of the model has *logical* axes (`"vocab"`, `"embed"`, `"heads"`, `"mlp"`,
`"layers"`, `"norm"`), named by where it sits in the model; the rules map each logical
axis to mesh axes, as MaxText's `logical_axis_rules`. So one small dictionary says how
a whole model is laid out, and the same model code runs on one device or on many.
"""

import copy
import math
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

from ..nn import Embedding, pad_vocabulary
from ..nn._indices import checked_integers
from ..nn._table_kind import TableKind

Rules = Mapping[str, tuple[str, ...]]
"""Logical axis name -> the mesh axes that split it (`()`: replicated)."""

LOGICAL_AXES = ("batch", "vocab", "embed", "heads", "mlp", "layers", "norm")

# The logical axes of each kind of leaf, by the end of its path in the model. The
# blocks' arrays have a leading layer axis besides.
_LEAF_AXES = {
    "embedding.weight": ("vocab", "embed"),
    "reverse_embedding.weight": ("vocab", "embed"),
    "query_proj.weight": ("heads", "embed"),
    "key_proj.weight": ("heads", "embed"),
    "value_proj.weight": ("heads", "embed"),
    "output_proj.weight": ("embed", "heads"),
    "query_proj.bias": ("heads",),
    "key_proj.bias": ("heads",),
    "value_proj.bias": ("heads",),
    "output_proj.bias": ("norm",),
    "gate.weight": ("mlp", "embed"),
    "up.weight": ("mlp", "embed"),
    "down.weight": ("embed", "mlp"),
    "gate.bias": ("mlp",),
    "up.bias": ("mlp",),
    "down.bias": ("norm",),
}

T = TypeVar("T")


def _on_explicit_axes(array: Any) -> bool:
    """Whether `array` lives on a mesh with explicit axes."""
    sharding = getattr(jax.typeof(array), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    return mesh is not None and AxisType.Explicit in mesh.axis_types


def on_auto_axes(function: Callable[..., T], like: jax.Array) -> Callable[..., T]:
    """`function`, run with the mesh's explicit axes turned to auto ones (GSPMD then
    places its collectives: the gathers of FSDP, the reductions of tensor
    parallelism), its result laid out as `like`. `function` itself without
    explicit mesh axes."""
    if not _on_explicit_axes(like):
        return function
    spec = jax.typeof(like).sharding.spec
    return typing.cast(
        Callable[..., T], jax.sharding.auto_axes(function, out_sharding=spec)
    )


def model_on_auto_axes(function: Callable[..., T]) -> Callable[..., T]:
    """`function(model, *arrays)`, run as `on_auto_axes` does when the model's arrays
    live on explicit mesh axes, its results replicated: the cached forward passes,
    whose caches and logits every device then holds whole."""

    def run(model: Any, *arrays: Any) -> T:
        parameters, structure = eqx.partition(model, eqx.is_array)
        if not any(map(_on_explicit_axes, jax.tree.leaves(parameters))):
            return function(model, *arrays)

        def on_parameters(parameters, *arrays):
            return function(eqx.combine(parameters, structure), *arrays)

        replicated = jax.sharding.auto_axes(on_parameters, out_sharding=PartitionSpec())
        return typing.cast(T, replicated(parameters, *arrays))

    return run


def sharding_rules(
    *,
    data: str | Sequence[str] | None = None,
    fsdp: str | None = None,
    tensor: str | None = None,
    vocab: str | None = None,
) -> dict[str, tuple[str, ...]]:
    """The rules for the usual kinds of parallelism, each on a mesh axis of its own.

    **Arguments:**

    - `data`: the mesh axis (or axes) that split the batch; the weights are
        replicated over it.
    - `fsdp`: a mesh axis that splits the batch as `data` does and also every
        weight's `embed` axis (fully sharded data parallelism: the weights are
        gathered layer by layer where they are used).
    - `tensor`: a mesh axis that splits the attention heads and the MLP's hidden
        units (Megatron-LM's tensor parallelism).
    - `vocab`: a mesh axis that splits the vocabulary of the embedding table(s), for
        the lookup, the decode and the fused loss, which then never gathers the table.

    **Returns:**

    A dictionary from each logical axis name to a tuple of mesh axis names, for
    [`shard_model`][eqx_embed.shard_model]; edit it to taste.

    **Raises:**

    Nothing: the rules are checked where they are used (see
    [`model_partition_specs`][eqx_embed.model_partition_specs]).

    **Example:**

    ```python
    import eqx_embed

    rules = eqx_embed.sharding_rules(data="data", vocab="model")
    assert rules["batch"] == ("data",) and rules["vocab"] == ("model",)
    ```
    """
    data = () if data is None else (data,) if isinstance(data, str) else tuple(data)
    fsdp_axes = () if fsdp is None else (fsdp,)
    tensor_axes = () if tensor is None else (tensor,)
    return dict(
        batch=data + fsdp_axes,
        vocab=() if vocab is None else (vocab,),
        embed=fsdp_axes,
        heads=tensor_axes,
        mlp=tensor_axes,
        layers=(),
        norm=(),
    )


def _check_rules(rules: Mapping[str, Any]) -> None:
    """Raises a `ValueError` naming a key of `rules` that is not a logical axis (a
    typo would otherwise leave its axis replicated, silently) or a value that is not
    a sequence of mesh axis names."""
    for logical, mesh_axes in rules.items():
        if logical not in LOGICAL_AXES:
            raise ValueError(
                f"rules has the key {logical!r}, which is not a logical axis; the "
                f"logical axes are {LOGICAL_AXES}."
            )
        if isinstance(mesh_axes, str) or not all(
            isinstance(axis, str) for axis in mesh_axes
        ):
            raise ValueError(
                f"rules[{logical!r}] must be a tuple of mesh axis names, got "
                f"{mesh_axes!r}."
            )


def _check_mesh(mesh: Any, function: str) -> None:
    """Raises a `ValueError` unless `mesh` is a `jax.sharding.Mesh`, whose devices
    the arrays are placed on."""
    if not isinstance(mesh, Mesh):
        raise ValueError(
            f"{function} places arrays on devices, so its mesh must be a "
            f"jax.sharding.Mesh (as from jax.make_mesh), got {type(mesh).__name__}; "
            "an AbstractMesh has no devices (model_partition_specs takes one)."
        )


def _leaf_axes(name: str, ndim: int) -> tuple[str, ...]:
    """The logical axes of the leaf at dotted path `name`."""
    axes: tuple[str, ...] = ("norm",) * ndim  # norms, RoPE tables: replicated
    for suffix, logical in _LEAF_AXES.items():
        if name == suffix or name.endswith("." + suffix):
            axes = logical
            break
    if name.startswith("blocks."):
        axes = ("layers", *axes[: ndim - 1])
    return axes[:ndim] + ("norm",) * (ndim - len(axes))


def _spec(
    name: str,
    shape: tuple[int, ...],
    logical: Sequence[str],
    rules: Rules,
    mesh: Mesh | AbstractMesh,
) -> PartitionSpec:
    entries = []
    used: dict[str, str] = {}
    for size, axis in zip(shape, logical, strict=True):
        if axis not in rules:
            raise ValueError(
                f"The rules have no entry for the logical axis {axis!r} of {name}; "
                f"give every one of {LOGICAL_AXES}."
            )
        mesh_axes = rules[axis]
        devices = 1
        for mesh_axis in mesh_axes:
            if mesh_axis not in mesh.shape:
                raise ValueError(
                    f"The rule {axis!r} -> {mesh_axes} for {name} names the mesh axis "
                    f"{mesh_axis!r}, which the mesh does not have (its axes: "
                    f"{tuple(mesh.axis_names)})."
                )
            if mesh_axis in used:
                raise ValueError(
                    f"{name} would be split over the mesh axis {mesh_axis!r} twice "
                    f"(by its {used[mesh_axis]!r} and {axis!r} axes); a PartitionSpec "
                    "uses each mesh axis at most once."
                )
            used[mesh_axis] = axis
            devices *= mesh.shape[mesh_axis]
        if size % devices:
            fix = (
                f"eqx_embed.pad_vocabulary(model, {devices}) pads it (shard_model "
                "does so itself)"
                if axis == "vocab"
                else f"pad it to a multiple of {devices}"
            )
            raise ValueError(
                f"{name} has {size} entries along its {axis!r} axis, which its "
                f"{devices} devices on mesh axes {mesh_axes} do not divide; {fix} "
                f"or change the rule for {axis!r}."
            )
        entries.append(mesh_axes or None)
    return PartitionSpec(*entries)


def model_partition_specs(model: Any, mesh: Mesh | AbstractMesh, rules: Rules) -> Any:
    """The `PartitionSpec` of every array of `model` under `rules`.

    **Arguments:**

    - `model`: a [`TransformerLM`][eqx_embed.TransformerLM] (or any of its parts).
    - `mesh`: the `jax.sharding.Mesh` the rules refer to.
    - `rules`: from [`sharding_rules`][eqx_embed.sharding_rules].

    **Returns:**

    A pytree like `eqx.filter(model, eqx.is_array)` with a `PartitionSpec` for each
    array. A rule that names an axis the mesh lacks, that splits an array along an
    axis the devices do not divide (a vocabulary: pad it first with
    [`pad_vocabulary`][eqx_embed.pad_vocabulary], as `shard_model` does), or that
    uses a mesh axis twice in one array raises a `ValueError` naming the array and
    the axis.

    **Raises:**

    - `ValueError`, naming the array and the axis, as said above; naming the key,
        for a key of `rules` that is not a logical axis (a typo such as
        `"vocabulary"`) or a value that is not a tuple of mesh axis names.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rules = eqx_embed.sharding_rules(data="data")
    specs = eqx_embed.model_partition_specs(model, mesh, rules)
    ```
    """

    _check_rules(rules)

    def spec(path, leaf):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        return _spec(name, leaf.shape, _leaf_axes(name, leaf.ndim), rules, mesh)

    arrays = eqx.filter(model, eqx.is_array)
    return jax.tree_util.tree_map_with_path(spec, arrays)


def shard_model(model: Any, mesh: Mesh, rules: Rules) -> Any:
    """`model` with every array placed on `mesh` as `rules` say.

    Training then needs nothing else: `eqx.filter_jit` keeps the layout, the
    optimiser state built from the sharded model (`optax` `init`) takes it too, and
    with the mesh set (`jax.set_mesh(mesh)`) the embedding's lookup, decode and fused
    loss run vocabulary-parallel. The RoPE tables are replicated.

    A vocabulary that the devices splitting it do not divide (GPT-2's 50,257 on 8) is
    padded first, by [`pad_vocabulary`][eqx_embed.pad_vocabulary]: the tables get
    zero rows that are never read, and every result (lookup, logits of the real
    vocabulary size, losses, gradients, checkpoints written) stays that of the
    unpadded model.

    **Arguments:**

    - `model`: a [`TransformerLM`][eqx_embed.TransformerLM] (or any of its parts).
    - `mesh`: a `jax.sharding.Mesh`, as from `jax.make_mesh`.
    - `rules`: from [`sharding_rules`][eqx_embed.sharding_rules].

    **Returns:**

    The same model, its arrays sharded (its embedding tables padded where the
    vocabulary needs it). Raises as
    [`model_partition_specs`][eqx_embed.model_partition_specs].

    **Raises:**

    - `ValueError`: as [`model_partition_specs`][eqx_embed.model_partition_specs];
        a `mesh` that is not a `jax.sharding.Mesh` (an `AbstractMesh` has no
        devices to place arrays on).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rules = eqx_embed.sharding_rules(data="data")
    sharded = eqx_embed.shard_model(model, mesh, rules)
    assert sharded(jnp.array([1, 2, 3])).shape == (3, 64)
    ```
    """
    _check_mesh(mesh, "shard_model")
    _check_rules(rules)
    vocab_devices = math.prod(
        mesh.shape[axis] for axis in rules.get("vocab", ()) if axis in mesh.shape
    )
    model = pad_vocabulary(model, vocab_devices)
    specs = model_partition_specs(model, mesh, rules)
    arrays, static = eqx.partition(model, eqx.is_array)
    # `jax.device_put` rather than `eqx.filter_shard`, whose sharding constraint is
    # an assertion (not a move) under explicit mesh axes.
    arrays = jax.tree.map(
        lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)),
        arrays,
        specs,
    )
    return _with_auto_vocab_axes(eqx.combine(arrays, static), mesh)


def _with_auto_vocab_axes(model: Any, mesh: Mesh) -> Any:
    """`model`, each embedding recording the auto mesh axes that split its rows
    (`Embedding.vocab_axes`; `()` where none do): auto axes are not in the arrays'
    types, and the fused losses need them to walk each shard rather than gather the
    table. A mesh without auto axes leaves `model` as it is."""
    auto = {
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == AxisType.Auto
    }
    if not auto:
        return model

    def record(node: Any) -> Any:
        if not isinstance(node, Embedding):
            return node
        if isinstance(node.weight, TableKind):
            # A kind's losses take the per-token walk whole (never per shard of its
            # rows): no axes to make explicit around it.
            axes = ()
        else:
            sharding = typing.cast(NamedSharding, node.weight.sharding)
            rows = (tuple(sharding.spec) + (None,))[0]
            axes = () if rows is None else rows if isinstance(rows, tuple) else (rows,)
        recorded = copy.copy(node)
        # A static field: set on the copy, as equinox's own `__init__` would.
        object.__setattr__(recorded, "vocab_axes", tuple(a for a in axes if a in auto))
        return recorded

    return jax.tree.map(record, model, is_leaf=lambda node: isinstance(node, Embedding))


def shard_batch(batch: Any, mesh: Mesh, rules: Rules) -> Any:
    """Every array of `batch` split along its leading (batch) axis as the rule for
    `"batch"` says, and replicated over the other mesh axes.

    **Arguments:**

    - `batch`: a pytree of arrays with a common leading batch axis (token ids,
        targets, masks), on the host or on devices.
    - `mesh`, `rules`: as for [`shard_model`][eqx_embed.shard_model].

    **Returns:**

    The batch on the mesh. Raises a `ValueError` naming the array where the batch
    rule uses a mesh axis that also splits the vocabulary, heads or MLP (each device
    of such an axis must see the same tokens), or the batch size is not divisible.

    **Raises:**

    - `ValueError`, naming the array, as said above; for a leaf that is not an
        array with a leading axis (a scalar, or a Python list, whose items would be
        leaves of their own), for integers that JAX would narrow (an int64 id past
        int32 without `jax_enable_x64`: refused, never wrapped), and as
        [`shard_model`][eqx_embed.shard_model] for the mesh and the rules.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=1,
        num_heads=2,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    rules = eqx_embed.sharding_rules(data="data")
    batch = eqx_embed.shard_batch(jnp.zeros((4, 8), jnp.int32), mesh, rules)
    assert batch.shape == (4, 8)
    ```
    """
    _check_mesh(mesh, "shard_batch")
    _check_rules(rules)
    batch_axes = tuple(rules.get("batch", ()))
    model_axes = {
        mesh_axis
        for logical in ("vocab", "heads", "mlp")
        for mesh_axis in rules.get(logical, ())
    }

    def place(path, leaf):
        name = "batch" + jax.tree_util.keystr(path)
        clash = sorted(model_axes.intersection(batch_axes))
        if clash:
            raise ValueError(
                f"{name} cannot be split over the mesh axes {clash}: they split the "
                "model's vocabulary, heads or MLP, whose devices must all see the same "
                "tokens. Split the batch over data or fsdp axes only."
            )
        if not isinstance(leaf, np.ndarray | jax.Array) or leaf.ndim == 0:
            raise ValueError(
                f"{name} must be an array with a leading batch axis, got "
                f"{type(leaf).__name__} {leaf!r:.80}; convert a list with "
                "np.asarray, and keep scalars out of the batch."
            )
        if not isinstance(leaf, jax.Array) and np.issubdtype(leaf.dtype, np.integer):
            # In its own dtype, before `device_put` narrows an int64 id past int32.
            leaf = checked_integers(leaf, name=name)
        spec = _spec(name, leaf.shape[:1], ("batch",), rules, mesh)
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(place, batch)
