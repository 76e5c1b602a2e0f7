"""`TransformerConfig.remat_policy`: the layer scan's rematerialisation changes what a
training step keeps in memory, never its gradients."""

import dataclasses

import equinox as eqx
import jax
import numpy as np
import pytest
from _tolerances import tolerance
from jaxtyping import TypeCheckError

from eqx_embed import TransformerConfig, TransformerLM

# Alternating windows: the scan carries its per-layer data through the checkpoint.
CONFIG = TransformerConfig(
    "gemma2",
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_layers=3,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    sliding_window=8,
    max_position_embeddings=128,
)
TOKENS = np.random.default_rng(0).integers(0, 64, size=(2, 65))


def compiled_step(policy: str):
    """The gradient of `mean_loss` under `policy`, compiled, and the same weights."""
    config = dataclasses.replace(CONFIG, remat_policy=policy)
    model = TransformerLM(config, key=jax.random.key(0))

    @jax.jit
    def gradients(model, tokens):
        return eqx.filter_grad(lambda m: m.mean_loss(tokens[:, :-1], tokens[:, 1:]))(
            model
        )

    return gradients.lower(model, TOKENS).compile(), model


@pytest.fixture(scope="module")
def steps():
    return {policy: compiled_step(policy) for policy in ("none", "layer", "matmuls")}


def temporary_bytes(compiled) -> int:
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("policy", ["layer", "matmuls"])
def test_gradients_equal_those_without_remat(policy, steps):
    compiled, model = steps[policy]
    baseline, baseline_model = steps["none"]
    expected = jax.tree.leaves(baseline(baseline_model, TOKENS))
    got = jax.tree.leaves(compiled(model, TOKENS))
    assert len(got) == len(expected)
    # A recomputed layer may round differently: a sum per weight over the tokens,
    # through every layer.
    reduction = (CONFIG.hidden_size + CONFIG.intermediate_size + 64) * 4
    for ours, theirs in zip(got, expected, strict=True):
        scale = float(np.abs(theirs).max()) or 1.0
        np.testing.assert_allclose(
            ours, theirs, **tolerance(np.float32, reduction, scale=scale)
        )


def test_remat_keeps_less_for_the_backward_pass(steps):
    none, layer, matmuls = (
        temporary_bytes(steps[policy][0]) for policy in ("none", "layer", "matmuls")
    )
    assert layer < matmuls < none


def test_an_unknown_policy_is_refused_by_name():
    # The annotations' contract (TypeCheckError, under the suite's jaxtyping) or the
    # config's own check (ValueError).
    with pytest.raises((TypeCheckError, ValueError), match="remat_policy"):
        dataclasses.replace(CONFIG, remat_policy="full")
