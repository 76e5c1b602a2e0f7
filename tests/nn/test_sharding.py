"""The core modules on tables and batches sharded over a mesh of 8 CPU devices.

Each check runs in a subprocess (the device count is fixed when JAX starts): the
same jitted lookup, decode, fused loss, log-sum-exp and their gradients run once on
one device and once under `jax.set_mesh`, and must agree.
"""

import numpy as np
import pytest
from _tolerances import matmul_tolerance

VOCAB, WIDTH = 64, 16
# The sharded programs reduce in another order: float32 rounding, grown with the
# longest reduction (the vocabulary).
TOLERANCE = 2 * np.finfo(np.float32).eps * np.sqrt(VOCAB)

MODULES = f"""
import json
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import eqx_embed as ee

VOCAB, WIDTH, BATCH, SEQ = {VOCAB}, {WIDTH}, 4, 6
"""

CORE = (
    MODULES
    + """
rng = np.random.default_rng(0)
ids = rng.integers(-VOCAB, VOCAB, (BATCH, SEQ)).astype(np.int32)
ids[1, 2] = VOCAB + 3  # out of range: a row of NaNs
ids[2, 0] = 5  # the padding row: zeros
targets = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
where = rng.random((BATCH, SEQ)) > 0.3
targets[0, 1], where[0, 1] = -100, False  # ignored, even out of range
hidden = rng.standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32)


@eqx.filter_jit
def everything(model, ids, hidden, targets, where):
    def loss(model_and_hidden):
        model, hidden = model_and_hidden
        losses = jax.vmap(
            lambda h, t, w: model.cross_entropy(
                h, t, where=w, z_loss=1e-2, block_size=8
            )
        )(hidden, targets, where)
        return losses.sum(), losses

    (_, losses), (grads, d_hidden) = eqx.filter_value_and_grad(
        loss, has_aux=True
    )((model, hidden))
    reverse = grads.reverse_embedding or grads.embedding
    return dict(
        lookup=jax.vmap(jax.vmap(model))(ids),
        decode=jax.vmap(jax.vmap(model.decode))(hidden),
        loss=losses,
        log_sum_exp=jax.vmap(lambda h: model.log_sum_exp(h, block_size=8))(hidden),
        grad_hidden=d_hidden,
        grad_table=grads.embedding.weight,
        grad_reverse_table=reverse.weight,
    )


def run(model, *args):
    return {k: np.asarray(v) for k, v in everything(model, *args).items()}


results = {}
for tied in (True, False):
    model = ee.ReversibleEmbedding(
        VOCAB, WIDTH, tie_weights=tied, logit_soft_cap=3.0, padding_idx=5,
        key=jax.random.key(1),
    )
    reference = run(model, ids, hidden, targets, where)
    for axis_type in ("Explicit", "Auto"):
        mesh = jax.make_mesh(
            (2, 4), ("data", "vocab"), axis_types=(getattr(AxisType, axis_type),) * 2
        )
        for split in ("vocabulary", "embedding"):
            spec = P("vocab", None) if split == "vocabulary" else P(None, "vocab")
            with jax.set_mesh(mesh):
                sharded = jax.tree.map(lambda x: jax.device_put(x, spec), model)
                args = [
                    jax.device_put(a, P("data")) for a in (ids, hidden, targets, where)
                ]
                got = run(sharded, *args)
            results[f"{tied}-{axis_type}-{split}"] = {
                name: dict(
                    same_nans=bool(
                        np.array_equal(np.isnan(got[name]), np.isnan(want))
                    ),
                    relative_error=float(
                        np.nanmax(np.abs(got[name] - want))
                        / max(np.nanmax(np.abs(want)), np.finfo(np.float32).tiny)
                    ),
                    nans=int(np.isnan(want).sum()),
                )
                for name, want in reference.items()
            }
print(json.dumps(results))
"""
)


@pytest.fixture(scope="module")
def core_results(run_on_devices):
    return run_on_devices(CORE)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
@pytest.mark.parametrize("split", ["vocabulary", "embedding"])
def test_sharded_values_and_gradients_match_one_device(
    core_results, tied, axis_type, split
):
    results = core_results[f"{tied}-{axis_type}-{split}"]
    assert set(results) == {
        "lookup",
        "decode",
        "loss",
        "log_sum_exp",
        "grad_hidden",
        "grad_table",
        "grad_reverse_table",
    }
    # The out-of-range id reads a row of NaNs on one device and on the mesh.
    assert results["lookup"]["nans"] == WIDTH
    for name, result in results.items():
        assert result["same_nans"], name
        assert result["relative_error"] <= TOLERANCE, (name, result)


