"""`examples/finetune_lora.py` on the model `train_tiny_lm.py` wrote, with an int8
base (QLoRA): the held-out bits per byte it prints drop, and the PEFT adapter it
writes gives, in `peft` itself, the logits of the adapted model loaded back here."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
import transformers
from test_examples import EXAMPLES, run_example

import eqx_embed
from eqx_embed.huggingface import load_peft_adapter

TINY = [
    "--tokenizer", "byte", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
    "--hidden-size", "32", "--intermediate-size", "64", "--num-layers", "1",
    "--num-heads", "2", "--num-kv-heads", "1", "--eval-every", "4",
    "--eval-bytes", "2048", "--train-bytes", "16384", "--num-samples", "1",
    "--sample-length", "4",
]  # fmt: skip


def test_finetune_lora_on_train_tiny_lm_with_an_int8_base(tmp_path):
    text = tmp_path / "text.txt"
    text.write_bytes((EXAMPLES / "train_tiny_lm.py").read_bytes() * 2)
    run_example(
        "train_tiny_lm.py", *TINY, "--out", str(tmp_path / "tiny"), cwd=tmp_path
    )
    stdout = run_example(
        "finetune_lora.py", str(tmp_path / "tiny"), "--text", str(text), "--int8",
        "--rank", "4", "--steps", "12", "--batch-size", "4", "--seq-len", "32",
        "--learning-rate", "1e-2", "--eval-bytes", "2048",
        "--out", str(tmp_path / "tuned"), cwd=tmp_path,
    )  # fmt: skip
    result = json.loads((tmp_path / "tuned" / "finetune.json").read_text())
    printed = [float(x) for x in re.findall(r"held-out .*?([\d.]+) bits/byte", stdout)]
    assert printed == [round(result["before"], 4), round(result["after"], 4)]
    assert "over an int8 base" in stdout
    assert result["after"] < result["before"]

    base, adapter = tmp_path / "tuned" / "base", tmp_path / "tuned" / "adapter"
    ours = load_peft_adapter(eqx_embed.TransformerLM.from_huggingface(base), adapter)
    tokens = np.arange(24).reshape(2, 12) * 5 % ours.config.vocab_size
    theirs = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base), adapter
    ).eval()
    with torch.no_grad():
        expected = theirs(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(
        jax.vmap(ours)(jnp.asarray(tokens)), expected, atol=1e-4, rtol=1e-5
    )
