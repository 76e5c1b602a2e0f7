"""Every script in `examples/` runs, in a subprocess, with small settings; the training
example's outputs, its bits per byte and its resume are checked against references."""

import gzip
import hashlib
import importlib.util
import json
import lzma
import math
import os
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
    "--tokenizer", "byte",
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
    "finetune_lora.py": ["--demo", "--steps", "2", "--seq-len", "32"],
}


def run_example(name: str, *args: str, cwd: pathlib.Path) -> str:
    """Runs `examples/name` as a person would; returns its standard output."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        # This checkout's package, whatever the environment has installed.
        env={**os.environ, "PYTHONPATH": str(EXAMPLES.parent)},
    )
    assert result.returncode == 0, f"{name} {args} failed:\n{result.stderr[-3000:]}"
    return result.stdout


def load_example(name: str):
    # As when run as a script: the example's helper modules sit beside it.
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(
        name.removesuffix(".py"), EXAMPLES / name
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tiny_lm = load_example("train_tiny_lm.py")
# Its helper module, beside it (importable once the example is loaded).
_checkpointing = importlib.import_module("_checkpointing")


def test_every_example_has_small_settings():
    """Every script runs here; `_name.py` files are the scripts' helper modules."""
    scripts = {p.name for p in EXAMPLES.glob("*.py") if not p.name.startswith("_")}
    assert scripts == set(SMALL_SETTINGS)


@pytest.mark.parametrize(
    "name", ["quickstart.py", "hf_checkpoint.py", "finetune_lora.py"]
)
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


