"""Sharding a whole TransformerLM by rules, and training it on 8 CPU devices."""

import jax
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

from eqx_embed import (
    TransformerConfig,
    TransformerLM,
    model_partition_specs,
    shard_batch,
    sharding_rules,
)

CONFIG = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    max_position_embeddings=16,
)
MESH = AbstractMesh((2, 2, 2), ("data", "tensor", "vocab"))


@pytest.fixture(scope="module")
def model():
    return TransformerLM(TransformerConfig("llama", **CONFIG), key=jax.random.key(0))


def named_specs(specs):
    leaves = jax.tree_util.tree_leaves_with_path(
        specs, is_leaf=lambda x: isinstance(x, P)
    )
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): spec
        for path, spec in leaves
    }


def test_rules_give_every_leaf_its_layout(model):
    rules = sharding_rules(data="data", tensor="tensor", vocab="vocab")
    specs = named_specs(model_partition_specs(model, MESH, rules))
    assert specs == {
        "embedding.embedding.weight": P(("vocab",), None),
        "blocks.attention_norm.weight": P(None, None),
        "blocks.attention.query_proj.weight": P(None, ("tensor",), None),
        "blocks.attention.key_proj.weight": P(None, ("tensor",), None),
        "blocks.attention.value_proj.weight": P(None, ("tensor",), None),
        "blocks.attention.output_proj.weight": P(None, None, ("tensor",)),
        "blocks.mlp_norm.weight": P(None, None),
        "blocks.mlp.gate.weight": P(None, ("tensor",), None),
        "blocks.mlp.up.weight": P(None, ("tensor",), None),
        "blocks.mlp.down.weight": P(None, None, ("tensor",)),
        "final_norm.weight": P(None),
        # RoPE tables: replicated.
        "rope.cos_bits": P(None, None),
        "rope.sin_bits": P(None, None),
    }
    fsdp = named_specs(
        model_partition_specs(
            model,
            AbstractMesh((2, 2, 2), ("data", "fsdp", "vocab")),
            sharding_rules(data="data", fsdp="fsdp", vocab="vocab"),
        )
    )
    assert fsdp["embedding.embedding.weight"] == P(("vocab",), ("fsdp",))
    assert fsdp["blocks.mlp.down.weight"] == P(None, ("fsdp",), None)


def test_a_mesh_axis_that_does_not_exist_is_named(model):
    rules = sharding_rules(data="data", tensor="model", vocab="vocab")
    with pytest.raises(
        ValueError,
        match=r"blocks\.attention\.query_proj\.weight names the mesh axis 'model'",
    ):
        model_partition_specs(model, MESH, rules)


def test_a_rule_the_sizes_cannot_express_is_named(model):
    odd = TransformerLM(
        TransformerConfig("llama", **{**CONFIG, "vocab_size": 63}),
        key=jax.random.key(0),
    )
    rules = sharding_rules(data="data", vocab="vocab")
    with pytest.raises(
        ValueError,
        match=r"embedding\.embedding\.weight has 63 entries along its 'vocab' axis, "
        r"which its 2 devices",
    ):
        model_partition_specs(odd, MESH, rules)
    twice = {**rules, "embed": ("vocab",)}
    with pytest.raises(ValueError, match=r"over the mesh axis 'vocab' twice"):
        model_partition_specs(model, MESH, twice)
    with pytest.raises(ValueError, match=r"no entry for the logical axis 'mlp'"):
        model_partition_specs(
            model, MESH, {k: v for k, v in rules.items() if k != "mlp"}
        )


def test_a_batch_split_over_the_vocabulary_axis_is_refused():
    rules = sharding_rules(data=("data", "vocab"), vocab="vocab")
    tokens = jax.numpy.zeros((8, 4), jax.numpy.int32)
    with pytest.raises(
        ValueError,
        match=r"batch\['tokens'\] cannot be split over the mesh axes \['vocab'\]",
    ):
        # Refused before anything is placed: one device shows it.
        shard_batch(
            dict(tokens=tokens), jax.make_mesh((1, 1), ("data", "vocab")), rules
        )


TRAINING = """
import json
import equinox as eqx
import jax
import numpy as np
import optax
from jax.sharding import AxisType
import eqx_embed as ee

config = ee.TransformerConfig("llama", **{config})
model = ee.TransformerLM(config, key=jax.random.key(0))
tokens = np.random.default_rng(0).integers(0, 64, (20, 8, 9)).astype(np.int32)
optimizer = optax.adam(1e-2)


@eqx.filter_jit
def step(model, state, batch, mean):
    def loss(model):
        if mean:  # the batch's tokens flattened into one fused reduction
            return model.mean_loss(batch[:, :-1], batch[:, 1:])
        return jax.vmap(model.loss)(batch[:, :-1], batch[:, 1:]).mean()

    value, grads = eqx.filter_value_and_grad(loss)(model)
    updates, state = optimizer.update(
        grads, state, eqx.filter(model, eqx.is_inexact_array)
    )
    return eqx.apply_updates(model, updates), state, value


def train(model, place, mean=False):
    state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    losses = []
    for batch in tokens:
        model, state, value = step(model, state, place(batch), mean)
        losses.append(float(value))
    return losses


results = dict(one_device=train(model, lambda batch: batch))
for second in ("tensor", "fsdp"):
    mesh = jax.make_mesh((2, 2, 2), ("data", second, "vocab"))
    assert mesh.axis_types == (AxisType.Explicit,) * 3
    rules = ee.sharding_rules(data="data", vocab="vocab", **{{second: second}})
    with jax.set_mesh(mesh):
        # The two lines a user writes.
        sharded = ee.shard_model(model, mesh, rules)
        place = lambda b: ee.shard_batch(b, mesh, rules)  # noqa: E731
        results[second] = train(sharded, place)
        results[f"{{second}}, mean_loss"] = train(sharded, place, mean=True)
print(json.dumps(results))
"""


def test_training_on_a_mesh_follows_one_device(run_on_devices):
    results = run_on_devices(TRAINING.format(config=CONFIG))
    reference = results.pop("one_device")
    assert len(reference) == 20 and reference[-1] < reference[0]
    for layout, losses in results.items():
        assert (
            max(abs(a - b) for a, b in zip(losses, reference, strict=True)) <= 1e-5
        ), layout
