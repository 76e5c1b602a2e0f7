"""A vocabulary that the devices splitting it do not divide: `pad_vocabulary` appends
rows that are never read, and every result stays that of the unpadded table.

On one device, against NumPy in float64; on 8 CPU devices (one subprocess), the
padded, sharded modules against the unpadded ones on one device.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from _tolerances import tolerance

import eqx_embed

VOCAB, WIDTH, CAP = 61, 8, 3.0


@pytest.fixture(scope="module")
def layers():
    def make(tied):
        return eqx_embed.ReversibleEmbedding(
            VOCAB,
            WIDTH,
            tie_weights=tied,
            logit_soft_cap=CAP,
            key=jax.random.key(0),
            param_dtype=jnp.float32,
        )

    return {tied: make(tied) for tied in (True, False)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_padding_appends_zero_rows_and_keeps_the_vocabulary(layers, tied):
    layer = layers[tied]
    padded = eqx_embed.pad_vocabulary(layer, 8)
    tables = [padded.embedding] + ([] if tied else [padded.reverse_embedding])
    originals = [layer.embedding] + ([] if tied else [layer.reverse_embedding])
    for table, original in zip(tables, originals, strict=True):
        assert table.weight.shape == (64, WIDTH)
        assert table.num_embeddings == VOCAB
        np.testing.assert_array_equal(table.weight[:VOCAB], original.weight)
        assert not np.asarray(table.weight[VOCAB:]).any()
    # Tied: still one table, one leaf.
    assert len(jax.tree.leaves(padded)) == (1 if tied else 2)
    # Padding to another multiple replaces the padding; 1 removes it.
    assert eqx_embed.pad_vocabulary(padded, 3).weight.shape == (63, WIDTH)
    unpadded = eqx_embed.pad_vocabulary(padded, 1)
    np.testing.assert_array_equal(unpadded.weight, layer.weight)
    assert eqx_embed.pad_vocabulary(layer, 61).weight.shape == (VOCAB, WIDTH)


@pytest.mark.parametrize("multiple_of", [0, -8, True])
def test_a_bad_multiple_is_named(layers, multiple_of):
    with pytest.raises(ValueError, match="multiple_of must be a positive integer"):
        eqx_embed.pad_vocabulary(layers[True], multiple_of)


def test_a_multiple_that_would_exhaust_the_memory_is_refused(layers):
    """10**12 would append 60,000 GiB of zeros to a table of 61 rows: refused as the
    RoPE tables' sizes are, before anything is allocated."""
    with pytest.raises(ValueError, match=r"multiple_of=1000000000000 would pad"):
        eqx_embed.pad_vocabulary(layers[True], 10**12)
    # A mesh's multiple is far below the bound.
    assert eqx_embed.pad_vocabulary(layers[True], 4096).weight.shape[0] == 4096


@pytest.mark.parametrize("multiple_of", [2.5, "8"])
def test_a_multiple_that_is_no_integer_is_refused_by_its_type(layers, multiple_of):
    with pytest.raises(jaxtyping.TypeCheckError, match="multiple_of"):
        eqx_embed.pad_vocabulary(layers[True], multiple_of)


def _reference(table, hidden, targets):
    """Logits, losses, log-sum-exps and gradients (for the summed losses) in NumPy
    float64, soft-capped, on the unpadded table."""
    table, hidden = (np.asarray(x, np.float64) for x in (table, hidden))
    squashed = np.tanh(hidden @ table.T / CAP)
    logits = CAP * squashed
    peak = logits.max(axis=1, keepdims=True)
    lse = (peak + np.log(np.exp(logits - peak).sum(axis=1, keepdims=True)))[:, 0]
    losses = lse - logits[np.arange(len(targets)), targets]
    softmax = np.exp(logits - lse[:, None])
    d_logits = (softmax - np.eye(table.shape[0])[targets]) * (1 - squashed**2)
    return dict(
        logits=logits,
        losses=losses,
        lse=lse,
        d_table=d_logits.T @ hidden,
        d_hidden=d_logits @ table,
    )


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_padded_table_gives_the_unpadded_results(layers, tied):
    layer = layers[tied]
    padded = eqx_embed.pad_vocabulary(layer, 8)
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((7, WIDTH)).astype(np.float32)
    targets = np.array([0, 5, 60, 59, 1, 60, 30], np.int32)
    want = _reference(padded.decoder.weight[:VOCAB], hidden, targets)

    @eqx.filter_jit
    def run(layer, hidden):
        def per_token_total(layer, hidden):
            return layer.cross_entropy(hidden, targets, block_size=8).sum()

        def mean_total(layer, hidden):
            mean = layer.mean_cross_entropy(hidden, targets, chunk_size=3)
            return mean * len(targets)

        return dict(
            logits=jax.vmap(layer.decode)(hidden),
            losses=layer.cross_entropy(hidden, targets, block_size=8),
            lse=layer.log_sum_exp(hidden, block_size=8),
            grads=jax.grad(per_token_total, argnums=(0, 1))(layer, hidden),
            mean_grads=jax.grad(mean_total, argnums=(0, 1))(layer, hidden),
        )

    got = run(padded, hidden)
    # Each result is a dot product over the width, then a soft cap, a log-sum-exp
    # over the vocabulary.
    close = tolerance(np.float32, WIDTH + VOCAB + 8, scale=CAP)
    assert got["logits"].shape == (7, VOCAB)
    for name in ("logits", "losses", "lse"):
        np.testing.assert_allclose(got[name], want[name], **close, err_msg=name)
    for grads in ("grads", "mean_grads"):
        d_layer, d_hidden = got[grads]
        d_table = (d_layer.embedding if tied else d_layer.reverse_embedding).weight
        assert d_table.shape == (64, WIDTH)
        # The padding rows are never read: exactly zero gradient.
        assert not np.asarray(d_table[VOCAB:]).any(), grads
        scale = CAP * np.abs(hidden).sum(axis=0).max()
        np.testing.assert_allclose(
            d_table[:VOCAB],
            want["d_table"],
            **tolerance(np.float32, WIDTH + VOCAB + 8, scale=scale),
            err_msg=grads,
        )
        np.testing.assert_allclose(d_hidden, want["d_hidden"], **close, err_msg=grads)


