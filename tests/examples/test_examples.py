"""Every script in `examples/` runs, in a subprocess, with small settings; the training
example's outputs, its bits per byte and its resume are checked against references."""

import gzip
import importlib.util
import json
import lzma
import math
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_embed

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"
TINY_LM = [
    "--steps", "4",
    "--batch-size", "2",
    "--seq-len", "32",
    "--hidden-size", "32",
    "--intermediate-size", "64",
    "--num-layers", "1",
    "--num-heads", "2",
    "--num-kv-heads", "1",
    "--eval-every", "2",
    "--eval-bytes", "2048",
    "--train-bytes", "65536",
    "--sample-length", "8",
    "--num-samples", "2",
]  # fmt: skip
SMALL_SETTINGS = {
    "quickstart.py": ["--steps", "3"],
    "train_tiny_lm.py": TINY_LM,
    "hf_checkpoint.py": ["--demo"],
}


def run_example(name: str, *args: str, cwd: pathlib.Path) -> str:
    """Runs `examples/name` as a person would; returns its standard output."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{name} {args} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(
        name.removesuffix(".py"), EXAMPLES / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny_lm = load_example("train_tiny_lm.py")


def test_every_example_has_small_settings():
    assert {path.name for path in EXAMPLES.glob("*.py")} == set(SMALL_SETTINGS)


@pytest.mark.parametrize("name", ["quickstart.py", "hf_checkpoint.py"])
def test_example_runs(name, tmp_path):
    assert run_example(name, *SMALL_SETTINGS[name], cwd=tmp_path)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four steps of the training example, uninterrupted."""
    out = tmp_path_factory.mktemp("straight")
    stdout = run_example("train_tiny_lm.py", *TINY_LM, "--out", str(out), cwd=out)
    return out, stdout


def load_run(out: pathlib.Path):
    """The model and the record of a run, read back without the example's code."""
    record = json.loads((out / "checkpoint.json").read_text())
    config = eqx_embed.TransformerConfig.from_dict(record["config"])
    template = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    # The model's leaves come first in the checkpoint, the optimiser state's after.
    with open(out / "checkpoint.eqx", "rb") as file:
        model = eqx.tree_deserialise_leaves(file, template)
    return model, record


