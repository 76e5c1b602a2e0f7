"""The vocabulary-parallel fused loss on 8 CPU devices (one subprocess): tokens split
over a data axis without `jax.vmap` (and never gathered), the reduced loss
(`mean_cross_entropy`), label smoothing and `ignore_index` (equal to one device,
which equals torch: `test_loss_controls.py`), auto mesh axes made explicit with
`jax.sharding.explicit_axes`, and the per-device temporaries of the compiled loss
with gradients against one device's.
"""

import numpy as np
import pytest
from _tolerances import tolerance

VOCAB, WIDTH, TOKENS = 64, 16, 24

SNIPPET = f"""
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_embed as ee

VOCAB, WIDTH, TOKENS = {VOCAB}, {WIDTH}, {TOKENS}
rng = np.random.default_rng(0)
table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)
hidden = rng.standard_normal((TOKENS, WIDTH)).astype(np.float32)
targets = rng.integers(0, VOCAB, TOKENS).astype(np.int32)
where = rng.random(TOKENS) > 0.3


def decoder(table):
    return ee.EmbeddingDecode(ee.Embedding(weight=table), logit_soft_cap=3.0)


def per_token(table, hidden, targets, where):
    losses = decoder(table).cross_entropy(
        hidden, targets, where=where, z_loss=1e-2, block_size=8
    )
    return jnp.sum(losses * jnp.arange(TOKENS)), losses


def reduced(table, hidden, targets, where):
    loss = decoder(table).mean_cross_entropy(hidden, targets, where=where, z_loss=1e-2)
    return loss, loss


SMOOTHING = dict(label_smoothing=0.1, ignore_index=-100)


def smoothed(table, hidden, targets, where):
    losses = decoder(table).cross_entropy(
        hidden, targets, where=where, block_size=8, **SMOOTHING
    )
    return jnp.sum(losses * jnp.arange(TOKENS)), losses


def smoothed_reduced(table, hidden, targets, where):
    loss = decoder(table).mean_cross_entropy(hidden, targets, where=where, **SMOOTHING)
    return loss, loss


def gathers(text):
    sizes = []
    for line in text.splitlines():
        match = re.search(r"= f32\\[([\\d,]*)\\][^ ]* all-gather", line)
        if match:
            sizes.append(4 * int(np.prod([int(d) for d in match.group(1).split(",")])))
    return sizes


def run(function, *args):
    program = jax.jit(jax.value_and_grad(function, argnums=(0, 1), has_aux=True))
    (_, value), grads = program(*args)
    return [np.asarray(x) for x in (value, *grads)], program.lower(*args)


def relative_errors(got, want):
    return [
        float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want)
    ]


results = {{}}
arrays = (table, hidden, targets, where)
ignored = (table, hidden, np.where(np.arange(TOKENS) % 5 == 0, -100, targets), where)
for name, function, arrays in (
    ("per_token", per_token, arrays),
    ("reduced", reduced, arrays),
    ("smoothed", smoothed, ignored),
    ("smoothed_reduced", smoothed_reduced, ignored),
):
    want, _ = run(function, *arrays)
    with jax.set_mesh(jax.make_mesh((2, 4), ("data", "vocab"))):
        placed = [jax.device_put(table, P("vocab", None))]
        placed += [jax.device_put(a, P("data")) for a in arrays[1:]]
        got, lowered = run(function, *placed)
    results[name] = relative_errors(got, want)
    results[name + "_gathers"] = gathers(lowered.compile().as_text())

# Auto axes: the layout is not in the types; `explicit_axes` states it for the loss.
arrays = (table, hidden, targets, where)
auto = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(AxisType.Auto,) * 2)
in_sharding = (P("vocab", None), P("data"), P("data"), P("data"))
want, _ = run(per_token, *arrays)
with jax.set_mesh(auto):
    placed = [jax.device_put(a, s) for a, s in zip(arrays, in_sharding)]
    explicit = jax.sharding.explicit_axes(
        per_token, axes=("data", "vocab"), in_sharding=in_sharding
    )
    results["auto_explicit_axes"] = relative_errors(run(explicit, *placed)[0], want)
    # A table larger than the tokens' arrays, as in practice, so that a gathered
    # shard stands out from gathered per-token values.
    placed[0] = jax.device_put(np.ones((1024, WIDTH), np.float32), P("vocab", None))
    text = (
        jax.jit(jax.grad(explicit, argnums=(0, 1), has_aux=True))
        .lower(*placed)
        .compile()
        .as_text()
    )
results["auto_gathers"] = gathers(text)
results["shard_bytes"] = 1024 // 4 * WIDTH * 4


# Compile only: per-device temporaries of the loss with gradients, 8 shards vs one.
def mean_loss(table, hidden, targets):
    return decoder(table).cross_entropy(hidden, targets).mean()


def temporaries(mesh, tokens=1024, width=256, vocab=16384):
    def shaped(shape, dtype, spec):
        sharding = None if mesh is None else NamedSharding(mesh, spec)
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    args = (
        shaped((vocab, width), jnp.float32, P("vocab", None)),
        shaped((tokens, width), jnp.float32, P()),
        shaped((tokens,), jnp.int32, P()),
    )
    compiled = jax.jit(jax.value_and_grad(mean_loss, (0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


one = temporaries(None)
vocab_mesh = jax.make_mesh((8,), ("vocab",))
with jax.set_mesh(vocab_mesh):
    results["temporaries"] = [one, temporaries(vocab_mesh)]
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def results(run_on_devices):
    return run_on_devices(SNIPPET)


# Another order of the same sums: the worst case over the longest reduction (the
# vocabulary's log-sum-exp, then the width's dot products and a few elementwise).
BOUND = tolerance(np.float32, VOCAB + WIDTH + 8)["rtol"]


@pytest.mark.parametrize(
    "loss",
    ["per_token", "reduced", "smoothed", "smoothed_reduced", "auto_explicit_axes"],
)
def test_vocab_parallel_loss_and_gradients_match_one_device(results, loss):
    value, grad_table, grad_hidden = results[loss]
    assert value <= BOUND and grad_table <= BOUND and grad_hidden <= BOUND, results


@pytest.mark.parametrize("loss", ["per_token", "reduced", "smoothed"])
def test_tokens_split_over_a_data_axis_are_never_gathered(results, loss):
    # Each device of the data axis keeps its own tokens: only per-token scalars
    # (the targets) may travel whole, never the hidden states.
    assert all(size < TOKENS * WIDTH * 4 for size in results[loss + "_gathers"])


def test_auto_axes_made_explicit_never_gather_a_table_shard(results):
    assert all(size < results["shard_bytes"] for size in results["auto_gathers"])


def test_loss_temporaries_per_device_are_at_most_a_quarter_of_one_device(results):
    one, sharded = results["temporaries"]
    assert sharded <= one / 4, (one, sharded)
