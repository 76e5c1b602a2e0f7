"""Trains a small language model on the Python standard library's own source code.

With no arguments, a byte-level `eqx_embed.TransformerLM` (tied embeddings, rotary
position embeddings, the fused decode cross-entropy) learns from the standard library's
top-level modules, which every Python installation has, and is evaluated on held-out
modules in bits per byte, next to what `gzip -9` and `xz -9` achieve on the same bytes.
At the end it writes a checkpoint, a loss-curve PNG and a few sampled continuations of a
prompt to `--out`.

    python examples/train_tiny_lm.py                       # defaults: under 3 minutes
    python examples/train_tiny_lm.py --text my_project/    # your own files
    python examples/train_tiny_lm.py --tokenizer bpe       # a BPE trained on the fly
    python examples/train_tiny_lm.py --stop-after 300      # stop early, then:
    python examples/train_tiny_lm.py --resume              # continue to --steps

A resumed run ends bit for bit where an uninterrupted one does: the batch of step `s`
and every random draw are functions of the seed and `s` only, and the checkpoint holds
the optimiser state as well as the model.
"""

import argparse
import gzip
import json
import lzma
import math
import pathlib
import signal
import sysconfig
import time
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import eqx_embed

# Held-out documents: every HELD_OUT_EVERY-th one, starting half-way into the stride.
HELD_OUT_EVERY = 16
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


# --- Data -----------------------------------------------------------------------------


def read_documents(text: str | None) -> list[bytes]:
    """The documents to learn from, in a fixed order.

    `None`: the standard library's top-level `.py` modules, sorted by name. Otherwise
    the file `text`, or every file under the directory `text` (hidden ones and binary
    ones, which contain a NUL byte, excluded), sorted by path.
    """
    if text is None:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        paths = sorted(root.glob("*.py"))
    else:
        root = pathlib.Path(text)
        if root.is_file():
            paths = [root]
        elif root.is_dir():
            paths = sorted(
                path
                for path in root.rglob("*")
                if path.is_file()
                and not any(
                    part.startswith(".") for part in path.relative_to(root).parts
                )
            )
        else:
            raise SystemExit(f"--text {text}: no such file or directory.")
    documents = [path.read_bytes() for path in paths]
    documents = [
        document for document in documents if document and b"\0" not in document
    ]
    if not documents:
        raise SystemExit(f"--text {text}: found no non-empty text files.")
    return documents