def reference_nats(model, stream: np.ndarray, seq_len: int):
    """The held-out loss from the logits, in float64: a window of `seq_len` tokens
    every `seq_len // 2`, each target scored by the first window that predicts it.
    Returns the total nats and the targets scored, in order."""
    forward = eqx.filter_jit(model)
    nats, scored, covered = 0.0, [], 0
    for start in range(0, len(stream) - seq_len, seq_len // 2):
        window = stream[start : start + seq_len]
        logits = np.asarray(forward(jnp.asarray(window)), dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        for i in range(seq_len):
            target = start + i + 1
            if target > covered:
                nats -= log_probs[i, stream[target]]
                scored.append(stream[target])
        covered = start + seq_len
    return nats, np.array(scored)


def test_train_tiny_lm_writes_its_outputs(straight_run):
    out, stdout = straight_run
    model, record = load_run(out)
    assert record["step"] == 4
    assert record["config"]["tie_word_embeddings"] is True
    assert len(record["history"]["train_loss"]) == 4
    assert [step for step, _ in record["history"]["held_out"]] == [2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.count("--- sample ") == 2
    # The prompt comes back, followed by what the model sampled.
    prompt = train_tiny_lm.build_parser().get_default("prompt")
    assert stdout.split("--- sample 1 ---\n")[1].startswith(prompt)
    # Tied: one table, one leaf; the RoPE tables are never trained.
    params = eqx.filter(model, eqx.is_inexact_array)
    assert params.embedding.reverse_embedding is None
    assert params.rope.cos_bits is None and model.rope.cos_bits is not None


def test_train_tiny_lm_bits_per_byte_and_compressors(straight_run):
    out, stdout = straight_run
    model, record = load_run(out)
    documents = train_tiny_lm.read_documents(None)
    _, held_out = train_tiny_lm.split_documents(documents)
    stream = np.frombuffer(held_out[:2048], dtype=np.uint8).astype(np.int32)
    nats, targets = reference_nats(model, stream, seq_len=32)
    scored = targets.astype(np.uint8).tobytes()
    assert scored == held_out[1 : 1 + len(scored)]
    expected = nats / math.log(2) / len(scored)
    step, bits = record["history"]["held_out"][-1]
    assert step == 4
    assert bits == pytest.approx(expected, rel=1e-5)
    gzip_bits = 8 * len(gzip.compress(scored, compresslevel=9)) / len(scored)
    xz_bits = 8 * len(lzma.compress(scored, preset=9)) / len(scored)
    assert (
        f"step     4  held-out {bits:.3f} bits/byte  "
        f"(gzip -9 {gzip_bits:.3f}, xz -9 {xz_bits:.3f})"
    ) in stdout


def test_train_tiny_lm_resume_is_exact(straight_run, tmp_path):
    straight, _ = straight_run
    run_example(
        "train_tiny_lm.py",
        *TINY_LM,
        "--out",
        str(tmp_path),
        "--stop-after",
        "2",
        cwd=tmp_path,
    )
    halfway = (tmp_path / "checkpoint.eqx").read_bytes()
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2
    stdout = run_example(
        "train_tiny_lm.py", "--resume", "--out", str(tmp_path), cwd=tmp_path
    )
    assert "resumed from" in stdout and "at step 2" in stdout
    resumed = (tmp_path / "checkpoint.eqx").read_bytes()
    assert resumed != halfway  # the second half trained
    # Model and optimiser state, bit for bit, and the same losses.
    assert resumed == (straight / "checkpoint.eqx").read_bytes()
    history = json.loads((tmp_path / "checkpoint.json").read_text())["history"]
    assert history == json.loads((straight / "checkpoint.json").read_text())["history"]


def test_train_tiny_lm_bpe_on_user_text(tmp_path):
    """`--text` on a directory, with a BPE: bits per byte divide the nats by the bytes
    of the text, not by the tokens."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(pathlib.Path(eqx_embed.__file__).parent.glob("nn/*.py"))
    for source in sources:
        (corpus / source.name).write_bytes(source.read_bytes())
    (corpus / ".hidden").write_text("never read")
    out = tmp_path / "out"
    settings = [*TINY_LM, "--text", str(corpus), "--tokenizer", "bpe"]
    settings += ["--vocab-size", "300", "--out", str(out)]
    stdout = run_example("train_tiny_lm.py", *settings, cwd=tmp_path)
    assert f"data: {len(sources)} documents" in stdout
    model, record = load_run(out)
    assert record["config"]["vocab_size"] == 300
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    documents = [source.read_bytes() for source in sources]
    _, held_out = train_tiny_lm.split_documents(documents)
    text = held_out[:2048].decode("utf-8", errors="replace")
    lines = text.splitlines(keepends=True)
    stream = np.concatenate([e.ids for e in tokenizer.encode_batch(lines)])
    nats, targets = reference_nats(model, stream, seq_len=32)
    num_bytes = len(tokenizer.decode(targets.tolist()).encode())
    assert num_bytes > targets.size  # merged tokens stand for several bytes
    _, bits = record["history"]["held_out"][-1]
    assert bits == pytest.approx(nats / math.log(2) / num_bytes, rel=1e-5)


def test_train_tiny_lm_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        train_tiny_lm.main(
            ["--text", str(tmp_path / "missing"), "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    (tmp_path / "checkpoint.json").write_text(
        json.dumps({"args": {"learning_rate": 0.003, "seed": 0}})
    )
    with pytest.raises(SystemExit, match="with --learning-rate 0.003; got"):
        train_tiny_lm.main(
            ["--resume", "--learning-rate", "0.5", "--out", str(tmp_path)]
        )