def test_an_id_past_the_vocabulary_is_out_of_range_not_a_padding_row(layers):
    layer = layers[False]
    padded = eqx_embed.pad_vocabulary(layer, 8)
    lookup = eqx.filter_jit(lambda layer, ids: jax.vmap(layer)(ids))
    ids = np.array([0, 60, -1, -61, VOCAB, 63, -62], np.int32)
    rows = np.asarray(lookup(padded, ids))
    table = np.asarray(layer.weight)
    np.testing.assert_array_equal(rows[:4], table[[0, 60, 60, 0]])
    assert np.isnan(rows[4:]).all()
    # A target past the vocabulary: a NaN loss, as on the unpadded table.
    hidden = jnp.ones((2, WIDTH))
    for loss in (
        padded.cross_entropy(hidden, jnp.array([1, VOCAB])),
        padded.mean_cross_entropy(hidden, jnp.array([1, VOCAB])),
    ):
        assert np.isnan(np.asarray(loss)).any()
    strict = eqx_embed.pad_vocabulary(
        eqx_embed.Embedding(VOCAB, WIDTH, out_of_range="error", key=jax.random.key(1)),
        8,
    )
    # The message gives the vocabulary, not the padded table's rows.
    message = f"{VOCAB} is out of range for a table of {VOCAB} rows"
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"token id {message}"):
        lookup(strict, ids[:5])
    with pytest.raises(eqx.EquinoxRuntimeError, match=f"target {message}"):
        eqx.filter_jit(
            lambda table, targets: eqx_embed.EmbeddingDecode(table).cross_entropy(
                hidden, targets
            )
        )(strict, jnp.array([1, VOCAB]))