def packed_text(documents: list[bytes], limit: int, encode):
    """The held-out text `b"\\n".join(documents)[:limit]` as the example packs it:
    cut into documents, each but the first starting at the newline before it,
    tokenized one by one. Returns the text, its tokens and each token's document."""
    text = b"\n".join(documents)[:limit]
    ends = np.cumsum([len(d) + 1 for d in documents]) - 1  # each document's newline
    bounds = [0, *(int(end) for end in ends if end < len(text)), len(text)]
    pieces = [encode(text[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    segments = np.concatenate([np.full(len(p), i) for i, p in enumerate(pieces)])
    return text, np.concatenate(pieces), segments


def reference_nats(model, stream: np.ndarray, segments: np.ndarray, seq_len: int):
    """The held-out loss from the logits, in float64: a window of `seq_len` tokens
    every `seq_len // 2`, each target scored by the first window that predicts it,
    each document's part of a window run alone (it sees nothing of the others).
    Returns the total nats and the targets scored, in order."""
    forward = eqx.filter_jit(model)
    nats, scored, covered = 0.0, [], 0
    for start in range(0, len(stream) - seq_len, seq_len // 2):
        window = stream[start : start + seq_len]
        documents = segments[start : start + seq_len]
        logits = np.concatenate(
            [
                np.asarray(forward(jnp.asarray(window[documents == d])), np.float64)
                for d in np.unique(documents)
            ]
        )
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
    state = (out / "checkpoint.eqx").read_bytes()
    assert record["sha256"] == {"checkpoint.eqx": hashlib.sha256(state).hexdigest()}
    assert record["config"]["tie_word_embeddings"] is True
    assert len(record["history"]["train_loss"]) == 4
    assert [step for step, _ in record["history"]["held_out"]] == [2, 4]
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert stdout.count("--- sample ") == 2
    # The prompt comes back, followed by what the model sampled.
    prompt = train_tiny_lm.DEFAULT_PROMPT
    assert stdout.split("--- sample 1 ---\n")[1].startswith(prompt)
    # Tied: one table, one leaf; the RoPE tables are never trained.
    params = eqx.filter(model, eqx.is_inexact_array)
    assert params.embedding.reverse_embedding is None
    assert params.rope.cos_bits is None and model.rope.cos_bits is not None


def test_train_tiny_lm_bits_per_byte_and_compressors(straight_run):
    out, stdout = straight_run
    model, record = load_run(out)
    documents = train_tiny_lm.read_documents(None)
    _, held_out_documents = train_tiny_lm.split_documents(documents)
    held_out, stream, segments = packed_text(
        held_out_documents, 2048, train_tiny_lm.ByteTokenizer().encode
    )
    nats, targets = reference_nats(model, stream, segments, seq_len=32)
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


def test_train_tiny_lm_packs_documents_with_segment_ids():
    """Documents one after another, each but the first from the newline before it,
    and training windows whose segment ids say which document each token is in."""
    documents = [b"ab", b"cde", b"f", b"ghij"]
    text, stream, segments = train_tiny_lm.pack_documents(
        train_tiny_lm.ByteTokenizer(), documents, limit=10
    )
    assert text == b"ab\ncde\nf\ng"
    assert stream.tobytes() == np.frombuffer(text, np.uint8).astype(np.int32).tobytes()
    np.testing.assert_array_equal(segments, [0, 0, 1, 1, 1, 1, 2, 2, 3, 3])
    tokens, targets, segment_ids = train_tiny_lm.batch_at(
        3, stream, segments, seed=0, batch_size=5, seq_len=4
    )
    for row, row_targets, row_segments in zip(
        tokens, targets, segment_ids, strict=True
    ):
        start = text.index(bytes(row.astype(np.uint8)))
        assert bytes(row_targets.astype(np.uint8)) == text[start + 1 : start + 5]
        np.testing.assert_array_equal(row_segments, segments[start : start + 4])


def test_train_tiny_lm_resume_is_exact(straight_run, tmp_path):
    straight, _ = straight_run
    run_example(
        "train_tiny_lm.py",
        *TINY_LM,
        "--out",
        str(tmp_path),
        "--stop-after",
        "1",
        cwd=tmp_path,
    )
    # Stopped before the first evaluation (step 2): the plot has no held-out curve.
    halfway = (tmp_path / "checkpoint.eqx").read_bytes()
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["step"] == 1 and record["history"]["held_out"] == []
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = run_example(
        "train_tiny_lm.py", "--resume", "--out", str(tmp_path), cwd=tmp_path
    )
    assert "resumed from" in stdout and "at step 1" in stdout
    resumed = (tmp_path / "checkpoint.eqx").read_bytes()
    assert resumed != halfway  # the second half trained
    # Model and optimiser state, bit for bit, and the same losses.
    assert resumed == (straight / "checkpoint.eqx").read_bytes()
    history = json.loads((tmp_path / "checkpoint.json").read_text())["history"]
    assert history == json.loads((straight / "checkpoint.json").read_text())["history"]


def test_train_tiny_lm_bpe_on_user_text(tmp_path):
    """`--text` on a directory, with a BPE, some of it not UTF-8: bits per byte divide
    the nats by the raw bytes the scored tokens stand for (not by the tokens, nor by
    the bytes of replacement characters), documents short enough that the held-out
    windows cross from one to the next, and the samples continue the user's text."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    sources = sorted(pathlib.Path(eqx_embed.__file__).parent.glob("nn/*.py"))
    # Latin-1 comments: 0xE9 and 0xEF are not UTF-8 on their own.
    text = b"".join(source.read_bytes() for source in sources)
    text = text.replace(b"\n\n", b"\n# caf\xe9 na\xefve\n")
    documents = [text[i : i + 700] for i in range(0, len(text), 700)]
    for i, document in enumerate(documents):
        (corpus / f"{i:04d}.py").write_bytes(document)
    (corpus / ".hidden").write_text("never read")
    out = tmp_path / "out"
    settings = [*TINY_LM, "--text", str(corpus), "--tokenizer", "bpe"]
    settings += ["--vocab-size", "300", "--out", str(out)]
    stdout = run_example("train_tiny_lm.py", *settings, cwd=tmp_path)
    assert f"data: {len(documents)} documents" in stdout
    model, record = load_run(out)
    assert record["config"]["vocab_size"] == 300
    tokenizer = train_tiny_lm.BPETokenizer.load(out)
    _, held_out_documents = train_tiny_lm.split_documents(documents)
    held_out, stream, segments = packed_text(held_out_documents, 2048, tokenizer.encode)
    assert b"\xe9" in held_out and segments[-1] >= 2
    # Lossless: the tokens stand for the raw bytes, invalid UTF-8 included.
    assert tokenizer.token_bytes(stream) == held_out
    nats, targets = reference_nats(model, stream, segments, seq_len=32)
    scored = tokenizer.token_bytes(targets)
    first = len(tokenizer.token_bytes(stream[:1]))
    assert scored == held_out[first : first + len(scored)]
    assert len(scored) > targets.size  # merged tokens stand for several bytes
    _, bits = record["history"]["held_out"][-1]
    assert bits == pytest.approx(nats / math.log(2) / len(scored), rel=1e-5)
    # The prompt: the start of the held-out text, at most half a window (16 bytes).
    prompt = held_out.lstrip().split(b"\n")[0][:16].decode()
    assert stdout.split("--- sample 1 ---\n")[1].startswith(prompt)
    assert record["args"]["prompt"] is None


# --- The training example's checkpoints -----------------------------------------------


def tiny_state(seed: int):
    """A small model and an Adam state, as the example checkpoints them."""
    import optax

    config = eqx_embed.TransformerConfig(
        family="llama",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        max_position_embeddings=8,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(seed))
    params = eqx.filter(model, eqx.is_inexact_array)
    state = optax.adam(1e-3).init(params)
    # Moments that differ from the template's zeros, so that loading is visible.
    state = jax.tree.map(lambda x: x + seed if eqx.is_inexact_array(x) else x, state)
    return model, state


def assert_same_leaves(tree, reference):
    leaves, expected = jax.tree.leaves(tree), jax.tree.leaves(reference)
    assert len(leaves) == len(expected)
    for leaf, want in zip(leaves, expected, strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(want))


def save_step(out: pathlib.Path, step: int, side_files=None):
    out.mkdir(exist_ok=True)
    model, state = tiny_state(step)
    record = {"args": {}, "history": {"step": step}}
    _checkpointing.save_checkpoint(out, model, state, step, record, side_files or {})
    return model, state


def test_checkpoint_survives_a_serialiser_that_fails_half_way(tmp_path, monkeypatch):
    model, state = save_step(tmp_path, 3, {"tokenizer.json": b"{}"})
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}

    def write_half_then_fail(file, tree):
        file.write(b"\x93NUMPY half a leaf")
        raise OSError("No space left on device")

    monkeypatch.setattr(eqx, "tree_serialise_leaves", write_half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_step(tmp_path, 6, {"tokenizer.json": b"{}"})
    monkeypatch.undo()
    # The previous checkpoint, byte for byte, and no temporary file left behind.
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before
    record = _checkpointing.read_record(tmp_path)
    assert record["step"] == 3 and record["history"] == {"step": 3}
    template = tiny_state(0)
    assert_same_leaves(
        _checkpointing.load_state(tmp_path, *template, record), (model, state)
    )


KILL_DURING_SAVE = """
import os, pathlib, signal, sys
sys.path.insert(0, {examples!r})
import _checkpointing
sys.path.insert(0, {tests!r})
from test_examples import save_step

out = pathlib.Path({out!r})
save_step(out, 3)
kill_at = {kill_at!r}
renames = []
real_replace = os.replace

def replace(source, target):
    renames.append(target)
    if kill_at == "between the files" and len(renames) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)

def write_half_then_die(file, tree):
    file.write(b"half")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)

_checkpointing.os.replace = replace
if kill_at == "while writing":
    _checkpointing.eqx.tree_serialise_leaves = write_half_then_die
save_step(out, 6)
"""


def kill_during_save(out: pathlib.Path, kill_at: str):
    """Saves step 3, then SIGKILLs the process saving step 6 at `kill_at`."""
    script = KILL_DURING_SAVE.format(
        examples=str(EXAMPLES),
        tests=str(pathlib.Path(__file__).parent),
        out=str(out),
        kill_at=kill_at,
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == -9, result.stderr[-3000:]


def test_checkpoint_survives_a_kill_while_writing(tmp_path):
    kill_during_save(tmp_path, "while writing")
    record = _checkpointing.read_record(tmp_path)
    assert record["step"] == 3
    template = tiny_state(0)
    loaded = _checkpointing.load_state(tmp_path, *template, record)
    assert_same_leaves(loaded, tiny_state(3))
    # The killed save's temporary file stays until the next save removes it.
    (leftover,) = tmp_path.glob(".checkpoint.eqx.*.tmp")
    assert leftover.read_bytes() == b"half"
    save_step(tmp_path, 6)
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "checkpoint.eqx",
        "checkpoint.json",
    ]
    assert _checkpointing.read_record(tmp_path)["step"] == 6


def test_checkpoint_pair_cut_by_a_kill_is_refused(tmp_path):
    """Killed between the two renames: step 6's weights, step 3's record."""
    kill_during_save(tmp_path, "between the files")
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    assert record["step"] == 3
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    message = str(refused.value)
    assert str(tmp_path / "checkpoint.eqx") in message
    assert "does not belong to the checkpoint of step 3" in message


def test_checkpoint_of_another_step_is_refused(tmp_path):
    save_step(tmp_path / "a", 3)
    save_step(tmp_path / "b", 6)
    (tmp_path / "b" / "checkpoint.eqx").replace(tmp_path / "a" / "checkpoint.eqx")
    with pytest.raises(SystemExit, match="does not belong to the checkpoint of step 3"):
        _checkpointing.read_record(tmp_path / "a")
    # A record edited to the wrong step is caught by the step the state holds.
    save_step(tmp_path / "c", 6)
    record = _checkpointing.read_record(tmp_path / "c")
    with pytest.raises(SystemExit, match="holds step 6, .* step 5"):
        _checkpointing.load_state(tmp_path / "c", *tiny_state(0), {**record, "step": 5})


def test_bpe_resume_without_its_tokenizer_names_the_file(tmp_path):
    save_step(tmp_path, 3, {"tokenizer.json": b"{}"})
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    assert f"{tmp_path / 'tokenizer.json'} is missing" in str(refused.value)


def test_diverged_model_never_replaces_the_checkpoint(tmp_path):
    save_step(tmp_path, 3)
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    model, state = tiny_state(6)
    # One NaN in the last parameter.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
    diverged = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
    with pytest.raises(SystemExit, match="not finite"):
        _checkpointing.save_checkpoint(tmp_path, diverged, state, 6, {}, {})
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_train_tiny_lm_stops_on_a_non_finite_loss(tmp_path):
    """A learning rate of 1e30 blows the weights up; the run stops without saving."""
    settings = [*TINY_LM, "--learning-rate", "1e30", "--warmup-steps", "0"]
    with pytest.raises(SystemExit, match="the training loss is (nan|inf)"):
        train_tiny_lm.main([*settings, "--out", str(tmp_path)])
    assert not (tmp_path / "checkpoint.json").exists()
    assert not (tmp_path / "checkpoint.eqx").exists()


def test_loss_plot_without_an_evaluation_has_a_title(tmp_path, monkeypatch):
    """Stopped before the first evaluation: a train curve, no held-out one."""
    import matplotlib.pyplot as plt

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    history = {"train_bits_per_byte": [7.5, 6.0, 5.0], "held_out": []}
    path = tmp_path / "loss.png"
    train_tiny_lm.plot_history(history, {"gzip -9": 2.5}, path, "a tiny run")
    (figure,) = figures
    (axes,) = figure.axes
    assert axes.get_title() == "a tiny run"
    labels = [line.get_label() for line in axes.get_lines()]
    assert "train" in labels and "held out" not in labels
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    close(figure)


def test_train_tiny_lm_finishes_a_save_that_ctrl_c_interrupts(tmp_path, monkeypatch):
    """Ctrl-C in the middle of writing `checkpoint.eqx` waits for the save."""
    import signal

    serialise = eqx.tree_serialise_leaves

    def interrupted_half_way(file, tree):
        file.write(b"\x93NUMPY")
        signal.raise_signal(signal.SIGINT)
        file.seek(0)
        serialise(file, tree)

    monkeypatch.setattr(eqx, "tree_serialise_leaves", interrupted_half_way)
    settings = [*TINY_LM, "--steps", "2", "--num-samples", "1", "--out", str(tmp_path)]
    train_tiny_lm.main(settings)
    monkeypatch.undo()
    record = _checkpointing.read_record(tmp_path)
    assert record["step"] == 2
    model, _ = load_run(tmp_path)
    assert model.config.vocab_size == 256


def test_interrupts_deferred_restores_the_handler():
    import signal

    before = signal.getsignal(signal.SIGINT)
    with _checkpointing.interrupts_deferred() as interrupted:
        signal.raise_signal(signal.SIGINT)  # Recorded, not raised.
        assert interrupted == [True]
    assert signal.getsignal(signal.SIGINT) is before


# --- The training example's command line ----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--eval-every", "0"], "--eval-every: expected an integer >= 1, got '0'"),
        (["--seq-len", "0"], "--seq-len: expected an integer >= 2, got '0'"),
        (["--seq-len", "1"], "--seq-len: expected an integer >= 2, got '1'"),
        (["--batch-size", "0"], "--batch-size: expected an integer >= 1, got '0'"),
        (["--steps", "0"], "--steps: expected an integer >= 1, got '0'"),
        (["--steps", "1.5"], "--steps: expected an integer >= 1, got '1.5'"),
        (
            ["--learning-rate", "nan"],
            "--learning-rate: expected a finite number > 0, got 'nan'",
        ),
        (
            ["--learning-rate", "inf"],
            "--learning-rate: expected a finite number > 0, got 'inf'",
        ),
        (
            ["--learning-rate", "0"],
            "--learning-rate: expected a finite number > 0, got '0'",
        ),
        (
            ["--temperature", "-1"],
            "--temperature: expected a finite number >= 0, got '-1'",
        ),
        (["--prompt", ""], "--prompt: expected a non-empty string, got ''"),
        (["--vocab-size", "100"], "--vocab-size: expected an integer >= 256"),
        (["--stop-after", "0"], "--stop-after: expected an integer >= 1, got '0'"),
    ],
)
def test_train_tiny_lm_rejects_bad_arguments_when_parsing(argv, message, capsys):
    with pytest.raises(SystemExit) as rejected:
        train_tiny_lm.parse_args(argv)
    assert rejected.value.code == 2
    assert f"argument {message}" in capsys.readouterr().err


def test_train_tiny_lm_help_gives_every_option_help_and_its_default(capsys):
    with pytest.raises(SystemExit):
        train_tiny_lm.parse_args(["--help"])
    options = capsys.readouterr().out.split("options:\n", 1)[1]
    # An entry per option: "  --flag METAVAR  help (default: ...)", over some lines.
    entries = {}
    for entry in options.split("\n  --")[1:]:
        flag, *words = entry.split()
        if words and (words[0].startswith("{") or words[0].isupper()):
            words = words[1:]  # The metavar.
        entries["--" + flag] = " ".join(words)
    names = set(vars(train_tiny_lm.parse_args([]))) - {"given"}
    assert set(entries) == {"--" + name.replace("_", "-") for name in names}
    for flag, words in entries.items():
        assert words.count("(default: ") == 1, (flag, words)
        description = words.split("(default: ")[0]
        assert len(description.split()) >= 2, (flag, words)


def test_train_tiny_lm_resume_rejects_a_changed_setting_given_at_its_default(tmp_path):
    """`--steps 1500` is the default, but given explicitly it must agree."""
    saved = vars(train_tiny_lm.parse_args(["--steps", "4", "--temperature", "0.3"]))
    record = {"args": saved}
    args = train_tiny_lm.parse_args(["--resume", "--steps", "1500"])
    with pytest.raises(SystemExit, match="with --steps 4; got --steps 1500"):
        train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoint.json")
    # The sampling settings come back, unless given again.
    args = train_tiny_lm.parse_args(["--resume"])
    train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoint.json")
    assert (args.steps, args.temperature) == (4, 0.3)
    args = train_tiny_lm.parse_args(["--resume", "--temperature", "0.7"])
    train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoint.json")
    assert (args.steps, args.temperature) == (4, 0.7)


def test_train_tiny_lm_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        train_tiny_lm.main(
            ["--text", str(tmp_path / "missing"), "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    saved = vars(train_tiny_lm.parse_args(["--learning-rate", "0.003"]))
    save_step(tmp_path, 3)
    record = json.loads((tmp_path / "checkpoint.json").read_text())
    record["args"] = {k: v for k, v in saved.items() if k != "given"}
    (tmp_path / "checkpoint.json").write_text(json.dumps(record))
    with pytest.raises(
        SystemExit, match="with --learning-rate 0.003; got --learning-rate 0.5"
    ):
        train_tiny_lm.main(
            ["--resume", "--learning-rate", "0.5", "--out", str(tmp_path)]
        )


def test_sampling_at_temperature_zero_is_greedy():
    """Every sample is the argmax continuation, computed here from the logits in
    float64, one token at a time."""
    model, _ = tiny_state(0)
    window = np.zeros(8, dtype=np.int32)
    window[:3] = [5, 1, 7]
    samples = train_tiny_lm.sample_continuations(
        model,
        jnp.asarray(window),
        jnp.asarray(3),
        jax.random.split(jax.random.key(0), 2),
        length=10,
        temperature=0.0,
    )
    tokens = [5, 1, 7]
    for _ in range(10):
        context = np.array(tokens[-8:], dtype=np.int32)
        logits = np.asarray(model(jnp.asarray(context)), dtype=np.float64)[-1]
        # A clear winner, so that rounding in the sampler's program cannot flip it.
        runner_up, best = np.sort(logits)[-2:]
        assert best - runner_up > 1e-3
        tokens.append(int(np.argmax(logits)))
    expected = np.array(tokens[3:])
    np.testing.assert_array_equal(np.asarray(samples), [expected, expected])
