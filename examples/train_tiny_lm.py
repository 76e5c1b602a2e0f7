"""Trains a small language model on the Python standard library's own source code.

With no arguments, an `eqx_embed.TransformerLM` (tied embeddings, rotary position
embeddings, the fused decode cross-entropy) learns from the standard library's
top-level modules, which every Python installation has, in the tokens of a byte-level
BPE trained first on the same text, and is evaluated on held-out modules in bits per
byte, next to what `gzip -9` and `xz -9` achieve on the same bytes. The files are
packed one after another into the training windows, with segment ids that keep each
file's tokens from attending to another's. It saves a checkpoint every
`--save-every` steps and at the end, then writes a loss-curve PNG to `--out` and
prints a few sampled continuations of a prompt.

    python examples/train_tiny_lm.py                       # defaults: under 3 minutes
    python examples/train_tiny_lm.py --text my_project/    # your own files
    python examples/train_tiny_lm.py --tokenizer byte      # bytes as tokens
    python examples/train_tiny_lm.py --stop-after 300      # stop early, then:
    python examples/train_tiny_lm.py --resume              # continue to --steps

A resumed run ends bit for bit where an uninterrupted one does: the batch of step `s`
and every random draw are functions of the seed and `s` only, and the checkpoint holds
the optimiser state as well as the model. The checkpoints are orbax's: sharded, each
process writing its own part, asynchronous, and atomic, so that a kill at any moment
leaves the last finished one whole (`_checkpointing.py`, beside this file). The text
is read and packed in `_data.py`, the options are in `_command_line.py`, the runs of
several processes in `_processes.py` and the tokenizers in `_tokenizers.py`.
"""

import argparse
import dataclasses
import hashlib
import math
import pathlib
import sys
import tempfile
import time
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _checkpointing import (
    CHECKPOINTS_DIR,
    checkpoint_manager,
    interrupts_deferred,
    latest_record,
    restore_state,
    save_state,
    write_atomically,
)
from _command_line import parse_args as read_command_line
from _data import (
    batch_at,
    compressed_bits_per_byte,
    held_out_windows,
    pack_documents,
    read_documents,
    split_documents,
)
from _malloc import keep_freed_memory
from _processes import check_settings_agree, host_copies, process_share, start_processes
from _tokenizers import BPETokenizer, ByteTokenizer
from tqdm import tqdm

import eqx_embed

# The tokenizer and model settings a resumed run must share with the run it resumes.
RESUMABLE_SETTINGS = (
    "text",
    "tokenizer",
    "vocab_size",
    "train_bytes",
    "eval_bytes",
    "seed",
    "steps",
    "batch_size",
    "seq_len",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "learning_rate",
    "warmup_steps",
    "weight_decay",
    "eval_every",
)
# Training losses are read back from the device every this many steps: reading one
# waits for its step to finish, which would keep the host from preparing the next.
READ_LOSSES_EVERY = 50
# Settings a resumed run takes from the checkpoint unless given again.
SAMPLING_SETTINGS = ("prompt", "num_samples", "sample_length", "temperature")
# Where standard error is not a terminal, each progress-bar redraw is a line of a log.
LOG_REDRAW_SECONDS = 30.0
DEFAULT_PROMPT = 'def read_config(path):\n    """'


