"""Every script in `examples/` runs, in a subprocess, with small settings; the training
example's outputs, its bits per byte, its checkpoints and its resume are checked
against references."""

import gzip
import hashlib
import importlib.util
import io
import lzma
import math
import os
import pathlib
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
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


@pytest.mark.parametrize("name", ["hf_checkpoint.py", "finetune_lora.py"])
def test_example_runs(name, tmp_path):
    assert run_example(name, *SMALL_SETTINGS[name], cwd=tmp_path)


def test_quickstart_prints_bits_per_byte(tmp_path):
    """The first loss, of the initial model, against float64 NumPy: in bits per byte,
    the unit of the training example's log and plot."""
    stdout = run_example(
        "quickstart.py", *SMALL_SETTINGS["quickstart.py"], cwd=tmp_path
    )
    lines = stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["0", "2"]
    assert all(line.endswith(" bits/byte") for line in lines)
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    layer = eqx_embed.ReversibleEmbedding(256, 32, init=init, key=jax.random.key(0))
    table = np.asarray(layer.embedding.weight, np.float64)
    data = np.frombuffer((EXAMPLES / "quickstart.py").read_bytes(), np.uint8)
    logits = table[data[:-1]] @ table.T
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    nats = -log_probs[np.arange(len(data) - 1), data[1:]].mean()
    assert float(lines[0].split()[3]) == pytest.approx(nats / math.log(2), abs=2e-3)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """Four steps of the training example, uninterrupted, saving after each."""
    out = tmp_path_factory.mktemp("straight")
    settings = [*TINY_LM, "--save-every", "1", "--out", str(out)]
    stdout = run_example("train_tiny_lm.py", *settings, cwd=out)
    return out, stdout


def load_run(out: pathlib.Path, *, state: bool = False):
    """The model and the record of a run's newest checkpoint, read back with orbax
    onto this process's one device (with `state`, the leaves of the model and of the
    optimiser state instead of the model)."""
    with ocp.CheckpointManager((out / "checkpoints").absolute()) as manager:
        step = manager.latest_step()
        item = ocp.args.Composite(record=ocp.args.JsonRestore())
        record = manager.restore(step, args=item).record
        config = eqx_embed.TransformerConfig.from_dict(record["config"])
        model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
        optimiser = train_tiny_lm.make_optimiser(train_tiny_lm.parse_args([]))
        optimiser_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
        template = eqx.filter((model, optimiser_state), eqx.is_array)
        item = ocp.args.Composite(state=ocp.args.StandardRestore(template))
        arrays = manager.restore(step, args=item).state
    if state:
        return jax.tree.leaves(arrays), record
    return eqx.combine(arrays[0], model), record


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
    # A checkpoint every step; the newest two kept.
    assert sorted(path.name for path in (out / "checkpoints").iterdir()) == ["3", "4"]
    assert record["sha256"] == {}  # Bytes need no tokenizer file.
    assert not (out / "tokenizer.json").exists()
    assert f"wrote {out / 'checkpoints'}, {out / 'loss.png'}\n" in stdout
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


def same_bits(leaves, expected) -> bool:
    return len(leaves) == len(expected) and all(
        np.asarray(a).tobytes() == np.asarray(b).tobytes()
        for a, b in zip(leaves, expected, strict=True)
    )


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
    halfway, record = load_run(tmp_path, state=True)
    assert record["step"] == 1 and record["history"]["held_out"] == []
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stdout = run_example(
        "train_tiny_lm.py", "--resume", "--out", str(tmp_path), cwd=tmp_path
    )
    assert f"resumed from {tmp_path / 'checkpoints' / '1'} at step 1" in stdout
    resumed, record = load_run(tmp_path, state=True)
    assert not same_bits(resumed, halfway)  # the second half trained
    # Model and optimiser state, bit for bit, and the same losses.
    expected, straight_record = load_run(straight, state=True)
    assert same_bits(resumed, expected)
    assert record["history"] == straight_record["history"]


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
    tokenizer_file = out / "tokenizer.json"
    digest = hashlib.sha256(tokenizer_file.read_bytes()).hexdigest()
    assert record["sha256"] == {"tokenizer.json": digest}
    written = f"{out / 'checkpoints'}, {tokenizer_file}, {out / 'loss.png'}"
    assert f"wrote {written}\n" in stdout
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
    assert same_bits(jax.tree.leaves(tree), jax.tree.leaves(reference))