def split_documents(documents: list[bytes]) -> tuple[bytes, bytes]:
    """Train and held-out bytes: whole documents go to one side or the other.

    A single document is cut at 90% instead.
    """
    if len(documents) == 1:
        (document,) = documents
        cut = len(document) * 9 // 10
        return document[:cut], document[cut:]
    held_out_indices = set(range(HELD_OUT_EVERY // 2, len(documents), HELD_OUT_EVERY))
    held_out_indices = held_out_indices or {len(documents) - 1}
    train = [doc for i, doc in enumerate(documents) if i not in held_out_indices]
    held_out = [doc for i, doc in enumerate(documents) if i in held_out_indices]
    return b"\n".join(train), b"\n".join(held_out)


class ByteTokenizer:
    """Every byte is a token."""

    kind = "byte"
    vocab_size = 256

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def token_bytes(self, ids: np.ndarray) -> bytes:
        return np.asarray(ids, dtype=np.uint8).tobytes()

    def byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def save(self, directory: pathlib.Path) -> None:
        pass


class BPETokenizer:
    """A byte-level BPE from Hugging Face `tokenizers`, trained on the training text.

    Byte-level: every token stands for a whole number of bytes of the input, so the
    held-out loss converts exactly to bits per byte.
    """

    kind = "bpe"
    filename = "tokenizer.json"

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def train(cls, data: bytes, vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tokenizer.train_from_iterator(_lines(data), trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, directory: pathlib.Path) -> "BPETokenizer":
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(directory / cls.filename)))

    def save(self, directory: pathlib.Path) -> None:
        self.tokenizer.save(str(directory / self.filename))

    def encode(self, data: bytes) -> np.ndarray:
        # Line by line, so that the Rust side encodes in parallel.
        encodings = self.tokenizer.encode_batch(_lines(data))
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def _token_strings(self) -> list[str]:
        return [self.tokenizer.id_to_token(i) for i in range(self.vocab_size)]

    def token_bytes(self, ids: np.ndarray) -> bytes:
        return self.tokenizer.decode(np.asarray(ids).tolist()).encode()

    def byte_lengths(self) -> np.ndarray:
        # ByteLevel writes each byte of the input as one character of a token.
        return np.array([len(token) for token in self._token_strings()])


def _lines(data: bytes) -> list[str]:
    return data.decode("utf-8", errors="replace").splitlines(keepends=True)


def make_tokenizer(args: argparse.Namespace, train_bytes: bytes, out: pathlib.Path):
    if args.tokenizer == "byte":
        return ByteTokenizer()
    if args.resume:
        return BPETokenizer.load(out)
    return BPETokenizer.train(train_bytes, args.vocab_size)


def batch_at(
    step: int, stream: np.ndarray, *, seed: int, batch_size: int, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The training batch of step `step`: random windows of the token stream, drawn
    from a generator seeded by `(seed, step)` alone, so that a resumed run sees the
    same batches as an uninterrupted one."""
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, len(stream) - seq_len, size=batch_size)
    windows = stream[starts[:, None] + np.arange(seq_len + 1)]
    return windows[:, :-1], windows[:, 1:]


def held_out_windows(
    stream: np.ndarray, *, seq_len: int, batch_size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows over the held-out stream, in whole batches, and which tokens each one
    scores.

    A window starts every `seq_len // 2` tokens and scores only the targets the
    previous one did not (its second half; the first window scores all of its own),
    so every target but the trailing remainder is scored exactly once, with at least
    `seq_len // 2` tokens of context from the second window on, as a model reading
    the text from the start would have. (Windows that do not overlap would score the
    first tokens of each window almost blind.) The last batch is padded with windows
    that score nothing.
    """
    stride = seq_len // 2
    if len(stream) < seq_len + 1:
        raise SystemExit(
            f"The held-out text has {len(stream)} tokens, fewer than --seq-len "
            f"{seq_len} + 1: give more text or a shorter --seq-len."
        )
    starts = np.arange(0, len(stream) - seq_len, stride)
    tokens = stream[starts[:, None] + np.arange(seq_len)]
    targets = stream[starts[:, None] + np.arange(1, seq_len + 1)]
    where = np.ones(tokens.shape, dtype=bool)
    where[1:, : seq_len - stride] = False
    padding = ((0, -len(starts) % batch_size), (0, 0))
    return np.pad(tokens, padding), np.pad(targets, padding), np.pad(where, padding)


def compressed_bits_per_byte(data: bytes) -> dict[str, float]:
    """What the classic compressors achieve on `data`, in bits per byte."""
    return {
        "gzip -9": 8 * len(gzip.compress(data, compresslevel=9)) / len(data),
        "xz -9": 8 * len(lzma.compress(data, preset=9)) / len(data),
    }


# --- Model and training ---------------------------------------------------------------


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


def mean_loss(model, tokens, targets):
    return jnp.mean(jax.vmap(model.loss)(tokens, targets))


def make_train_step(optimiser: optax.GradientTransformation):
    @eqx.filter_jit
    def train_step(model, optimiser_state, tokens, targets):
        loss, grads = eqx.filter_value_and_grad(mean_loss)(model, tokens, targets)
        # The plain Equinox filter: floating-point arrays train; the RoPE tables,
        # which are not floating arrays, and the static config never do.
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, optimiser_state = optimiser.update(grads, optimiser_state, params)
        return eqx.apply_updates(model, updates), optimiser_state, loss

    return train_step


@eqx.filter_jit
def summed_loss(model, tokens, targets, where):
    return jnp.sum(jax.vmap(model.loss)(tokens, targets, where=where))


def held_out_bits_per_byte(model, windows, num_bytes: int, batch_size: int) -> float:
    tokens, targets, where = windows
    nats = 0.0
    for start in range(0, len(tokens), batch_size):
        batch = slice(start, start + batch_size)
        nats += float(summed_loss(model, tokens[batch], targets[batch], where[batch]))
    return nats / math.log(2) / num_bytes


def sample_continuations(model, window, filled, keys, *, length, temperature):
    """Samples `length` tokens after a prompt, once per key, with
    `TransformerLM.generate` (a KV cache: each new token costs one token's pass, not
    the whole window's).

    `window` is a fixed-size buffer of the model's context length whose first `filled`
    tokens are the prompt. The model reads at most that many positions, so sampling
    goes in chunks: each continues the last half-window of text with a half-window of
    new tokens. Every chunk has the same shapes, so `generate` compiles once. The
    rows are sampled together; `keys[0]` seeds them (the number of keys sets how many).
    """
    context = window.shape[0]
    keep, new = context // 2, context - context // 2
    text = np.tile(np.asarray(window)[: int(filled)], (len(keys), 1))
    start = text.shape[1]
    for chunk in range(-(-length // new)):
        prompt = text[:, -keep:]
        prompts = np.zeros((len(keys), keep), dtype=np.int32)
        prompts[:, : prompt.shape[1]] = prompt
        sampled = model.generate(
            prompts,
            prompt_lengths=np.full(len(keys), prompt.shape[1]),
            max_new_tokens=new,
            temperature=temperature,
            key=jax.random.fold_in(keys[0], chunk),
        )
        text = np.concatenate([text, np.asarray(sampled)], axis=1)
    return jnp.asarray(text[:, start : start + length])


# --- Checkpoints and outputs ----------------------------------------------------------


def save_checkpoint(out, model, optimiser_state, tokenizer, args, step, history):
    """Model and optimiser state to `checkpoint.eqx`; the config, the settings, the
    step and the history to `checkpoint.json`."""
    eqx.tree_serialise_leaves(out / "checkpoint.eqx", (model, optimiser_state))
    tokenizer.save(out)
    settings = {name: getattr(args, name) for name in RESUMABLE_SETTINGS}
    record = {
        "config": model.config.to_dict(),
        "args": settings,
        "step": step,
        "history": history,
    }
    (out / "checkpoint.json").write_text(json.dumps(record, indent=2) + "\n")


def load_checkpoint(out, model, optimiser_state):
    """The model, optimiser state, step and history saved in `out`; `model` and
    `optimiser_state` give the structure to read into."""
    record = json.loads((out / "checkpoint.json").read_text())
    model, optimiser_state = eqx.tree_deserialise_leaves(
        out / "checkpoint.eqx", (model, optimiser_state)
    )
    return model, optimiser_state, record["step"], record["history"]


def resume_settings(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Takes the run's settings from its checkpoint; a flag given now must agree."""
    path = pathlib.Path(args.out) / "checkpoint.json"
    if not path.exists():
        raise SystemExit(f"--resume: no checkpoint at {path}.")
    saved = json.loads(path.read_text())["args"]
    for name, value in saved.items():
        given = getattr(args, name)
        if given != parser.get_default(name) and given != value:
            flag = "--" + name.replace("_", "-")
            raise SystemExit(
                f"--resume continues the run as it was started, with {flag} {value}; "
                f"got {flag} {given}."
            )
        setattr(args, name, value)


def plot_history(history: dict, baselines: dict[str, float], path: pathlib.Path):
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
    eval_steps, eval_bits = zip(*history["held_out"], strict=True)
    axes.plot(eval_steps, eval_bits, "o-", color="tab:red", label="held out")
    for (name, bits), style in zip(baselines.items(), ("--", ":"), strict=False):
        axes.axhline(bits, color="gray", linestyle=style, label=f"{name} (held out)")
    axes.set_xlabel("step")
    axes.set_ylabel("bits per byte")
    axes.set_ylim(0, min(8.5, float(np.max(train)) + 0.5))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# --- Main -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--text",
        default=None,
        help="a file or directory to learn from "
        "(default: the Python standard library's top-level modules)",
    )
    add("--tokenizer", choices=("byte", "bpe"), default="byte")
    add("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    add(
        "--train-bytes",
        type=int,
        default=4_000_000,
        help="at most this much text trains (the first documents)",
    )
    add("--eval-bytes", type=int, default=65_536, help="held-out bytes scored")
    add("--seed", type=int, default=0)
    add("--steps", type=int, default=1700)
    add("--batch-size", type=int, default=32)
    add("--seq-len", type=int, default=64)
    add("--hidden-size", type=int, default=96)
    add("--intermediate-size", type=int, default=288)
    add("--num-layers", type=int, default=2)
    add("--num-heads", type=int, default=4)
    add("--num-kv-heads", type=int, default=2)
    add("--learning-rate", type=float, default=1e-2)
    add("--warmup-steps", type=int, default=50)
    add("--weight-decay", type=float, default=0.1)
    add("--eval-every", type=int, default=850)
    add("--out", default="runs/tiny_lm", help="output directory")
    add("--resume", action="store_true", help="continue the run saved in --out")
    add(
        "--stop-after",
        type=int,
        default=None,
        help="stop (and checkpoint) after "
        "this many steps in all, keeping the schedule of --steps",
    )
    add("--prompt", default='def read_config(path):\n    """')
    add("--num-samples", type=int, default=3)
    add("--sample-length", type=int, default=200, help="new tokens per sample")
    add("--temperature", type=float, default=0.7)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if args.resume:
        resume_settings(args, parser)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    documents = read_documents(args.text)
    train_bytes, held_out_bytes = split_documents(documents)
    train_bytes = train_bytes[: args.train_bytes]
    held_out_bytes = held_out_bytes[: args.eval_bytes]
    tokenizer = make_tokenizer(args, train_bytes, out)
    train_stream = tokenizer.encode(train_bytes)
    held_out_stream = tokenizer.encode(held_out_bytes)
    if len(train_stream) <= args.seq_len:
        raise SystemExit(
            f"The training text has {len(train_stream)} tokens, not more than "
            f"--seq-len {args.seq_len}: give more text or a shorter --seq-len."
        )
    windows = held_out_windows(
        held_out_stream, seq_len=args.seq_len, batch_size=args.batch_size
    )
    scored_bytes = tokenizer.token_bytes(windows[1][windows[2]])
    baselines = compressed_bits_per_byte(scored_bytes)
    byte_lengths = tokenizer.byte_lengths()
    print(
        f"data: {len(documents)} documents; train {len(train_bytes):,} bytes = "
        f"{len(train_stream):,} tokens; held out {len(scored_bytes):,} bytes scored "
        f"({tokenizer.kind} tokenizer, {tokenizer.vocab_size} tokens)"
    )

    config = make_config(args, tokenizer.vocab_size)
    model_key, sample_key = jax.random.split(jax.random.key(args.seed))
    model = eqx_embed.TransformerLM(config, key=model_key)
    optimiser = make_optimiser(args)
    optimiser_state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
    history = {"train_loss": [], "train_bits_per_byte": [], "held_out": []}
    step = 0
    if args.resume:
        model, optimiser_state, step, history = load_checkpoint(
            out, model, optimiser_state
        )
        print(f"resumed from {out / 'checkpoint.eqx'} at step {step}")
    num_params = sum(
        leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    print(f"model: {num_params:,} parameters, {config.num_layers} layers")

    def evaluate(step: int) -> None:
        bits = held_out_bits_per_byte(
            model, windows, len(scored_bytes), args.batch_size
        )
        history["held_out"].append((step, bits))
        compressors = ", ".join(f"{k} {v:.3f}" for k, v in baselines.items())
        tqdm.write(f"step {step:5d}  held-out {bits:.3f} bits/byte  ({compressors})")

    train_step = make_train_step(optimiser)
    stop = args.steps if args.stop_after is None else min(args.stop_after, args.steps)
    tokens_per_step = args.batch_size * args.seq_len
    bar = tqdm(total=args.steps, initial=step, unit="step", dynamic_ncols=True)
    train_seconds = 0.0
    # Ctrl-C ends the run after the current step, which then checkpoints as usual.
    interrupted = []
    signal.signal(signal.SIGINT, lambda *_: interrupted.append(True))
    while step < stop and not interrupted:
        step_started = time.perf_counter()
        tokens, targets = batch_at(
            step,
            train_stream,
            seed=args.seed,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
        )
        model, optimiser_state, loss = train_step(
            model, optimiser_state, tokens, targets
        )
        loss = float(loss)
        if bar.n > bar.initial:  # The first step of a process compiles: not timed.
            train_seconds += time.perf_counter() - step_started
            rate = (bar.n - bar.initial) * tokens_per_step / train_seconds
            bar.set_postfix(loss=f"{loss:.3f}", tokens_per_s=f"{rate:,.0f}")
        step += 1
        bar.update()
        history["train_loss"].append(loss)
        history["train_bits_per_byte"].append(
            loss * tokens_per_step / math.log(2) / int(byte_lengths[targets].sum())
        )
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if interrupted:
        tqdm.write(f"interrupted at step {step}: --resume continues from here")
    bar.close()

    save_checkpoint(out, model, optimiser_state, tokenizer, args, step, history)
    plot_history(history, baselines, out / "loss.png")
    print(
        f"wrote {out / 'checkpoint.eqx'}, {out / 'checkpoint.json'}, {out / 'loss.png'}"
    )

    prompt = tokenizer.encode(args.prompt.encode())[-(args.seq_len - 1) :]
    if not len(prompt):
        raise SystemExit("--prompt must not be empty: sampling continues it.")
    window = np.zeros(args.seq_len, dtype=np.int32)
    window[: len(prompt)] = prompt
    samples = sample_continuations(
        model,
        jnp.asarray(window),
        jnp.asarray(len(prompt)),
        jax.random.split(sample_key, args.num_samples),
        length=args.sample_length,
        temperature=args.temperature,
    )
    for i, sample in enumerate(np.asarray(samples)):
        print(f"--- sample {i + 1} ---")
        text = tokenizer.token_bytes(np.concatenate([prompt, sample]))
        print(text.decode("utf-8", errors="replace"))
    print(f"done in {time.perf_counter() - started:.0f} s")
    return history


if __name__ == "__main__":
    main()