COLLECTIVES = (
    MODULES
    + """
import re

# A table larger than the batch's activations, as in practice, so that a gathered
# shard stands out from the gathered per-token values.
VOCAB = 1024
mesh = jax.make_mesh((2, 4), ("data", "vocab"))
model = ee.ReversibleEmbedding(VOCAB, WIDTH, logit_soft_cap=3.0, key=jax.random.key(0))


def step(model, ids, targets):
    def loss(model):
        hidden = jax.vmap(jax.vmap(model))(ids)
        logits = jax.vmap(jax.vmap(model.decode))(hidden)
        losses = jax.vmap(lambda h, t: model.cross_entropy(h, t, block_size=64))(
            hidden, targets
        )
        return losses.sum() + logits.mean()

    return eqx.filter_value_and_grad(loss)(model)


BYTES = dict(f32=4, s32=4, bf16=2, pred=1)
with jax.set_mesh(mesh):
    model = jax.tree.map(lambda x: jax.device_put(x, P("vocab", None)), model)
    ids = jax.device_put(np.ones((8, 4), np.int32), P("data"))
    text = jax.jit(step).lower(model, ids, ids).compile().as_text()
gathers = []
for line in text.splitlines():
    match = re.search(r"= (\\w+)\\[([\\d,]*)\\][^ ]* all-gather", line)
    if match:
        dims = [int(d) for d in match.group(2).split(",") if d]
        gathers.append(BYTES[match.group(1)] * int(np.prod(dims)))
collective = r" (all-gather|all-reduce|all-to-all|reduce-scatter)\\("
kinds = sorted(set(re.findall(collective, text)))
shard_bytes = VOCAB // 4 * WIDTH * 4
print(json.dumps(dict(gathers=gathers, kinds=kinds, shard_bytes=shard_bytes)))
"""
)


def test_vocab_parallel_programs_never_gather_a_table_shard(run_on_devices):
    result = run_on_devices(COLLECTIVES)
    # The rows and the per-token scalars travel in all-reduces; nothing as large as
    # a shard of the table is ever gathered.
    assert "all-reduce" in result["kinds"], result
    assert all(size < result["shard_bytes"] for size in result["gathers"]), result


SHARED_TARGETS = (
    MODULES
    + """
rng = np.random.default_rng(0)
hidden = rng.standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32)
targets = rng.integers(0, VOCAB, SEQ).astype(np.int32)
table = rng.standard_normal((VOCAB, WIDTH)).astype(np.float32)


@eqx.filter_jit
def losses(embedding, hidden, targets):
    # The targets do not vary over the vmap, whose batch is split over "data".
    decode = ee.EmbeddingDecode(embedding)
    return jax.vmap(lambda h: decode.cross_entropy(h, targets, block_size=8))(hidden)


mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(AxisType.Explicit,) * 2)
strict = ee.Embedding(weight=jnp.asarray(table), out_of_range="error")
with jax.set_mesh(mesh):
    got = losses(strict, jax.device_put(hidden, P("data")), jnp.asarray(targets))
print(json.dumps(dict(losses=np.asarray(got).tolist())))
"""
)


def test_shared_targets_under_the_error_policy_give_the_losses(run_on_devices):
    """The `"error"` policy on a mesh, for targets that do not vary over a `vmap`
    whose batch is split over an explicit mesh axis: valid targets give NumPy's
    losses in float64."""
    result = run_on_devices(SHARED_TARGETS)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((4, 6, WIDTH))
    targets = rng.integers(0, VOCAB, 6)
    table = rng.standard_normal((VOCAB, WIDTH))
    logits = (
        hidden.astype(np.float32).astype(np.float64)
        @ table.astype(np.float32).astype(np.float64).T
    )
    top = logits.max(axis=-1, keepdims=True)
    log_sum_exp = (top + np.log(np.exp(logits - top).sum(axis=-1, keepdims=True)))[
        ..., 0
    ]
    expected = (
        log_sum_exp
        - np.take_along_axis(
            logits, np.broadcast_to(targets, (4, 6))[..., None], axis=-1
        )[..., 0]
    )
    # One device's losses and these are different programs: the bound of a product
    # over the width, then the log-sum-exp over the vocabulary.
    bound = matmul_tolerance(
        hidden.astype(np.float32), table.astype(np.float32), after=VOCAB + 8
    )
    np.testing.assert_allclose(
        result["losses"], expected, rtol=bound["rtol"], atol=bound["atol"]
    )
