"""Runtime shape contracts: a bad call raises an error naming the argument and the
expected and received shapes, eagerly, under `eqx.filter_jit` and under `jax.vmap`;
`JAXTYPING_DISABLE=1` turns the checks off."""

import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import eqx_embed
from eqx_embed.nn._contracts import check_feature_size

NUM_EMBEDDINGS, EMBEDDING_SIZE = 10, 4


def modules():
    key = jax.random.key(0)
    embedding = eqx_embed.Embedding(NUM_EMBEDDINGS, EMBEDDING_SIZE, key=key)
    reversible = eqx_embed.ReversibleEmbedding(
        NUM_EMBEDDINGS, EMBEDDING_SIZE, logit_soft_cap=5.0, key=key
    )
    return {
        "Embedding.__call__": (embedding, "__call__"),
        "ReversibleEmbedding.__call__": (reversible, "__call__"),
        "Embedding.attend": (embedding, "attend"),
        "EmbeddingDecode.__call__": (eqx_embed.EmbeddingDecode(embedding), "__call__"),
        "ReversibleEmbedding.decode": (reversible, "decode"),
    }


LOOKUPS = ["Embedding.__call__", "ReversibleEmbedding.__call__"]
DECODES = ["Embedding.attend", "EmbeddingDecode.__call__", "ReversibleEmbedding.decode"]


def call(module, method, value, mode):
    """`module.method(value)` eagerly, under `eqx.filter_jit`, under `jax.vmap` (over
    a new leading axis of 2) or both."""
    if mode == "eager":
        return getattr(module, method)(value)
    if mode == "filter_jit":
        return eqx.filter_jit(lambda m, x: getattr(m, method)(x))(module, value)
    batch = jnp.stack([jnp.asarray(value)] * 2)
    vmapped = lambda m, x: jax.vmap(getattr(m, method))(x)  # noqa: E731
    if mode == "vmap":
        return vmapped(module, batch)
    return eqx.filter_jit(vmapped)(module, batch)


MODES = ["eager", "filter_jit", "vmap", "filter_jit+vmap"]


def argument_name(site):
    return "query" if site == "Embedding.attend" else "hidden"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("site", LOOKUPS)
