"""The fused losses under auto mesh axes (as most JAX code and MaxText set them), on
8 CPU devices (one subprocess): a model sharded by `shard_model` records its
table's vocabulary axis, so that `loss` and `mean_loss` walk each shard of the
table instead of gathering it (no all-gather of the table in the compiled step) and
equal one device; a table whose layout is not known warns once, naming the recipe.
"""

import numpy as np
import pytest
from _tolerances import tolerance

VOCAB, WIDTH = 8192, 16

SNIPPET = f"""
import json
import re
import warnings

import equinox as eqx
import jax
import numpy as np
from jax.sharding import AxisType

import eqx_embed as ee

VOCAB, WIDTH = {VOCAB}, {WIDTH}
config = ee.TransformerConfig(
    "llama", vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=32,
    num_layers=1, num_heads=2, num_kv_heads=1, max_position_embeddings=8,
)
model = ee.TransformerLM(config, key=jax.random.key(0))
rng = np.random.default_rng(0)
tokens = rng.integers(0, VOCAB, (4, 6)).astype(np.int32)
targets = np.roll(tokens, -1, 1)


def gathers(text):
    sizes = []
    for line in text.splitlines():
        match = re.search(r"= f32\\[([\\d,]*)\\][^ ]* all-gather", line)
        if match:
            sizes.append(4 * int(np.prod([int(d) for d in match.group(1).split(",")])))
    return sizes


def mean(model, tokens, targets):
    return model.mean_loss(tokens, targets, label_smoothing=0.1)


def per_token(model, tokens, targets):
    return jax.vmap(model.loss)(tokens, targets).mean()


def step(loss, model, *batch):
    arrays, static = eqx.partition(model, eqx.is_array)
    program = jax.jit(
        lambda a, *b: eqx.filter_value_and_grad(loss)(eqx.combine(a, static), *b)
    )
    compiled = program.lower(arrays, *batch).compile()
    values = [np.asarray(x) for x in jax.tree.leaves(compiled(arrays, *batch))]
    return values, compiled.as_text()


auto = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(AxisType.Auto,) * 2)
rules = ee.sharding_rules(data="data", vocab="vocab")
results = {{}}
for name, loss in (("mean", mean), ("per_token", per_token)):
    want, _ = step(loss, model, tokens, targets)
    with jax.set_mesh(auto):
        sharded = ee.shard_model(model, auto, rules)
        results["recorded"] = sharded.embedding.embedding.vocab_axes
        got, text = step(loss, sharded, *ee.shard_batch((tokens, targets), auto, rules))
    results[name] = max(
        float(np.max(np.abs(g - w)) / max(np.max(np.abs(w)), 1e-30))
        for g, w in zip(got, want)
    )
    results[name + "_gathers"] = gathers(text)
# A table whose layout is not known (the unsharded model): one warning, two calls.
with jax.set_mesh(auto), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):  # traced only: the warning comes while tracing
        jax.eval_shape(per_token, model, tokens, targets)
results["warnings"] = [str(w.message) for w in caught]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(run_on_devices):
    return run_on_devices(SNIPPET)


def test_shard_model_records_the_vocabulary_axis(results):
    assert results["recorded"] == ["vocab"]


@pytest.mark.parametrize("loss", ["mean", "per_token"])
def test_auto_axes_walk_the_shards_without_gathering_the_table(results, loss):
    # Any all-gather in the step is far smaller than one shard of the table.
    shard = VOCAB // 4 * WIDTH * 4
    assert all(size < shard for size in results[loss + "_gathers"]), results
    # The same sums in another order: the vocabulary's log-sum-exp, the widths.
    assert results[loss] <= tolerance(np.float32, VOCAB + 4 * WIDTH)["rtol"], results


def test_an_unknown_layout_under_auto_axes_warns_once_naming_the_recipe(results):
    (message,) = results["warnings"]
    assert "jax.sharding.explicit_axes" in message and "shard_model" in message
