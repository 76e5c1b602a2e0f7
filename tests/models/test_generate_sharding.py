"""Generation on a model sharded by every kind of rule `sharding_rules` makes, on 8
CPU devices, against the same model on one device."""

import pytest

GENERATION = """
import json
import jax
import numpy as np
import eqx_embed as ee

config = ee.TransformerConfig(
    "gemma2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=3,
    max_position_embeddings=32,
)
model = ee.TransformerLM(config, key=jax.random.key(0))
prompts = np.random.default_rng(0).integers(0, 64, (4, 5)).astype(np.int32)
lengths = np.array([5, 2, 3, 4], np.int32)


def run(model):
    tokens = model.generate(prompts, prompt_lengths=lengths, max_new_tokens=6)
    return np.asarray(tokens).tolist()


results = dict(one_device=run(model))
layouts = {layouts}
for name, rules in layouts.items():
    axes = tuple(rules.values())
    mesh = jax.make_mesh({{1: (8,), 3: (2, 2, 2)}}[len(axes)], axes)
    with jax.set_mesh(mesh):
        results[name] = run(ee.shard_model(model, mesh, ee.sharding_rules(**rules)))
print(json.dumps(results))
"""
LAYOUTS = {
    "data": dict(data="data"),
    "vocab": dict(vocab="vocab"),
    "tensor": dict(tensor="tensor"),
    "fsdp": dict(fsdp="fsdp"),
    "fsdp, tensor, vocab": dict(fsdp="fsdp", tensor="tensor", vocab="vocab"),
}


@pytest.fixture(scope="module")
def results(run_on_devices):
    return run_on_devices(GENERATION.format(layouts=LAYOUTS))


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_generation_on_a_mesh_follows_one_device(layout, results):
    # Greedy tokens: the prefill, every decode step and the loop, on the mesh.
    assert results[layout] == results["one_device"]
