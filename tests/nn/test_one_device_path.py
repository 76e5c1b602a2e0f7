"""The one-device path is layered under the mesh one: with no mesh set, the lookup,
`attend`, the decode and the losses run no mesh helper (each is made to raise here)
and stage no sharding operation, and their values are NumPy's in float64."""

import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import matmul_tolerance

import eqx_embed

VOCAB, WIDTH, TOKENS = 12, 8, 5
# What a sharded program stages and a one-device one never needs.
SHARDING_PRIMITIVES = {
    "reshard",
    "sharding_constraint",
    "shard_map",
    "pcast",
    "pvary",
    "mesh_cast",
}


def normal(*shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def reference_losses(table, hidden, targets):
    logits = np.asarray(hidden, np.float64) @ np.asarray(table, np.float64).T
    top = logits.max(axis=1)
    log_sum_exp = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return logits, log_sum_exp, log_sum_exp - logits[np.arange(len(targets)), targets]


def calls(out_of_range):
    """Every entry point of the lookup and the decode, as `(name, function)` of a
    table, hidden states and targets."""

    def embedding(table):
        return eqx_embed.Embedding(
            weight=table, padding_idx=3, out_of_range=out_of_range
        )

    def decode(table):
        return eqx_embed.EmbeddingDecode(embedding(table))

    return dict(
        lookup=lambda table, hidden, targets: jax.vmap(embedding(table))(targets),
        attend=lambda table, hidden, targets: jax.vmap(embedding(table).attend)(hidden),
        decode=lambda table, hidden, targets: jax.vmap(decode(table))(hidden),
        cross_entropy=lambda table, hidden, targets: decode(table).cross_entropy(
            hidden, targets, block_size=5
        ),
        mean_cross_entropy=lambda table, hidden, targets: decode(
            table
        ).mean_cross_entropy(hidden, targets),
        log_sum_exp=lambda table, hidden, targets: decode(table).log_sum_exp(
            hidden, block_size=5
        ),
    )


def expected(name, table, hidden, targets):
    logits, log_sum_exp, losses = reference_losses(table, hidden, targets)
    rows = np.asarray(table, np.float64)[targets]
    rows[targets == 3] = 0
    return dict(
        lookup=rows,
        attend=logits,
        decode=logits,
        cross_entropy=losses,
        mean_cross_entropy=losses.mean(),
        log_sum_exp=log_sum_exp,
    )[name]


@pytest.fixture
def mesh_helpers_raise(monkeypatch):
    """Every function of the mesh modules, wherever the lookup and the decode
    imported it, replaced by one that raises; all but the question that chooses the
    path. (The loss kernels' own modules are left to the test below.)"""
    mesh_modules = {"eqx_embed.nn._mesh", "eqx_embed.nn._mesh_token_layout"}
    for module_name in ("_embedding", "_decode", "_indices", "_mesh_token_layout"):
        module = sys.modules[f"eqx_embed.nn.{module_name}"]
        for name, value in list(vars(module).items()):
            if (
                callable(value)
                and getattr(value, "__module__", None) in mesh_modules
                and name != "on_explicit_mesh"
            ):

                def refuse(*args, _name=name, **kwargs):
                    raise AssertionError(f"{_name} ran on the one-device path")

                monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("out_of_range", ["nan", "error"])
@pytest.mark.parametrize("name", list(calls("nan")))
@pytest.mark.parametrize("jit", [False, True])
def test_no_mesh_helper_runs_without_a_mesh(
    mesh_helpers_raise, name, out_of_range, jit
):
    table, hidden = normal(VOCAB, WIDTH), normal(TOKENS, WIDTH, seed=1)
    targets = jnp.array([0, 3, 11, 7, 3])
    call = calls(out_of_range)[name]
    if jit:
        call = eqx.filter_jit(call)
    result = np.asarray(call(table, hidden, targets), np.float64)
    reference = expected(name, table, hidden, targets)
    if name == "lookup":
        np.testing.assert_array_equal(result, reference.astype(np.float32))
    else:
        bound = matmul_tolerance(hidden, table, after=VOCAB + 8)
        np.testing.assert_allclose(
            result, reference, rtol=bound["rtol"], atol=bound["atol"]
        )


def _primitives(jaxpr) -> set[str]:
    """The names of the primitives of `jaxpr` and of every jaxpr nested in it."""
    names = set()
    for equation in jaxpr.eqns:
        names.add(equation.primitive.name)
        for param in equation.params.values():
            for value in param if isinstance(param, tuple | list) else (param,):
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names


@pytest.mark.parametrize("out_of_range", ["nan", "error"])
@pytest.mark.parametrize("name", list(calls("nan")))
def test_the_one_device_programs_stage_no_sharding(name, out_of_range):
    table, hidden = normal(VOCAB, WIDTH), normal(TOKENS, WIDTH, seed=1)
    targets = jnp.array([0, 3, 11, 7, 3])
    call = calls(out_of_range)[name]

    def value_and_gradient(table, hidden):
        if name == "lookup":
            return call(table, hidden, targets)
        return jax.value_and_grad(lambda t, h: call(t, h, targets).sum(), (0, 1))(
            table, hidden
        )

    staged = _primitives(jax.make_jaxpr(value_and_gradient)(table, hidden).jaxpr)
    assert staged & SHARDING_PRIMITIVES == set(), staged
    # The program is the one asked for: a gather for the lookup, products otherwise.
    assert ("gather" if name == "lookup" else "dot_general") in staged, staged
