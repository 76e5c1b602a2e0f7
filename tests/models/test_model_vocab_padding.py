"""A `TransformerLM` whose vocabulary the devices do not divide (GPT-2's 50,257 on 8,
here 1,003 on 4), sharded by `shard_model` on 8 CPU devices: its padded tables give
the logits, losses and gradients of the model on one device, and its checkpoints
have the real vocabulary."""

import jax
import numpy as np
import pytest
from _tolerances import tolerance
from jax.sharding import AbstractMesh

from eqx_embed import (
    TransformerConfig,
    TransformerLM,
    model_partition_specs,
    sharding_rules,
)

VOCAB, HIDDEN = 1003, 32
CONFIG = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=64,
    num_layers=1,
    num_heads=4,
    max_position_embeddings=16,
)


def test_the_specs_of_an_unpadded_vocabulary_say_how_to_pad_it():
    model = TransformerLM(TransformerConfig("gpt2", **CONFIG), key=jax.random.key(0))
    rules = sharding_rules(data="data", vocab="vocab")
    with pytest.raises(
        ValueError,
        match=r"embedding\.embedding\.weight has 1003 entries along its 'vocab' axis, "
        r"which its 4 devices .* eqx_embed\.pad_vocabulary\(model, 4\) pads it",
    ):
        model_partition_specs(model, AbstractMesh((2, 4), ("data", "vocab")), rules)


SHARDED = f"""
import json
import pathlib
import tempfile
import equinox as eqx
import jax
import numpy as np
from safetensors.numpy import load_file
import eqx_embed as ee

CONFIG = {CONFIG!r}
VOCAB = CONFIG["vocab_size"]
rng = np.random.default_rng(0)
tokens = rng.integers(0, VOCAB, (4, 9)).astype(np.int32)
tokens[1, 3] = VOCAB - 1
tokens[2, 5] = VOCAB - 1
bad = tokens[:, :-1].copy()
bad[3, 4] = VOCAB  # out of range: NaNs from there on, never a padding row


@eqx.filter_jit
def step(model, batch, bad):
    def loss(model):
        return jax.vmap(model.loss)(batch[:, :-1], batch[:, 1:]).mean()

    value, grads = eqx.filter_value_and_grad(loss)(model)
    return dict(
        loss=value,
        logits=jax.vmap(model)(batch[:, :-1]),
        bad_logits=jax.vmap(model)(bad),
        grad_table=grads.embedding.embedding.weight,
        grad_up=grads.blocks.mlp.up.weight,
    )


def as_numpy(out):
    return {{name: np.asarray(value) for name, value in out.items()}}


model = ee.TransformerLM(ee.TransformerConfig("gpt2", **CONFIG), key=jax.random.key(0))
reference = as_numpy(step(model, tokens, bad))
mesh = jax.make_mesh((2, 4), ("data", "vocab"))
rules = ee.sharding_rules(data="data", vocab="vocab")
with jax.set_mesh(mesh):
    sharded = ee.shard_model(model, mesh, rules)
    got = as_numpy(
        step(sharded, *(ee.shard_batch(x, mesh, rules) for x in (tokens, bad)))
    )
    checkpoint = pathlib.Path(tempfile.mkdtemp()) / "gpt2"
    sharded.to_huggingface(checkpoint)
    untied_model = ee.TransformerLM(
        ee.TransformerConfig("llama", tie_word_embeddings=False, **CONFIG),
        key=jax.random.key(1),
    )
    untied = ee.shard_model(untied_model, mesh, rules)
    untied_checkpoint = checkpoint.parent / "llama"
    untied.to_huggingface(untied_checkpoint)

results = dict(
    layout=str(jax.typeof(sharded.embedding.embedding.weight)),
    table_leaves=sum(
        leaf.ndim == 2 and leaf.shape[1] == CONFIG["hidden_size"]
        and leaf.shape[0] > 16
        for leaf in jax.tree.leaves(sharded.embedding)
    ),
    tied=sharded.embedding.reverse_embedding is None,
    padding_gradient=float(np.abs(got["grad_table"][VOCAB:]).max()),
)
for name, want in reference.items():
    value = got[name]
    if name == "grad_table":
        value = value[:VOCAB]
    same_shape = value.shape == want.shape
    results[name] = dict(
        shape=list(value.shape),
        same_nans=same_shape and bool(np.array_equal(np.isnan(value), np.isnan(want))),
        nans=int(np.isnan(want).sum()),
        relative_error=float(
            np.nanmax(np.abs(value - want)) / np.nanmax(np.abs(want))
        ) if same_shape else None,
    )

files = {{}}
for name, directory, original in (
    ("gpt2", checkpoint, model), ("llama", untied_checkpoint, untied_model)
):
    tensors = load_file(directory / "model.safetensors")
    config = json.loads((directory / "config.json").read_text())
    tables = {{
        key: value for key, value in tensors.items()
        if key.endswith(("wte.weight", "embed_tokens.weight", "lm_head.weight"))
    }}
    originals = [original.embedding.embedding.weight]
    if original.embedding.reverse_embedding is not None:
        originals.append(original.embedding.reverse_embedding.weight)
    files[name] = dict(
        vocab_size=config["vocab_size"],
        shapes={{key: list(value.shape) for key, value in tables.items()}},
        # Written from the devices as held: the unpadded tables, bit for bit.
        same_tables=sorted(
            bool(np.array_equal(value, np.asarray(table)))
            for value in tables.values() for table in originals
            if value.shape == table.shape
        ),
    )
reloaded = ee.TransformerLM.from_huggingface(checkpoint)
results["reloaded_logits_equal"] = bool(
    np.array_equal(np.asarray(step(reloaded, tokens, bad)["logits"]),
                   reference["logits"])
)
results["files"] = files
print(json.dumps(results))
"""


