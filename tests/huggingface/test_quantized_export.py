"""A quantized `TransformerLM` against transformers running its own export:
`to_huggingface` writes the dequantized weights (and says so), and transformers'
logits, losses and greedy continuation on them equal the quantized model's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from test_generate_parity import hf_greedy, livelier
from test_huggingface import VOCAB, build, hf_logits

import eqx_embed

CASE = "llama3.1-tied"  # one table for lookup and decode, quantized once


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    hf_model = build(CASE)
    livelier(hf_model, CASE)
    path = tmp_path_factory.mktemp("float")
    hf_model.save_pretrained(path)
    return hf_model, eqx_embed.TransformerLM.from_huggingface(path)


@pytest.mark.parametrize("mode, group_size", [("int8", None), ("int4", 32)])
def test_a_quantized_model_equals_transformers_on_its_export(
    float_checkpoint, mode, group_size, tmp_path
):
    hf_float, model = float_checkpoint
    quantized = eqx_embed.quantize(model, mode, group_size=group_size)
    assert isinstance(quantized.blocks.mlp.up.weight, eqx_embed.QuantizedTable)
    with pytest.warns(UserWarning, match="written dequantized"):
        quantized.to_huggingface(tmp_path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, attn_implementation="eager"
    ).eval()
    tokens = np.random.default_rng(0).integers(0, VOCAB, size=(2, 16))
    expected = hf_logits(hf_model, tokens)
    # The export is the quantized model, not the float one it came from.
    assert np.abs(expected - hf_logits(hf_float, tokens)).max() > 1e-2
    np.testing.assert_allclose(
        jax.vmap(quantized)(jnp.asarray(tokens)), expected, atol=1e-4, rtol=0
    )
    targets = np.roll(tokens, -1, axis=1)
    expected_loss = torch.nn.functional.cross_entropy(
        torch.tensor(expected, dtype=torch.float64).reshape(-1, VOCAB),
        torch.tensor(targets).reshape(-1),
        reduction="none",
    ).numpy()
    loss = jax.vmap(quantized.loss)(jnp.asarray(tokens), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(loss).ravel(), expected_loss, atol=1e-4)
    mean = quantized.mean_loss(jnp.asarray(tokens), jnp.asarray(targets))
    np.testing.assert_allclose(mean, expected_loss.mean(), atol=1e-4)
    prompt = tokens[0, :5]
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    got = quantized.generate(jnp.asarray(prompt[None]), max_new_tokens=40)
    np.testing.assert_array_equal(got[0], hf_greedy(hf_model, prompt))