@pytest.mark.parametrize(
    ("token", "received"),
    [
        (jnp.array(3.0), r"(weak_)?f32\[\]"),
        (np.float32(3.0), r"np\.float32\(3\.0\)|f32\[\]"),
        (jnp.array([1, 2, 3]), r"i32\[3\]"),
        (jnp.zeros((2, 3), jnp.int32), r"i32\[2,3\]"),
    ],
    ids=["float token", "numpy float token", "batch of 3", "batch of 2x3"],
)
def test_bad_token_names_the_argument_and_shapes(site, mode, token, received):
    module, method = modules()[site]
    expected = r"Integer\[[^\]]*Array, ''\]"
    pattern = rf"(?s)parameter 'token'.*Actual value: ({received}).*{expected}"
    with pytest.raises(jaxtyping.TypeCheckError, match=pattern):
        call(module, method, token, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("site", DECODES)
def test_wrong_hidden_width_names_the_argument_and_shapes(site, mode):
    module, method = modules()[site]
    name = argument_name(site)
    pattern = rf"{name} must have a last axis of size 4 .* got shape \(5,\)"
    with pytest.raises(ValueError, match=pattern):
        call(module, method, jnp.ones(5), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("site", DECODES)
@pytest.mark.parametrize(
    ("hidden", "received"),
    [(jnp.ones((3, 4)), r"f32\[3,4\]"), (jnp.ones((), jnp.float32), r"f32\[\]")],
    ids=["batch of 3", "scalar"],
)
def test_wrong_hidden_rank_names_the_argument_and_shapes(site, mode, hidden, received):
    module, method = modules()[site]
    name = argument_name(site)
    pattern = rf"(?s)parameter '{name}'.*Actual value: {received}.*embedding_size"
    with pytest.raises(jaxtyping.TypeCheckError, match=pattern):
        call(module, method, hidden, mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("site", DECODES)
def test_integer_hidden_is_rejected(site, mode):
    module, method = modules()[site]
    name = argument_name(site)
    pattern = rf"(?s)parameter '{name}'.*Actual value: i32\[4\].*Float"
    with pytest.raises(jaxtyping.TypeCheckError, match=pattern):
        call(module, method, jnp.ones(4, jnp.int32), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("site", list(modules()))
def test_good_calls_pass(site, mode):
    module, method = modules()[site]
    value = jnp.array(3) if site in LOOKUPS else jnp.ones(EMBEDDING_SIZE)
    out = call(module, method, value, mode)
    size = EMBEDDING_SIZE if site in LOOKUPS else NUM_EMBEDDINGS
    assert out.shape == (
        (size,) if mode == "eager" or mode == "filter_jit" else (2, size)
    )


def test_check_feature_size():
    check_feature_size(jnp.ones((2, 3)), 3, name="x", owner="table's width")
    with pytest.raises(ValueError) as error:
        check_feature_size(jnp.ones((2, 3)), 4, name="x", owner="table's width")
    assert str(error.value) == (
        "x must have a last axis of size 4 (the table's width), got shape (2, 3)."
    )
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        check_feature_size(jnp.ones(()), 4, name="x", owner="table's width")


def test_checks_add_nothing_to_the_traced_program():
    """They run in Python at trace time: the jaxpr is the same with them off."""
    module = eqx_embed.ReversibleEmbedding(
        NUM_EMBEDDINGS, EMBEDDING_SIZE, logit_soft_cap=5.0, key=jax.random.key(0)
    )

    def forward(tokens):
        return jax.vmap(lambda t: module.decode(module(t)))(tokens)

    tokens = jnp.arange(6)
    checked_jaxpr = str(jax.make_jaxpr(forward)(tokens))
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        unchecked_jaxpr = str(jax.make_jaxpr(forward)(tokens))
        # The switch really is off: a bad call goes through.
        assert module(jnp.array([1, 2])).shape == (2, EMBEDDING_SIZE)
    finally:
        jaxtyping.config.update("jaxtyping_disable", False)
    assert checked_jaxpr == unchecked_jaxpr
    with pytest.raises(jaxtyping.TypeCheckError):
        module(jnp.array([1, 2]))


# A default install (no jaxtyping import hook), in a fresh interpreter.
BAD_CALLS = """
import json
import jax, jax.numpy as jnp
import eqx_embed

embedding = eqx_embed.Embedding(10, 4, key=jax.random.key(0))
decode = eqx_embed.EmbeddingDecode(embedding)
calls = {
    "float token": lambda: embedding(jnp.array(1.0)),
    "batch to per-token call": lambda: embedding(jnp.array([1, 2, 3])),
    "batch to vmapped call": lambda: jax.vmap(embedding)(jnp.zeros((2, 3), int)),
    "hidden of rank 2": lambda: decode(jnp.ones((3, 4))),
    "hidden of wrong width": lambda: decode(jnp.ones(5)),
}
outcomes = {}
for name, bad_call in calls.items():
    try:
        outcomes[name] = "returned shape " + str(bad_call().shape)
    except Exception as error:
        outcomes[name] = type(error).__name__ + ": " + str(error).splitlines()[0]
print(json.dumps(outcomes))
"""


def run_bad_calls(**env):
    environment = {**os.environ, **env}
    result = subprocess.run(
        [sys.executable, "-c", BAD_CALLS],
        env=environment,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_default_install_checks_and_jaxtyping_disable_turns_them_off():
    on = run_bad_calls(JAXTYPING_DISABLE="0")
    off = run_bad_calls(JAXTYPING_DISABLE="1")
    for name in ["float token", "batch to per-token call", "batch to vmapped call"]:
        assert on[name].startswith("TypeCheckError: "), on[name]
        assert "Embedding.__call__" in on[name]
    assert on["hidden of rank 2"].startswith("TypeCheckError: "), on
    assert on["hidden of wrong width"] == (
        "ValueError: hidden must have a last axis of size 4 (the table's "
        "embedding_size), got shape (5,)."
    )
    # Off, the per-token lookup silently takes a batch...
    assert off["batch to per-token call"] == "returned shape (3, 4)"
    assert off["batch to vmapped call"] == "returned shape (2, 3, 4)"
    assert off["hidden of rank 2"] == "returned shape (3, 10)"
    # ...and only JAX itself still objects to a float token. The width check is a
    # ValueError of the module, not an annotation: it stays, as the matmul would
    # fail anyway.
    assert not off["float token"].startswith("TypeCheckError"), off
    assert off["hidden of wrong width"] == on["hidden of wrong width"]