SHARDED = f"""
import json
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P
import eqx_embed as ee

WIDTH, BATCH, SEQ = {WIDTH}, 4, 6


def inputs(vocab):
    rng = np.random.default_rng(0)
    ids = rng.integers(-vocab, vocab, (BATCH, SEQ)).astype(np.int32)
    ids[1, 2], ids[3, 1], ids[0, 0] = vocab, -1, vocab - 1  # vocab: out of range
    targets = rng.integers(0, vocab, (BATCH, SEQ)).astype(np.int32)
    targets[2, 3] = vocab - 1
    where = rng.random((BATCH, SEQ)) > 0.3
    hidden = rng.standard_normal((BATCH, SEQ, WIDTH)).astype(np.float32)
    return ids, hidden, targets, where


# Each loss per sequence: the batch's split over "data" stays on the vmapped axis.
def per_sequence(loss, model, hidden, targets, where, **options):
    def one_sequence(hidden, targets, where):
        method = getattr(model, loss)
        return method(hidden, targets, where=where, z_loss=1e-2, **options)

    return jax.vmap(one_sequence)(hidden, targets, where)


# The per-sequence values of a loss, and the gradients of their sum.
def with_gradients(loss, model, hidden, targets, where, **options):
    values = per_sequence(loss, model, hidden, targets, where, **options)
    grads = jax.grad(
        lambda model, hidden: per_sequence(
            loss, model, hidden, targets, where, **options
        ).sum(),
        argnums=(0, 1),
    )(model, hidden)
    return values, grads


def everything(model, ids, hidden, targets, where):
    losses, (grads, d_hidden) = with_gradients(
        "cross_entropy", model, hidden, targets, where, block_size=4
    )
    out = dict(
        lookup=jax.vmap(jax.vmap(model))(ids),
        decode=jax.vmap(jax.vmap(model.decode))(hidden),
        attend=jax.vmap(jax.vmap(model.embedding.attend))(hidden),
        loss=losses,
        log_sum_exp=jax.vmap(lambda h: model.log_sum_exp(h, block_size=4))(hidden),
        grad_hidden=d_hidden,
        grad_table=grads.embedding.weight,
        grad_reverse_table=(grads.reverse_embedding or grads.embedding).weight,
    )
    out["mean"], (grads, out["mean_grad_hidden"]) = with_gradients(
        "mean_cross_entropy", model, hidden, targets, where, chunk_size=4
    )
    out["mean_grad_reverse_table"] = (grads.reverse_embedding or grads.embedding).weight
    return out


def run(model, *args):
    out = eqx.filter_jit(everything)(model, *args)
    return {{k: np.asarray(v) for k, v in out.items()}}


results = {{}}
# (vocabulary, mesh shape, tied, axis type): 61 rows on 4 vocabulary devices have
# 3 padding rows in the last shard; 13 on 8, a last shard of padding only.
cases = [
    (61, (2, 4), True, "Explicit"),
    (61, (2, 4), False, "Explicit"),
    (61, (2, 4), True, "Auto"),
    (13, (1, 8), True, "Explicit"),
]
references = {{}}
for vocab, shape, tied, axis_type in cases:
    model = ee.ReversibleEmbedding(
        vocab, WIDTH, tie_weights=tied, logit_soft_cap=3.0, padding_idx=5,
        key=jax.random.key(1),
    )
    args = inputs(vocab)
    key = (vocab, tied)
    if key not in references:
        references[key] = run(model, *args)
    mesh = jax.make_mesh(
        shape, ("data", "vocab"), axis_types=(getattr(AxisType, axis_type),) * 2
    )
    with jax.set_mesh(mesh):
        padded = ee.pad_vocabulary(model, shape[1])
        sharded = jax.tree.map(lambda x: jax.device_put(x, P("vocab", None)), padded)
        layout = str(jax.typeof(sharded.embedding.weight))
        got = run(sharded, *[jax.device_put(a, P("data")) for a in args])
    case = {{}}
    for name, value in got.items():
        want = references[key][name]
        padding = 0.0
        if name.endswith("table"):
            padding = float(np.abs(value[vocab:]).max())
            value = value[:vocab]
        same_shape = value.shape == want.shape
        case[name] = dict(
            same_shape=same_shape,
            same_nans=same_shape
            and bool(np.array_equal(np.isnan(value), np.isnan(want))),
            relative_error=float(
                np.nanmax(np.abs(value - want)) / max(np.nanmax(np.abs(want)), 1e-30)
            )
            if same_shape
            else None,
            padding_gradient=padding,
            nans=int(np.isnan(want).sum()),
        )
    results[f"{{vocab}}-{{tied}}-{{axis_type}}"] = dict(layout=layout, results=case)

# out_of_range="error" on the padded, sharded table: the id equal to the vocabulary
# raises, naming it, rather than reading a padding row.
strict = ee.Embedding(61, WIDTH, out_of_range="error", key=jax.random.key(2))
mesh = jax.make_mesh((2, 4), ("data", "vocab"))
with jax.set_mesh(mesh):
    strict = jax.device_put(ee.pad_vocabulary(strict, 4), P("vocab", None))
    bad_ids = jax.device_put(np.array([[0, 61], [60, -1]], np.int32), P("data"))
    try:
        eqx.filter_jit(lambda e, i: jax.vmap(jax.vmap(e))(i))(strict, bad_ids)
        results["error"] = None
    except Exception as error:
        results["error"] = str(error)
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def sharded_results(run_on_devices):
    return run_on_devices(SHARDED)


@pytest.mark.parametrize(
    "case",
    ["61-True-Explicit", "61-False-Explicit", "61-True-Auto", "13-True-Explicit"],
)
def test_padded_sharded_modules_match_one_device(sharded_results, case):
    vocab = int(case.split("-")[0])
    result = sharded_results[case]
    # Padded to the vocabulary devices, split over them.
    padded_rows = {61: 64, 13: 16}[vocab]
    if case.endswith("Explicit"):
        assert result["layout"].startswith(f"float32[{padded_rows}@vocab,"), result
    names = {
        "lookup",
        "decode",
        "attend",
        "loss",
        "log_sum_exp",
        "grad_hidden",
        "grad_table",
        "grad_reverse_table",
        "mean",
        "mean_grad_hidden",
        "mean_grad_reverse_table",
    }
    assert set(result["results"]) == names
    bound = tolerance(np.float32, vocab + WIDTH)["rtol"]
    # The id equal to the vocabulary reads NaNs, never a padding row.
    assert result["results"]["lookup"]["nans"] == WIDTH
    for name, got in result["results"].items():
        assert got["same_shape"] and got["same_nans"], (name, got)
        assert got["relative_error"] <= bound, (name, got)
        assert got["padding_gradient"] == 0, (name, got)


def test_the_error_policy_names_an_id_past_the_vocabulary_on_the_mesh(
    sharded_results,
):
    message = f"token id {VOCAB} is out of range for a table of {VOCAB} rows"
    assert message in (sharded_results["error"] or ""), sharded_results["error"]