# --- Data and model ------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line's settings (`_command_line.py`); `given` is the set of those
    given explicitly."""
    return read_command_line(argv, description=__doc__.split("\n\n")[0])


def make_tokenizer(args: argparse.Namespace, train_bytes: bytes, out: pathlib.Path):
    if args.tokenizer == "byte":
        return ByteTokenizer()
    if args.resume:
        return BPETokenizer.load(out)
    return BPETokenizer.train(train_bytes, args.vocab_size)


def make_config(args: argparse.Namespace, vocab_size: int):
    return eqx_embed.TransformerConfig(
        family="llama",
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        max_position_embeddings=args.seq_len,
        tie_word_embeddings=True,
        # A shallow model compiles fast unrolled, and runs faster without the
        # scan's per-layer copies.
        scan_unroll=args.num_layers,
    )


def make_optimiser(args: argparse.Namespace) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=args.learning_rate,
        # At most half the run, so that a short run still decays.
        warmup_steps=min(args.warmup_steps, args.steps // 2),
        decay_steps=args.steps,
        end_value=args.learning_rate / 10,
    )
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b2=0.95, weight_decay=args.weight_decay),
    )


def mean_loss(model, tokens, targets, segment_ids):
    losses = jax.vmap(lambda t, y, s: model.loss(t, y, segment_ids=s))(
        tokens, targets, segment_ids
    )
    return jnp.mean(losses)


def make_train_step(optimiser: optax.GradientTransformation):
    @eqx.filter_jit
    def train_step(model, optimiser_state, tokens, targets, segment_ids):
        loss, grads = eqx.filter_value_and_grad(mean_loss)(
            model, tokens, targets, segment_ids
        )
        # The plain Equinox filter: floating-point arrays train; the RoPE tables,
        # which are not floating arrays, and the static config never do.
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, optimiser_state = optimiser.update(grads, optimiser_state, params)
        return eqx.apply_updates(model, updates), optimiser_state, loss

    return train_step


@eqx.filter_jit
def summed_loss(model, tokens, targets, where, segment_ids):
    losses = jax.vmap(lambda t, y, w, s: model.loss(t, y, where=w, segment_ids=s))(
        tokens, targets, where, segment_ids
    )
    return jnp.sum(losses)


def held_out_bits_per_byte(
    model, windows, num_bytes: int, batch_size: int, mesh=None
) -> float:
    nats = 0.0
    for start in range(0, len(windows[0]), batch_size):
        batch = slice(start, start + batch_size)
        shares = process_share(mesh, *(array[batch] for array in windows))
        nats += float(summed_loss(model, *shares))
    return nats / math.log(2) / num_bytes


def sample_continuations(model, window, filled, keys, *, length, temperature):
    """Samples `length` tokens after a prompt, once per key (at `temperature` 0, the
    likeliest token every time), with `TransformerLM.generate` (a KV cache: each new
    token costs one token's pass, not the whole window's).

    `window` is a fixed-size buffer of the model's context length whose first `filled`
    tokens are the prompt. Each new token reads at most the last `context` tokens, as
    if the window slid by one token per step: with RoPE, attention depends on
    position differences only, so that is a sliding-window attention of `context`
    tokens. The same weights under a config with that window (and RoPE tables for
    every position) generate it in one compiled loop, keeping only `context` keys
    and values per layer. The rows are sampled together, seeded by `keys[0]` (the
    number of keys sets how many).
    """
    context, filled = window.shape[0], int(filled)
    config = dataclasses.replace(
        model.config,
        sliding_window=context,
        max_position_embeddings=max(filled + length, context),
    )
    sliding = eqx_embed.TransformerLM(
        config,
        embedding=model.embedding,
        blocks=model.blocks,
        final_norm=model.final_norm,
    )
    prompts = np.tile(np.asarray(window)[:filled], (len(keys), 1))
    return sliding.generate(
        prompts,
        max_new_tokens=length,
        temperature=temperature,
        key=keys[0] if temperature > 0 else None,
    )


# --- Checkpoints and outputs ----------------------------------------------------------


def checkpoint_record(
    args: argparse.Namespace, model, history: dict, side_digests: dict[str, str]
) -> dict:
    """What a checkpoint's `record` keeps beside the step: the config, the settings, a
    copy of the history (the save runs on while training appends to it) and the
    SHA-256 of the side files."""
    names = RESUMABLE_SETTINGS + SAMPLING_SETTINGS
    return {
        "config": model.config.to_dict(),
        "args": {name: getattr(args, name) for name in names},
        "history": {name: list(values) for name, values in history.items()},
        "sha256": dict(side_digests),
    }


def prepare_output(out: pathlib.Path) -> None:
    """Creates `--out` if needed and checks that files can be written there, before
    anything trains: a run must never reach its first save to find it cannot."""
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: expected a directory, found a file.")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out) as probe:
            probe.write(b"ok")
    except OSError as error:
        raise SystemExit(
            f"--out {out}: cannot write there ({error.strerror or error}): give a "
            "writable directory."
        ) from None


def resume_settings(args: argparse.Namespace, record: dict, path: pathlib.Path):
    """Takes the run's settings from its checkpoint record `record` (read from `path`):
    a training setting given now must agree; a sampling setting given now wins."""
    saved = record.get("args", {})
    missing = [
        name for name in RESUMABLE_SETTINGS + SAMPLING_SETTINGS if name not in saved
    ]
    if missing:
        raise SystemExit(f"--resume: {path} has no setting {', '.join(missing)}.")
    for name in RESUMABLE_SETTINGS:
        given, value = getattr(args, name), saved[name]
        if name in args.given and given != value:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(
                f"--resume continues the run as it was started, with {flag} {value}; "
                f"got {flag} {given}."
            )
        setattr(args, name, value)
    for name in SAMPLING_SETTINGS:
        if name not in args.given:
            setattr(args, name, saved[name])


def prompt_bytes(args: argparse.Namespace, held_out: bytes) -> bytes:
    """`--prompt`, or by default a Python function header for the standard library
    and, for `--text`, the start of the held-out text: its first non-blank line, at
    most half a window long."""
    if args.prompt is not None:
        return args.prompt.encode()
    if args.text is None:
        return DEFAULT_PROMPT.encode()
    first_line = held_out.lstrip().split(b"\n", 1)[0] or held_out
    return first_line[: args.seq_len // 2]


def plot_history(
    history: dict, baselines: dict[str, float], path: pathlib.Path, title: str
):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.2))
    train = np.asarray(history["train_bits_per_byte"])
    steps = np.arange(1, len(train) + 1)
    window = max(1, len(train) // 50)
    smooth = np.convolve(train, np.ones(window) / window, mode="valid")
    axes.plot(steps, train, color="tab:blue", alpha=0.25, linewidth=0.8)
    axes.plot(steps[window - 1 :], smooth, color="tab:blue", label="train")
    if history["held_out"]:  # None yet if the run stopped before its first one.
        eval_steps, eval_bits = zip(*history["held_out"], strict=True)
        axes.plot(eval_steps, eval_bits, "o-", color="tab:red", label="held out")
    for (name, bits), style in zip(baselines.items(), ("--", ":"), strict=False):
        axes.axhline(bits, color="gray", linestyle=style, label=f"{name} (held out)")
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("bits per byte")
    axes.set_ylim(0, min(8.5, float(np.max(train, initial=0.0)) + 0.5))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- Command line ---------------------------------------------------------------------

# --- The run ----------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What training, evaluation and sampling need, prepared from the settings."""

    tokenizer: BPETokenizer | ByteTokenizer
    train_stream: np.ndarray
    train_segments: np.ndarray
    held_out_bytes: bytes
    windows: tuple[np.ndarray, ...]
    scored_bytes: int
    baselines: dict[str, float]
    side_digests: dict[str, str]
    model: eqx_embed.TransformerLM
    sample_key: jax.Array
    mesh: jax.sharding.Mesh | None
    title: str


