"""Bad input on a mesh of 8 CPU devices: out-of-range ids under `out_of_range="error"`
raise at once on every layout (never a hang at a collective), and layouts the modules
cannot serve are refused with a ValueError naming the axis and the array.

All the multi-device cases run in one subprocess; each call there is timed, since a
device left waiting at a collective shows as a 40-second stall and an abort.
"""

import inspect

import jax
import numpy as np
import pytest
from _tolerances import tolerance

import eqx_embed as ee

VOCAB, WIDTH, BATCH, SEQ = 64, 16, 8, 6
# A stalled collective gives up after 40 s on CPU; a prompt error, once compiled,
# takes hundredths of a second: 10 s leaves room for a loaded machine.
PROMPT_SECONDS = 10

ERRORS = f"""
import json
import re
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

import eqx_embed as ee

VOCAB, WIDTH, BATCH, SEQ = {VOCAB}, {WIDTH}, {BATCH}, {SEQ}


def attempt(function, *args):
    start = time.perf_counter()
    try:
        jax.block_until_ready(function(*args))
        raised, message = None, ""
    except Exception as error:
        raised, message = type(error).__name__, str(error)
    # Under eqx.filter_jit the message sits among the stack's lines.
    lines = [line for line in message.splitlines() if "out of range" in line]
    return dict(
        raised=raised,
        message=lines[0] if lines else message[:600],
        seconds=time.perf_counter() - start,
    )


rng = np.random.default_rng(0)
good_ids = rng.integers(0, VOCAB, (BATCH, SEQ)).astype(np.int32)
# Two bad ids on different data shards: the message names the largest.
bad_ids = good_ids.copy()
bad_ids[0, 1], bad_ids[7, 4] = VOCAB + 3, VOCAB + 9
hidden = rng.standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32)


# One program per layout (compiles are the cost here), run once with every input
# good and once with each kind of bad id.
@eqx.filter_jit
def lookup_and_losses(model, ids, targets, mean_targets, hidden):
    outputs = dict(
        lookup=jax.vmap(jax.vmap(model))(ids),
        cross_entropy=jax.vmap(model.cross_entropy)(hidden, targets),
    )
    outputs["mean_cross_entropy"] = jax.vmap(model.mean_cross_entropy)(
        hidden, mean_targets
    )
    return outputs


results = {{}}
model = ee.ReversibleEmbedding(
    VOCAB, WIDTH, out_of_range="error", key=jax.random.key(0)
)
tables = dict(vocabulary=P("vocab", None), embedding=P(None, "vocab"), replicated=P())
for axis_type in ("Explicit", "Auto"):
    mesh = jax.make_mesh(
        (2, 4), ("data", "vocab"), axis_types=(getattr(AxisType, axis_type),) * 2
    )
    with jax.set_mesh(mesh):
        on_data = (good_ids, bad_ids, hidden)
        good, bad, h = (jax.device_put(a, P("data")) for a in on_data)
        for layout, spec in tables.items():
            sharded = jax.tree.map(lambda x: jax.device_put(x, spec), model)

            def run(*ids):
                return attempt(
                    lambda: lookup_and_losses(sharded, *ids, h)
                )

            case = f"{{axis_type}}-{{layout}}"
            results[f"{{case}}-compiled"] = run(good, good, good)
            results[f"{{case}}-lookup"] = run(bad, good, good)
            results[f"{{case}}-cross_entropy"] = run(good, bad, good)
            results[f"{{case}}-mean_cross_entropy"] = run(good, good, bad)
            # The same program still runs after the errors.
            results[f"{{case}}-good"] = run(good, good, good)
            if layout == "vocabulary" and axis_type == "Explicit":
                # Outside jit: jax.vmap's op-by-op programs run on the mesh too.
                results[f"{{case}}-eager"] = attempt(
                    lambda: jax.vmap(jax.vmap(sharded))(bad)
                )

config = ee.TransformerConfig(
    "llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_layers=1,
    num_heads=2, max_position_embeddings=SEQ, out_of_range="error",
)
transformer = ee.TransformerLM(config, key=jax.random.key(1))


@eqx.filter_jit
def loss(model, tokens, targets):
    return jax.vmap(model.loss)(tokens, targets)


mesh = jax.make_mesh((2, 4), ("data", "model"))
layouts = dict(
    vocabulary=dict(data="data", vocab="model"),
    # The table split over its embedding axis, as FSDP splits every weight.
    embedding=dict(data="data", fsdp="model"),
)
with jax.set_mesh(mesh):
    for layout, axes in layouts.items():
        rules = ee.sharding_rules(**axes)
        sharded = ee.shard_model(transformer, mesh, rules)
        good, bad = (ee.shard_batch(a, mesh, rules) for a in (good_ids, bad_ids))
        case = f"transformer-{{layout}}"
        results[f"{{case}}-compiled"] = attempt(loss, sharded, good, good)
        results[f"{{case}}-tokens"] = attempt(loss, sharded, bad, good)
        results[f"{{case}}-targets"] = attempt(loss, sharded, good, bad)
        results[f"{{case}}-good"] = attempt(loss, sharded, good, good)
        # Eagerly, ids known now raise a ValueError at once (the model stays eager
        # under "error").
        results[f"{{case}}-eager"] = attempt(
            lambda: sharded.loss(bad_ids[7], good_ids[7])
        )

# Layouts the decode and the fused loss cannot serve, refused while tracing.
@eqx.filter_jit
def cross_entropy(model, targets, hidden):
    return jax.vmap(model.cross_entropy)(hidden, targets)


@eqx.filter_jit
def decode(model, hidden):
    return jax.vmap(jax.vmap(model.decode))(hidden)


@eqx.filter_jit
def flat_loss(model, hidden, targets):
    return model.cross_entropy(hidden, targets)


@eqx.filter_jit
def flat_log_sum_exp(model, hidden):
    return model.log_sum_exp(hidden)


mesh = jax.make_mesh((2, 4), ("data", "vocab"))
flat_hidden = hidden.reshape(BATCH * SEQ, WIDTH)
flat_targets = good_ids.reshape(BATCH * SEQ)
with jax.set_mesh(mesh):
    on_vocab = jax.tree.map(lambda x: jax.device_put(x, P("vocab", None)), model)
    on_both = jax.tree.map(lambda x: jax.device_put(x, P(("data", "vocab"))), model)
    replicated = jax.tree.map(lambda x: jax.device_put(x, P()), model)
    batch_on_vocab = [jax.device_put(a, P("vocab")) for a in (hidden, good_ids)]
    batch_on_data = [jax.device_put(a, P("data")) for a in (hidden, good_ids)]
    results["layout-batch-on-vocab-loss"] = attempt(
        cross_entropy, on_vocab, batch_on_vocab[1], batch_on_vocab[0]
    )
    results["layout-batch-on-vocab-decode"] = attempt(
        decode, on_vocab, batch_on_vocab[0]
    )
    results["layout-vocab-on-data-loss"] = attempt(
        cross_entropy, on_both, batch_on_data[1], batch_on_data[0]
    )
    results["layout-vocab-on-data-decode"] = attempt(decode, on_both, batch_on_data[0])

# Tokens split over a mesh axis in one call are served, whatever the table's layout:
# values and gradients as on one device.
@eqx.filter_jit
def flat_outputs(model, hidden, targets):
    def total(model, hidden):
        return model.cross_entropy(hidden, targets).sum()

    return dict(
        cross_entropy=model.cross_entropy(hidden, targets),
        log_sum_exp=model.log_sum_exp(hidden),
        mean_cross_entropy=model.mean_cross_entropy(hidden, targets),
        gradients=eqx.filter_grad(total)(model, hidden),
    )


expected = flat_outputs(model, jnp.asarray(flat_hidden), jnp.asarray(flat_targets))
with jax.set_mesh(mesh):
    for layout, spec in tables.items():
        sharded = jax.tree.map(lambda x: jax.device_put(x, spec), model)
        for split in ("both", "hidden", "targets"):
            hidden_spec = P() if split == "targets" else P("data")
            targets_spec = P() if split == "hidden" else P("data")
            got = flat_outputs(
                sharded,
                jax.device_put(flat_hidden, hidden_spec),
                jax.device_put(flat_targets, targets_spec),
            )
            results[f"split-tokens-{{layout}}-{{split}}"] = {{
                name: max(
                    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                    for a, b in zip(
                        jax.tree.leaves(got[name]),
                        jax.tree.leaves(expected[name]),
                        strict=True,
                    )
                )
                for name in expected
            }}

# The "nan" policy costs no collective: the lookup of a vocabulary-split table
# all-reduces its rows, and nothing else.
nan_model = ee.ReversibleEmbedding(VOCAB, WIDTH, key=jax.random.key(0))
for axis_type in ("Explicit", "Auto"):
    mesh = jax.make_mesh(
        (2, 4), ("data", "vocab"), axis_types=(getattr(AxisType, axis_type),) * 2
    )
    with jax.set_mesh(mesh):
        sharded = jax.tree.map(lambda x: jax.device_put(x, P("vocab", None)), nan_model)
        ids = jax.device_put(good_ids, P("data"))
        lookup = jax.jit(lambda model, ids: jax.vmap(jax.vmap(model))(ids))
        text = lookup.lower(sharded, ids).compile().as_text()
    results[f"nan-{{axis_type}}"] = re.findall(
        r"= (\\S+) (?:all-gather|all-reduce|all-to-all|reduce-scatter|"
        r"collective-permute)(?:-start)?\\(",
        text,
    )
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def error_results(run_on_devices):
    return run_on_devices(ERRORS, timeout=600)


NAMES = {
    "lookup": "token id",
    "cross_entropy": "target",
    "mean_cross_entropy": "target",
    "tokens": "token id",
    "targets": "target",
}


def _cases():
    for axis_type in ("Explicit", "Auto"):
        for layout in ("vocabulary", "embedding", "replicated"):
            for call in ("lookup", "cross_entropy", "mean_cross_entropy"):
                yield f"{axis_type}-{layout}-{call}"
    for layout in ("vocabulary", "embedding"):
        for call in ("tokens", "targets"):
            yield f"transformer-{layout}-{call}"


@pytest.mark.parametrize("case", list(_cases()))
def test_an_out_of_range_id_raises_promptly_on_every_device_layout(error_results, case):
    layout, call = case.rsplit("-", 1)
    assert error_results[f"{layout}-compiled"]["raised"] is None
    bad = error_results[case]
    # Equinox's runtime error under eqx.filter_jit, naming the largest bad id (found
    # on another data shard than the first) and the table size.
    assert bad["raised"] == "EquinoxRuntimeError", bad
    expected = f"{NAMES[call]} {VOCAB + 9} is out of range for a table of {VOCAB} rows"
    assert expected in bad["message"], bad
    assert bad["seconds"] < PROMPT_SECONDS, bad
    # The same program still runs after the errors.
    assert error_results[f"{layout}-good"]["raised"] is None


@pytest.mark.parametrize(
    "case, error, name",
    [
        ("Explicit-vocabulary-eager", "JaxRuntimeError", "token id"),
        ("transformer-vocabulary-eager", "ValueError", "token id"),
        ("transformer-embedding-eager", "ValueError", "token id"),
    ],
)
def test_an_out_of_range_id_raises_outside_jit_on_a_mesh(
    error_results, case, error, name
):
    result = error_results[case]
    # Outside jit the runtime error is JAX's, its text holding Equinox's message.
    assert result["raised"] == error, result
    expected = f"{name} {VOCAB + 9} is out of range for a table of {VOCAB} rows"
    assert expected in result["message"], result


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_the_nan_policy_adds_no_collective(error_results, axis_type):
    # One all-reduce of the looked-up rows (float32; a data shard holds half the
    # batch), and no reduction of a predicate or a bad id.
    rows = f"f32[{BATCH // 2},{SEQ},{WIDTH}]"
    collectives = error_results[f"nan-{axis_type}"]
    assert [shape.split("{")[0] for shape in collectives] == [rows], collectives


LAYOUTS = {
    # A batch split over the mesh axis that splits the table's rows.
    "batch-on-vocab-loss": ("cross_entropy", "hidden", "'vocab', which also splits"),
    "batch-on-vocab-decode": ("__call__", "hidden", "'vocab', which also splits"),
    "vocab-on-data-loss": ("cross_entropy", "hidden", "'data', which also splits"),
    "vocab-on-data-decode": ("__call__", "hidden", "'data', which also splits"),
}


@pytest.mark.parametrize("case", list(LAYOUTS))
def test_a_layout_the_modules_cannot_serve_is_named(error_results, case):
    method, array, axis = LAYOUTS[case]
    result = error_results[f"layout-{case}"]
    assert result["raised"] == "ValueError", result
    assert result["message"].startswith(f"EmbeddingDecode.{method}: {array} is "), (
        result
    )
    assert "split over the mesh ax" in result["message"], result
    assert axis in result["message"], result


def _one_layer_model() -> ee.TransformerLM:
    config = ee.TransformerConfig(
        "llama",
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
    )
    return ee.TransformerLM(config, key=jax.random.key(0))


def test_a_mesh_axis_that_does_not_exist_is_named_for_models_and_batches():
    model = _one_layer_model()
    mesh = jax.make_mesh((1, 1), ("data", "vocab"))
    with pytest.raises(
        ValueError,
        match=r"embedding\.embedding\.weight names the mesh axis 'model'",
    ):
        ee.shard_model(model, mesh, ee.sharding_rules(data="data", vocab="model"))
    with pytest.raises(
        ValueError, match=r"batch\['tokens'\] names the mesh axis 'batch'"
    ):
        ee.shard_batch(
            dict(tokens=np.zeros((2, 4), np.int32)),
            mesh,
            ee.sharding_rules(data="batch"),
        )


@pytest.mark.parametrize("layout", ["vocabulary", "embedding", "replicated"])
@pytest.mark.parametrize("split", ["both", "hidden", "targets"])
def test_tokens_split_in_one_call_are_served_as_on_one_device(
    error_results, layout, split
):
    # Per-token losses and log-sum-exps sum over the vocabulary; the table's
    # gradient sums over the tokens too.
    errors = error_results[f"split-tokens-{layout}-{split}"]
    scale = 1 + np.log(VOCAB)
    for name, error in errors.items():
        reduction = VOCAB + WIDTH + (BATCH * SEQ if name == "gradients" else 0)
        assert error <= tolerance(np.float32, reduction, scale=scale)["atol"], (
            name,
            errors,
        )


def test_batches_meshes_and_rules_are_checked_by_name():
    """A scalar or a list in a batch, an `AbstractMesh` where devices are needed, a
    typo'd rules key and int64 ids past int32: each a `ValueError` naming it, where
    a raw `zip`/`AttributeError` came, or the typo was ignored, or the id wrapped."""
    model = _one_layer_model()
    mesh = jax.make_mesh((1, 1), ("data", "vocab"))
    rules = ee.sharding_rules(data="data", vocab="vocab")
    tokens = np.zeros((2, 4), np.int32)
    with pytest.raises(ValueError, match=r"batch\['step'\] must be an array"):
        ee.shard_batch(dict(tokens=tokens, step=3), mesh, rules)
    with pytest.raises(ValueError, match=r"batch\['lengths'\]\[0\] must be an array"):
        ee.shard_batch(dict(tokens=tokens, lengths=[4, 4]), mesh, rules)
    wide = np.array([[1, 2**32 + 5]], np.int64)
    with pytest.raises(ValueError, match=rf"batch must be in .*got {2**32 + 5}"):
        ee.shard_batch(wide, mesh, rules)
    # What fits int32 is placed unchanged.
    fits = ee.shard_batch(np.array([[1, 2**31 - 1]], np.int64), mesh, rules)
    np.testing.assert_array_equal(fits, np.array([[1, 2**31 - 1]]))
    abstract = jax.sharding.AbstractMesh((1, 1), ("data", "vocab"))
    # Unwrapped, as users call them: the suite's jaxtyping hook would refuse the
    # AbstractMesh first, by its annotation.
    for function, tree in ((ee.shard_model, model), (ee.shard_batch, tokens)):
        with pytest.raises(ValueError, match="must be a jax.sharding.Mesh"):
            inspect.unwrap(function)(tree, abstract, rules)
    typo = {**rules, "vocabulary": ("vocab",)}
    for call in (
        lambda: ee.shard_model(model, mesh, typo),
        lambda: ee.shard_batch(tokens, mesh, typo),
        lambda: ee.model_partition_specs(model, mesh, typo),
    ):
        with pytest.raises(ValueError, match="'vocabulary', which is not a logical"):
            call()
    with pytest.raises(ValueError, match=r"rules\['batch'\] must be a tuple"):
        inspect.unwrap(ee.shard_model)(model, mesh, {**rules, "batch": "data"})