def save_step(out: pathlib.Path, step: int, side_files=None, args=None):
    """Saves `tiny_state(step)` as the checkpoint of `step`, with `side_files`
    (`{name: bytes}`) beside it and `args` as its settings."""
    out.mkdir(exist_ok=True)
    digests = {}
    for name, data in (side_files or {}).items():
        (out / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    model, state = tiny_state(step)
    record = {"args": args or {}, "history": {"step": step}, "sha256": digests}
    with _checkpointing.checkpoint_manager(out) as manager:
        _checkpointing.save_state(manager, step, model, state, record)
    return model, state


def read_back(out: pathlib.Path):
    """The newest record in `out`, and the state it holds, through the example's
    functions."""
    with _checkpointing.checkpoint_manager(out) as manager:
        record = _checkpointing.latest_record(manager, out)
        state = _checkpointing.restore_state(manager, record["step"], *tiny_state(0))
    return record, state


KILL_DURING_SAVE = """
import os, pathlib, signal, sys
import orbax.checkpoint as ocp
from orbax.checkpoint._src.path import atomicity
sys.path.insert(0, {examples!r})
sys.path.insert(0, {tests!r})
from test_examples import save_step

out = pathlib.Path({out!r})
save_step(out, 3)

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

if {kill_at!r} == "while writing the arrays":
    handler = ocp.StandardCheckpointHandler
    async_save = handler.async_save

    async def writing_then_killed(self, *args, **kwargs):
        futures = await async_save(self, *args, **kwargs)  # Writes under way.
        die()
    handler.async_save = writing_then_killed
else:  # Every file written, the step directory not yet renamed.
    atomicity.AtomicRenameTemporaryPath.finalize = die
save_step(out, 6)
"""


@pytest.mark.parametrize("kill_at", ["while writing the arrays", "before the rename"])
def test_checkpoint_survives_a_kill_during_a_save(tmp_path, kill_at):
    """Saves step 3, then SIGKILLs the process saving step 6 at `kill_at`: step 3
    resumes as it was, and the next save removes the killed one's leftovers."""
    script = KILL_DURING_SAVE.format(
        examples=str(EXAMPLES),
        tests=str(pathlib.Path(__file__).parent),
        out=str(tmp_path),
        kill_at=kill_at,
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == -9, result.stderr[-3000:]
    checkpoints = tmp_path / "checkpoints"
    (leftover,) = [path for path in checkpoints.iterdir() if path.name != "3"]
    assert leftover.name.startswith("6.orbax-checkpoint-tmp")
    record, state = read_back(tmp_path)
    assert record["step"] == 3 and record["history"] == {"step": 3}
    assert_same_leaves(state, tiny_state(3))
    save_step(tmp_path, 6)
    assert sorted(path.name for path in checkpoints.iterdir()) == ["3", "6"]
    record, state = read_back(tmp_path)
    assert record["step"] == 6
    assert_same_leaves(state, tiny_state(6))


RESTORE_ON_DEVICES = """
import json, pathlib, sys
import jax, numpy as np
sys.path.insert(0, {examples!r})
sys.path.insert(0, {tests!r})
import _checkpointing
import eqx_embed
from test_examples import tiny_state

# The vocabulary and the width split over every device of this process.
mesh = jax.make_mesh((jax.device_count(),), ("vocab",))
jax.set_mesh(mesh)
rules = eqx_embed.sharding_rules(vocab="vocab")
model, state = tiny_state(0)
model = eqx_embed.shard_model(model, mesh, rules)
with _checkpointing.checkpoint_manager(pathlib.Path({load!r})) as manager:
    model, state = _checkpointing.restore_state(manager, 1, model, state)
table = model.embedding.embedding.weight
assert len(table.sharding.device_set) == jax.device_count()
leaves = [np.asarray(leaf) for leaf in jax.tree.leaves((model, state))]
np.savez({dump!r}, *leaves)
if {save!r}:
    with _checkpointing.checkpoint_manager(pathlib.Path({save!r})) as manager:
        _checkpointing.save_state(manager, 1, model, state, {{}})
"""


def test_checkpoint_restores_onto_other_device_counts(tmp_path, run_on_devices):
    """Saved from 8 devices (the table split 8 ways), restored onto 4, saved from
    there and restored onto 1: every leaf, bit for bit, each time."""
    save_step(tmp_path / "one", 1)  # Written from this process's one device.
    loads = ["one", "eight", "four"]
    for load, save, devices in zip(
        loads, ["eight", "four", ""], (8, 4, 1), strict=True
    ):
        dump = tmp_path / f"{devices}.npz"
        script = RESTORE_ON_DEVICES.format(
            examples=str(EXAMPLES),
            tests=str(pathlib.Path(__file__).parent),
            load=str(tmp_path / load),
            save=str(tmp_path / save) if save else "",
            dump=str(dump),
        )
        run_on_devices(script + "print('{}')", devices=devices)
        with np.load(dump) as arrays:
            leaves = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
        assert same_bits(leaves, jax.tree.leaves(tiny_state(1)))


def test_replaced_tokenizer_is_refused(tmp_path):
    save_step(tmp_path / "a", 3, {"tokenizer.json": b'{"a": 1}'})
    save_step(tmp_path / "b", 6, {"tokenizer.json": b'{"b": 2}'})
    (tmp_path / "b" / "tokenizer.json").replace(tmp_path / "a" / "tokenizer.json")
    with pytest.raises(SystemExit) as refused:
        read_back(tmp_path / "a")
    message = str(refused.value)
    assert str(tmp_path / "a" / "tokenizer.json") in message
    assert "does not belong to the checkpoint of step 3" in message


def test_bpe_resume_without_its_tokenizer_names_the_file(tmp_path):
    args = vars(train_tiny_lm.parse_args(["--steps", "4"]))
    del args["given"]
    save_step(tmp_path, 3, {"tokenizer.json": b"{}"}, args=args)
    (tmp_path / "tokenizer.json").unlink()
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    assert f"{tmp_path / 'tokenizer.json'} is missing" in str(refused.value)


def test_diverged_model_never_replaces_the_checkpoint(tmp_path):
    save_step(tmp_path, 3)
    model, state = tiny_state(6)
    # One NaN in the last parameter.
    params, static = eqx.partition(model, eqx.is_inexact_array)
    leaves, treedef = jax.tree.flatten(params)
    leaves[-1] = leaves[-1].at[(0,) * leaves[-1].ndim].set(jnp.nan)
    diverged = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
    with (
        _checkpointing.checkpoint_manager(tmp_path) as manager,
        pytest.raises(SystemExit, match="not finite"),
    ):
        _checkpointing.save_state(manager, 6, diverged, state, {})
    assert [path.name for path in (tmp_path / "checkpoints").iterdir()] == ["3"]
    record, restored = read_back(tmp_path)
    assert record["step"] == 3
    assert_same_leaves(restored, tiny_state(3))


def test_train_tiny_lm_stops_on_a_non_finite_loss(tmp_path):
    """A learning rate of 1e30 blows the weights up; the run stops without saving."""
    settings = [*TINY_LM, "--learning-rate", "1e30", "--warmup-steps", "0"]
    with pytest.raises(SystemExit, match="the training loss is (nan|inf)"):
        train_tiny_lm.main([*settings, "--out", str(tmp_path)])
    assert not any((tmp_path / "checkpoints").iterdir())


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
    """Ctrl-C in the middle of saving the last checkpoint waits for the save."""
    import signal

    handler = ocp.StandardCheckpointHandler
    async_save = handler.async_save

    async def interrupted_half_way(self, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)
        return await async_save(self, *args, **kwargs)

    monkeypatch.setattr(handler, "async_save", interrupted_half_way)
    settings = [*TINY_LM, "--steps", "2", "--num-samples", "1", "--out", str(tmp_path)]
    train_tiny_lm.main(settings)
    monkeypatch.undo()
    model, record = load_run(tmp_path)
    assert record["step"] == 2
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
        train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoints" / "4")
    # The sampling settings come back, unless given again.
    args = train_tiny_lm.parse_args(["--resume"])
    train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoints" / "4")
    assert (args.steps, args.temperature) == (4, 0.3)
    args = train_tiny_lm.parse_args(["--resume", "--temperature", "0.7"])
    train_tiny_lm.resume_settings(args, record, tmp_path / "checkpoints" / "4")
    assert (args.steps, args.temperature) == (4, 0.7)


def test_train_tiny_lm_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit, match="no such file or directory"):
        train_tiny_lm.main(
            ["--text", str(tmp_path / "missing"), "--out", str(tmp_path)]
        )
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train_tiny_lm.main(["--resume", "--out", str(tmp_path)])
    saved = vars(train_tiny_lm.parse_args(["--learning-rate", "0.003"]))
    save_step(tmp_path, 3, args={k: v for k, v in saved.items() if k != "given"})
    with pytest.raises(
        SystemExit, match="with --learning-rate 0.003; got --learning-rate 0.5"
    ):
        train_tiny_lm.main(
            ["--resume", "--learning-rate", "0.5", "--out", str(tmp_path)]
        )
    # A new run never writes over a run's checkpoints.
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main([*TINY_LM, "--out", str(tmp_path)])
    assert str(refused.value) == (
        f"--out {tmp_path} holds the checkpoints of a run (step 3): add --resume to "
        "continue it, or give another --out."
    )


def never_trains(*args):
    raise AssertionError("trained although the run could not finish")


def test_train_tiny_lm_names_a_one_byte_text(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny_lm, "make_train_step", never_trains)
    text = tmp_path / "one.txt"
    text.write_bytes(b"x")
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main(["--text", str(text), "--out", str(tmp_path / "out")])
    assert str(refused.value) == (
        f"--text {text}: 1 bytes of text, too little to train on some and hold the "
        "rest out: give more text."
    )


def test_train_tiny_lm_names_an_out_that_is_a_file(tmp_path, monkeypatch):
    monkeypatch.setattr(train_tiny_lm, "make_train_step", never_trains)
    out = tmp_path / "a_file"
    out.write_text("not a directory")
    with pytest.raises(SystemExit) as refused:
        train_tiny_lm.main([*TINY_LM, "--out", str(out)])
    assert str(refused.value) == f"--out {out}: expected a directory, found a file."


def test_train_tiny_lm_checks_out_is_writable_before_training(tmp_path, monkeypatch):
    """A read-only `--out` stops the run before its first step, not at its save.
    (Permissions do not bind root, who runs some CI: the probe file's creation is
    refused here as a read-only directory refuses it.)"""
    import errno
    import os
    import tempfile

    monkeypatch.setattr(train_tiny_lm, "make_train_step", never_trains)
    out = tmp_path / "read_only"
    out.mkdir()
    out.chmod(0o555)
    create = tempfile.TemporaryFile

    def refused_in_out(*args, dir=None, **kwargs):
        if pathlib.Path(dir) == out:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(out))
        return create(*args, dir=dir, **kwargs)

    monkeypatch.setattr(train_tiny_lm.tempfile, "TemporaryFile", refused_in_out)
    try:
        with pytest.raises(SystemExit) as refused:
            train_tiny_lm.main([*TINY_LM, "--out", str(out)])
    finally:
        out.chmod(0o755)
    assert str(refused.value) == (
        f"--out {out}: cannot write there (Permission denied): give a writable "
        "directory."
    )
    assert list(out.iterdir()) == []


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("file", [io.StringIO, Terminal])
def test_progress_bar_redraws_rarely_off_a_terminal(file):
    """Off a terminal every redraw stays in the log: 300 fast steps there redraw at
    the start and at the end only; on a terminal, as often as tqdm likes."""
    stream = file()
    bar = train_tiny_lm.progress_bar(300, 0, file=stream)
    for _ in range(300):
        time.sleep(0.0005)
        bar.update()
    bar.close()
    redraws = stream.getvalue().count("\r")
    if file is Terminal:
        assert redraws > 2
    else:
        assert redraws <= 3
        assert "300/300" in stream.getvalue()


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