def test_a_padded_sharded_model_matches_one_device(run_on_devices):
    result = run_on_devices(SHARDED)
    # Padded to the 4 vocabulary devices and split over them; tied: one table.
    assert result["layout"].startswith("float32[1004@vocab,32"), result
    assert result["tied"] and result["table_leaves"] == 1, result
    assert result["padding_gradient"] == 0, result
    assert result["logits"]["shape"] == [4, 8, VOCAB], result
    # The id equal to the vocabulary gives NaNs, as on one device.
    assert result["bad_logits"]["nans"] > 0, result
    # Each loss, logit and gradient goes through the layers' dot products and the
    # vocabulary's log-sum-exp.
    bound = tolerance(np.float32, VOCAB + 2 * (HIDDEN + 64))["rtol"]
    for name in ("loss", "logits", "bad_logits", "grad_table", "grad_up"):
        got = result[name]
        assert got["same_nans"], (name, got)
        assert got["relative_error"] <= bound, (name, got)
    # The checkpoints hold the real vocabulary, tied (GPT-2) and untied (Llama).
    gpt2, llama = result["files"]["gpt2"], result["files"]["llama"]
    assert gpt2["vocab_size"] == llama["vocab_size"] == VOCAB
    assert gpt2["shapes"] == {"transformer.wte.weight": [VOCAB, HIDDEN]}
    assert llama["shapes"] == {
        "model.embed_tokens.weight": [VOCAB, HIDDEN],
        "lm_head.weight": [VOCAB, HIDDEN],
    }
    assert gpt2["same_tables"] == [True]
    assert llama["same_tables"].count(True) == 2, llama
    assert result["reloaded_logits_equal"], result


REPADDED = f"""
import json
import jax
import numpy as np
from jax.sharding import AxisType
import eqx_embed as ee

CONFIG = {CONFIG!r}
tokens = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], (2, 8))
config = ee.TransformerConfig("llama", tie_word_embeddings=False, **CONFIG)
model = ee.TransformerLM(config, key=jax.random.key(0))
reference = np.asarray(jax.vmap(model)(tokens))
rules = ee.sharding_rules(data="data", vocab="vocab")
results = {{}}
for kind in (AxisType.Explicit, AxisType.Auto):
    mesh = jax.make_mesh((2, 4), ("data", "vocab"), axis_types=(kind, kind))
    with jax.set_mesh(mesh):
        sharded = ee.shard_model(model, mesh, rules)
        for multiple in (1, 3, 8):
            padded = ee.pad_vocabulary(sharded, multiple)
            logits = np.asarray(jax.vmap(padded)(ee.shard_batch(tokens, mesh, rules)))
            tables = (padded.embedding.weight, padded.embedding.decoder.weight)
            results[f"{{kind.name}}-{{multiple}}"] = dict(
                rows=[int(t.shape[0]) for t in tables],
                specs=[str(t.sharding.spec) for t in tables],
                error=float(
                    np.max(np.abs(logits - reference)) / np.max(np.abs(reference))
                ),
            )
print(json.dumps(results))
"""


def test_pad_vocabulary_pads_and_unpads_a_sharded_model(run_on_devices):
    """`pad_vocabulary` on a model `shard_model` padded and split (1,003 rows padded
    to 1,004 over 4 vocabulary devices): `1` removes the padding, another multiple
    pads anew, on explicit and auto mesh axes alike, where explicit ones raised a raw
    `ShardingTypeError`. The logits stay those of the unpadded model on one device."""
    results = run_on_devices(REPADDED)
    bound = tolerance(np.float32, VOCAB + 2 * (HIDDEN + 64))["rtol"]
    for kind in ("Explicit", "Auto"):
        # 1003 and 1005 rows cannot be split over 4 devices: whole; 1008 can.
        expected = {1: (1003, None), 3: (1005, None), 8: (1008, "vocab")}
        for multiple, (rows, axis) in expected.items():
            got = results[f"{kind}-{multiple}"]
            assert got["rows"] == [rows, rows], got
            for spec in got["specs"]:
                assert spec.startswith("P('vocab'") if axis else "vocab" not in spec
            assert got["error"] <= bound, got