def prepare_run(args: argparse.Namespace, out: pathlib.Path, record, mesh) -> Run:
    """Reads and tokenizes the text, writes the tokenizer (or, resuming, reads it back)
    and makes the model, laid out over `mesh`."""
    documents = read_documents(args.text)
    train_documents, held_out_documents = split_documents(documents)
    train_bytes = b"\n".join(train_documents)[: args.train_bytes]
    if not train_bytes or not any(held_out_documents):
        raise SystemExit(
            f"--text {args.text}: {sum(map(len, documents))} bytes of text, too "
            "little to train on some and hold the rest out: give more text."
        )
    tokenizer = make_tokenizer(args, train_bytes, out)
    _, train_stream, train_segments = pack_documents(
        tokenizer, train_documents, args.train_bytes
    )
    held_out_bytes, held_out_stream, held_out_segments = pack_documents(
        tokenizer, held_out_documents, args.eval_bytes
    )
    if len(train_stream) <= args.seq_len:
        raise SystemExit(
            f"The training text has {len(train_stream)} tokens, not more than "
            f"--seq-len {args.seq_len}: give more text or a shorter --seq-len."
        )
    windows = held_out_windows(
        held_out_stream,
        held_out_segments,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    scored_bytes = tokenizer.token_bytes(windows[1][windows[2]])
    print(
        f"data: {len(documents)} documents; train {len(train_bytes):,} bytes = "
        f"{len(train_stream):,} tokens; held out {len(scored_bytes):,} bytes scored "
        f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens)"
    )
    if record is not None:  # The side files the record's checksums vouch for.
        side_digests = record["sha256"]
    else:
        side_files = tokenizer.side_files()
        side_digests = {
            name: hashlib.sha256(data).hexdigest() for name, data in side_files.items()
        }
        if jax.process_index() == 0:
            for name, data in side_files.items():
                write_atomically(out / name, lambda file, data=data: file.write(data))

    config = make_config(args, tokenizer.vocab_size)
    model_key, sample_key = jax.random.split(jax.random.key(args.seed))
    model = eqx_embed.TransformerLM(config, key=model_key)
    if mesh is not None:  # Replicated over the processes' devices.
        model = eqx_embed.shard_model(model, mesh, eqx_embed.sharding_rules())
    num_params = sum(
        leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    print(f"model: {num_params:,} parameters, {config.num_layers} layers")
    source = "the Python standard library" if args.text is None else args.text
    return Run(
        tokenizer=tokenizer,
        train_stream=train_stream,
        train_segments=train_segments,
        held_out_bytes=held_out_bytes,
        windows=windows,
        scored_bytes=len(scored_bytes),
        baselines=compressed_bits_per_byte(scored_bytes),
        side_digests=side_digests,
        model=model,
        sample_key=sample_key,
        mesh=mesh,
        title=f"{num_params:,}-parameter TransformerLM on {source} "
        f"({tokenizer.kind} tokens)",
    )


def progress_bar(total: int, initial: int, file=None) -> tqdm:
    """A tqdm bar on `file` (standard error by default). Where that is not a terminal
    (a log file, a pipe), each redraw is a line of its own, so the bar redraws at
    most every `LOG_REDRAW_SECONDS` there instead of ten times a second."""
    file = sys.stderr if file is None else file
    terminal = hasattr(file, "isatty") and file.isatty()
    return tqdm(
        total=total,
        initial=initial,
        unit="step",
        file=file,
        dynamic_ncols=terminal,
        mininterval=0.1 if terminal else LOG_REDRAW_SECONDS,
        maxinterval=10.0 if terminal else LOG_REDRAW_SECONDS,
    )


def train(args: argparse.Namespace, run: Run, manager, record):
    """Trains from the start or from `record`'s checkpoint to `--stop-after` or
    `--steps`, evaluating every `--eval-every` steps and saving every `--save-every`
    and at the end. **Returns:** the model and the history."""
    model, mesh = run.model, run.mesh
    optimiser = make_optimiser(args)
    optimiser_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    history = {"train_loss": [], "train_bits_per_byte": [], "held_out": []}
    step = 0
    if record is not None:
        step, history = record["step"], record["history"]
        model, optimiser_state = restore_state(manager, step, model, optimiser_state)
        print(f"resumed from {manager.directory / str(step)} at step {step}")
    byte_lengths = run.tokenizer.byte_lengths()

    def evaluate(step: int) -> None:
        bits = held_out_bits_per_byte(
            model, run.windows, run.scored_bytes, args.batch_size, mesh
        )
        history["held_out"].append((step, bits))
        compressors = ", ".join(f"{k} {v:.3f}" for k, v in run.baselines.items())
        tqdm.write(f"step {step:5d}  held-out {bits:.3f} bits/byte  ({compressors})")

    def save(step: int) -> None:
        record = checkpoint_record(args, model, history, run.side_digests)
        save_state(manager, step, model, optimiser_state, record)

    train_step = make_train_step(optimiser)
    stop = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    tokens_per_step = args.batch_size * args.seq_len
    bar = progress_bar(args.steps, step)
    unread = []  # (step, bytes of its targets, loss still on the device)
    timed = None  # (step, time) once this process's first step, which compiles, ran

    def read_losses() -> None:
        """Reads the losses of the steps run since the last read into `history`;
        stops the run at the first that is not finite."""
        nonlocal timed
        losses = jax.device_get([loss for *_, loss in unread])
        for (step_done, num_bytes, _), loss in zip(unread, losses, strict=True):
            loss = float(loss)
            if not math.isfinite(loss):
                raise SystemExit(
                    f"step {step_done}: the training loss is {loss}; stopped without "
                    f"saving, so {manager.directory} keeps its checkpoints, if any. "
                    f"Try a lower --learning-rate than {args.learning_rate}."
                )
            history["train_loss"].append(loss)
            history["train_bits_per_byte"].append(
                loss * tokens_per_step / math.log(2) / num_bytes
            )
        if unread:
            now, last = time.perf_counter(), unread[-1][0]
            if timed is None:
                timed = last, now
            elif last > timed[0]:
                rate = (last - timed[0]) * tokens_per_step / (now - timed[1])
                bits = history["train_bits_per_byte"][-1]
                bar.set_postfix_str(
                    f"train {bits:.3f} bits/byte, {rate:,.0f} tokens/s", refresh=False
                )
        unread.clear()

    # Ctrl-C ends the run after the current step, which then checkpoints as usual;
    # one during the save waits for the save to finish.
    with interrupts_deferred() as interrupted:
        while step < stop and not interrupted:
            tokens, targets, segment_ids = batch_at(
                step,
                run.train_stream,
                run.train_segments,
                seed=args.seed,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
            )
            model, optimiser_state, loss = train_step(
                model,
                optimiser_state,
                *process_share(mesh, tokens, targets, segment_ids),
            )
            step += 1
            unread.append((step, int(byte_lengths[targets].sum()), loss))
            evaluating = step % args.eval_every == 0 or step == args.steps
            saving = step % args.save_every == 0 and step < stop
            if timed is None or evaluating or saving or step % READ_LOSSES_EVERY == 0:
                read_losses()
            bar.update()
            if evaluating:
                evaluate(step)
            if saving:
                save(step)
        read_losses()
        bar.close()
        if interrupted:
            print(f"interrupted at step {step}: --resume continues from here")
        if manager.latest_step() != step:
            save(step)
        manager.wait_until_finished()
    return model, history


def print_samples(args: argparse.Namespace, run: Run, model) -> None:
    """Prints `--num-samples` continuations of the prompt."""
    tokenizer = run.tokenizer
    prompt = tokenizer.encode(prompt_bytes(args, run.held_out_bytes))
    prompt = prompt[-(args.seq_len - 1) :]
    window = np.zeros(args.seq_len, dtype=np.int32)
    window[: len(prompt)] = prompt
    (model,) = host_copies(run.mesh, model)  # Process 0 samples on its own devices.
    samples = sample_continuations(
        model,
        jnp.asarray(window),
        jnp.asarray(len(prompt)),
        jax.random.split(run.sample_key, args.num_samples),
        length=args.sample_length,
        temperature=args.temperature,
    )
    for i, sample in enumerate(np.asarray(samples)):
        print(f"--- sample {i + 1} ---")
        text = tokenizer.token_bytes(np.concatenate([prompt, sample]))
        print(text.decode("utf-8", errors="replace"))


# --- Main -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    keep_freed_memory()  # Before JAX starts its threads: see _malloc.py.
    out = pathlib.Path(args.out)
    prepare_output(out)
    started = time.perf_counter()
    mesh = start_processes(args)
    check_settings_agree(args)  # Before any process reads a checkpoint.
    with checkpoint_manager(out) as manager:
        record = None
        if args.resume:
            record = latest_record(manager, out)
            resume_settings(args, record, manager.directory / str(record["step"]))
        elif manager.latest_step() is not None:
            raise SystemExit(
                f"--out {out} holds the checkpoints of a run (step "
                f"{manager.latest_step()}): add --resume to continue it, or give "
                "another --out."
            )
        run = prepare_run(args, out, record, mesh)
        model, history = train(args, run, manager, record)
    if jax.process_index() != 0:
        return history
    plot_history(history, run.baselines, out / "loss.png", run.title)
    written = [out / CHECKPOINTS_DIR, *(out / name for name in run.side_digests)]
    print(f"wrote {', '.join(map(str, [*written, out / 'loss.png']))}")
    print_samples(args, run, model)
    print(f"done in {time.perf_counter() - started:.0f} s")
    return history


if __name__ == "__main__":
    main()
