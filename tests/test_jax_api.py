"""The JAX APIs the package relies on, read from its source: no private `jax._src`
import, and every public JAX name it uses is in `JAX_APIS`, so that a new dependency
on a JAX API (one that a JAX release may move or drop) is a visible change here."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "eqx_embed"

# Every `jax...` attribute chain and `from jax... import name` in `eqx_embed/`, as its
# full dotted name, `jax.numpy`'s included. The floor job of `.ci/run` runs them on
# the lowest supported JAX.
JAX_APIS = frozenset(
    {
        "jax.Array",
        "jax.ShapeDtypeStruct",
        "jax.__version__",
        "jax.checkpoint",
        "jax.checkpoint_policies.dots_with_no_batch_dims_saveable",
        "jax.checkpoint_policies.nothing_saveable",
        "jax.config.read",
        "jax.core.Tracer",
        "jax.custom_batching.custom_vmap",
        "jax.custom_vjp",
        "jax.device_put",
        "jax.dtypes.canonicalize_dtype",
        "jax.eval_shape",
        "jax.lax.axis_index",
        "jax.lax.bitcast_convert_type",
        "jax.lax.cond",
        "jax.lax.cummax",
        "jax.lax.dot_general",
        "jax.lax.dynamic_index_in_dim",
        "jax.lax.dynamic_slice_in_dim",
        "jax.lax.dynamic_update_index_in_dim",
        "jax.lax.dynamic_update_slice_in_dim",
        "jax.lax.optimization_barrier",
        "jax.lax.pad",
        "jax.lax.pcast",
        "jax.lax.pmax",
        "jax.lax.psum",
        "jax.lax.rsqrt",
        "jax.lax.scan",
        "jax.lax.top_k",
        "jax.lax.while_loop",
        "jax.named_scope",
        "jax.nn.dot_product_attention",
        "jax.nn.gelu",
        "jax.nn.initializers.normal",
        "jax.nn.initializers.variance_scaling",
        "jax.nn.log_softmax",
        "jax.nn.logsumexp",
        "jax.nn.relu",
        "jax.nn.silu",
        "jax.nn.softmax",
        "jax.numpy.add",
        "jax.numpy.all",
        "jax.numpy.any",
        "jax.numpy.arange",
        "jax.numpy.argmax",
        "jax.numpy.array",
        "jax.numpy.asarray",
        "jax.numpy.bfloat16",
        "jax.numpy.broadcast_to",
        "jax.numpy.clip",
        "jax.numpy.concatenate",
        "jax.numpy.cumsum",
        "jax.numpy.dtype",
        "jax.numpy.einsum",
        "jax.numpy.exp",
        "jax.numpy.finfo",
        "jax.numpy.float32",
        "jax.numpy.float64",
        "jax.numpy.floating",
        "jax.numpy.full",
        "jax.numpy.full_like",
        "jax.numpy.iinfo",
        "jax.numpy.inexact",
        "jax.numpy.inf",
        "jax.numpy.int32",
        "jax.numpy.integer",
        "jax.numpy.isfinite",
        "jax.numpy.isin",
        "jax.numpy.isnan",
        "jax.numpy.issubdtype",
        "jax.numpy.left_shift",
        "jax.numpy.log",
        "jax.numpy.logaddexp",
        "jax.numpy.matmul",
        "jax.numpy.max",
        "jax.numpy.maximum",
        "jax.numpy.mean",
        "jax.numpy.minimum",
        "jax.numpy.mod",
        "jax.numpy.nan",
        "jax.numpy.ones",
        "jax.numpy.pad",
        "jax.numpy.promote_types",
        "jax.numpy.repeat",
        "jax.numpy.reshape",
        "jax.numpy.result_type",
        "jax.numpy.sort",
        "jax.numpy.stack",
        "jax.numpy.sum",
        "jax.numpy.take",
        "jax.numpy.take_along_axis",
        "jax.numpy.tanh",
        "jax.numpy.uint16",
        "jax.numpy.uint32",
        "jax.numpy.uint64",
        "jax.numpy.where",
        "jax.numpy.zeros",
        "jax.numpy.zeros_like",
        "jax.random.bernoulli",
        "jax.random.categorical",
        "jax.random.fold_in",
        "jax.random.key",
        "jax.random.normal",
        "jax.random.split",
        "jax.random.uniform",
        "jax.shard_map",
        "jax.sharding.AbstractMesh",
        "jax.sharding.AxisType.Auto",
        "jax.sharding.AxisType.Explicit",
        "jax.sharding.Mesh",
        "jax.sharding.NamedSharding",
        "jax.sharding.PartitionSpec",
        "jax.sharding.PartitionSpec.UNCONSTRAINED",
        "jax.sharding.auto_axes",
        "jax.sharding.explicit_axes",
        "jax.sharding.get_abstract_mesh",
        "jax.sharding.reshard",
        "jax.tree.leaves",
        "jax.tree.map",
        "jax.tree.structure",
        "jax.tree.unflatten",
        "jax.tree_util.keystr",
        "jax.tree_util.tree_flatten_with_path",
        "jax.tree_util.tree_map_with_path",
        "jax.typeof",
        "jax.vjp",
        "jax.vmap",
    }
)


def _modules() -> list[tuple[pathlib.Path, ast.Module]]:
    return [
        (path, ast.parse(path.read_text(), filename=str(path)))
        for path in sorted(PACKAGE.rglob("*.py"))
    ]


def _jax_aliases(tree: ast.Module) -> dict[str, str]:
    """Local name -> the JAX name it stands for: `jnp` -> `jax.numpy`, `P` ->
    `jax.sharding.PartitionSpec`."""
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "jax":
                    # `import jax.numpy` binds `jax`; `import jax.numpy as jnp`, jnp.
                    local = alias.asname or alias.name.split(".")[0]
                    aliases[local] = alias.name if alias.asname else "jax"
        elif (
            isinstance(node, ast.ImportFrom)
            and not node.level
            and (node.module or "").split(".")[0] == "jax"
        ):
            for alias in node.names:
                aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def _dotted(node: ast.expr, aliases: dict[str, str]) -> str | None:
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return None if base is None else f"{base}.{node.attr}"
    return None


def used_jax_names() -> dict[str, set[str]]:
    """Each JAX name the package uses (its longest attribute chains, and the names
    it imports from JAX) -> the files that use it."""
    used: dict[str, set[str]] = {}
    for path, tree in _modules():
        aliases = _jax_aliases(tree)
        names = set(aliases.values())
        names.update(
            name
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            for name in [_dotted(node, aliases)]
            if name is not None
        )
        # `jax.sharding.reshard` stands for `jax.sharding` as well.
        longest = {n for n in names if not any(m.startswith(n + ".") for m in names)}
        for name in longest:
            used.setdefault(name, set()).add(str(path.relative_to(PACKAGE.parent)))
    return used


def test_no_private_jax_import():
    private = {
        name: files
        for name, files in used_jax_names().items()
        if name == "jax._src" or name.startswith("jax._src.")
    }
    assert not private, f"jax._src is JAX's private code: {private}"


def test_the_jax_apis_used_are_the_documented_ones():
    used = {
        name: files
        for name, files in used_jax_names().items()
        if not name.startswith("jax._src")  # test_no_private_jax_import's concern
    }
    new = {name: sorted(used[name]) for name in sorted(set(used) - JAX_APIS)}
    assert not new, f"JAX APIs used but not listed in JAX_APIS: {new}"
    unused = sorted(JAX_APIS - set(used))
    assert not unused, f"listed in JAX_APIS but no longer used: {unused}"


def test_the_scan_sees_aliases_and_from_imports():
    """The reader itself, on a snippet whose JAX names are known."""
    tree = ast.parse(
        "import jax\nimport jax.numpy as jnp\nfrom jax import lax\n"
        "from jax.sharding import PartitionSpec as P\n"
        "jnp.zeros(3); lax.psum(x, 'i'); jax.sharding.reshard(x, P()); y.jax.vmap\n"
    )
    aliases = _jax_aliases(tree)
    assert aliases == {
        "jax": "jax",
        "jnp": "jax.numpy",
        "lax": "jax.lax",
        "P": "jax.sharding.PartitionSpec",
    }
    found = {
        _dotted(node, aliases)
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
    }
    assert found - {None} == {
        "jax.numpy.zeros",
        "jax.lax.psum",
        "jax.sharding",
        "jax.sharding.reshard",
    }
