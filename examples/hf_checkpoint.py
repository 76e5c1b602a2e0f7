"""Scores a text with a Hugging Face checkpoint: perplexity, and bits per byte.

Loads a checkpoint directory (`config.json` and `*.safetensors`, as `save_pretrained`
writes them) with `eqx_embed.TransformerLM.from_huggingface`, which needs neither
PyTorch nor `transformers`, and prints the perplexity of a text under it.

    python examples/hf_checkpoint.py CHECKPOINT --text FILE       # tokenizer.json
    python examples/hf_checkpoint.py CHECKPOINT --token-ids FILE  # ints, or a .npy
    python examples/hf_checkpoint.py --demo                       # no checkpoint
    python examples/hf_checkpoint.py CHECKPOINT --generate "PROMPT"

`--text` encodes the file with the `tokenizers` tokenizer in `CHECKPOINT/tokenizer.json`
(or `--tokenizer FILE`), special tokens included as the tokenizer's post-processor adds
them, and also prints bits per byte. `--token-ids` reads whitespace-separated integers
or a `.npy` array instead.

`--demo` is the smoke invocation (what `tests/test_examples.py` runs): it writes a tiny
random Llama with `TransformerLM.to_huggingface` and a byte-level BPE tokenizer trained
on this file's source to a temporary directory, then scores this file's source with it.
It needs only the `[examples]` extra. The weights are random, so expect a perplexity
of the order of the 512-token vocabulary.

`--generate PROMPT` continues the prompt instead of scoring a text: it encodes it
with the tokenizer, runs `TransformerLM.generate` (a KV cache, one compiled loop;
greedy unless `--temperature` is positive) for `--max-new-tokens` tokens, stopping at
the checkpoint's `eos_token_id` if its `generation_config.json` or `config.json` names
one, and prints the prompt and its continuation. `--demo --generate PROMPT` does so
with the tiny random demo checkpoint (no download; expect gibberish).

**Windows.** A model takes at most `max_position_embeddings` tokens, so a long text is
scored in windows of `--window` tokens (default: that maximum). Window `k` reads the
tokens `[k * stride, k * stride + window)` and predicts each one's successor; it scores
only the predictions that no earlier window made. With `--stride` equal to the window
(the default) the windows do not overlap: every token but the first is predicted exactly
once, the first prediction of each window from a single token of context. A smaller
stride gives every prediction at least `window - stride` tokens of context, at
`window / stride` times the cost. Windows are batched with `jax.vmap` (`--batch-size` at
a time; the last batch is padded with windows that score nothing) under
`eqx.filter_jit`, so there is one compilation.

**Bits per byte** is the total negative log-likelihood in bits over the UTF-8 bytes of
the text after the first token, which no window predicts (with a tokenizer that adds a
beginning-of-sequence token, that is the whole text).
"""

import argparse
import json
import math
import pathlib
import sys
import tempfile
from dataclasses import dataclass

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_embed

TOKENIZER_FILE = "tokenizer.json"


@dataclass
class Windows:
    """Fixed-length windows over a token sequence, as arrays of shape
    `(num_windows, window)`: the inputs, the token each input is followed by, and
    whether that prediction is scored."""

    inputs: np.ndarray
    targets: np.ndarray
    scored: np.ndarray


def make_windows(tokens: np.ndarray, *, window: int, stride: int) -> Windows:
    """Cuts `tokens` into the windows described in the module docstring. Predictions
    past the end are padded (token 0, not scored)."""
    num_predictions = len(tokens) - 1
    starts = range(0, max(num_predictions - window, 0) + stride, stride)
    padded = np.concatenate([tokens, np.zeros(window, dtype=tokens.dtype)])
    offsets = np.arange(window)
    inputs, targets, scored = [], [], []
    for start in starts:
        prediction = start + offsets  # the index of the input token of each prediction
        # A prediction was made before if an earlier window covered it: the previous
        # window ends at start - stride + window.
        first_new = 0 if start == 0 else window - stride
        inputs.append(padded[prediction])
        targets.append(padded[prediction + 1])
        scored.append((offsets >= first_new) & (prediction < num_predictions))
    return Windows(np.stack(inputs), np.stack(targets), np.stack(scored))


def pad_to_multiple(windows: Windows, multiple: int) -> Windows:
    """Appends windows that score nothing, so that every batch has the same shape."""
    extra = -len(windows.inputs) % multiple

    def pad(array: np.ndarray) -> np.ndarray:
        return np.concatenate([array, np.zeros((extra, array.shape[1]), array.dtype)])

    return Windows(pad(windows.inputs), pad(windows.targets), pad(windows.scored))


@eqx.filter_jit
def window_losses(
    model: eqx_embed.TransformerLM,
    inputs: jax.Array,
    targets: jax.Array,
    scored: jax.Array,
) -> jax.Array:
    """The float32 negative log-likelihood of each scored prediction, 0 elsewhere."""
    return jax.vmap(lambda i, t, s: model.loss(i, t, where=s))(inputs, targets, scored)


def total_negative_log_likelihood(
    model: eqx_embed.TransformerLM, windows: Windows, batch_size: int
) -> float:
    """The summed negative log-likelihood in nats, accumulated in float64."""
    windows = pad_to_multiple(windows, batch_size)
    total = 0.0
    for start in range(0, len(windows.inputs), batch_size):
        batch = slice(start, start + batch_size)
        losses = window_losses(
            model,
            jnp.asarray(windows.inputs[batch], dtype=jnp.int32),
            jnp.asarray(windows.targets[batch], dtype=jnp.int32),
            jnp.asarray(windows.scored[batch]),
        )
        total += float(np.sum(np.asarray(losses, dtype=np.float64)))
    return total


def read_utf8(path: pathlib.Path, option: str) -> str:
    """The text of the file given as `option`, which must be UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SystemExit(
            f"{option} {path}: not UTF-8 text (byte {error.object[error.start]:#04x} "
            f"at offset {error.start}); convert it, e.g. with iconv."
        ) from None


def read_token_ids(path: pathlib.Path) -> np.ndarray:
    if path.suffix == ".npy":
        ids = np.load(path)
    else:
        try:
            ids = np.array(read_utf8(path, "--token-ids").split(), dtype=np.int64)
        except ValueError as error:
            raise SystemExit(
                f"--token-ids {path}: expected whitespace-separated integers ({error})."
            ) from None
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise SystemExit(
            f"--token-ids {path}: expected a 1-D array of integers, got shape "
            f"{ids.shape} and dtype {ids.dtype}."
        )
    return ids


def encode_text(text: str, tokenizer_file: pathlib.Path) -> tuple[np.ndarray, int]:
    """The token ids of `text` and the number of UTF-8 bytes after the first token."""
    from tokenizers import Tokenizer

    if not tokenizer_file.exists():
        raise SystemExit(
            f"{tokenizer_file} does not exist: pass --tokenizer, or --token-ids."
        )
    encoding = Tokenizer.from_file(str(tokenizer_file)).encode(text)
    if not encoding.ids:
        raise SystemExit("The text encodes to no tokens.")
    # Offsets are in characters; a special token added by the post-processor has (0, 0).
    _, first_token_end = encoding.offsets[0]
    predicted_bytes = len(text[first_token_end:].encode("utf-8"))
    return np.asarray(encoding.ids, dtype=np.int64), predicted_bytes


def check_token_ids(tokens: np.ndarray, vocab_size: int) -> None:
    if len(tokens) < 2:
        raise SystemExit(f"Need at least 2 tokens to predict one, got {len(tokens)}.")
    bad = np.flatnonzero((tokens < 0) | (tokens >= vocab_size))
    if bad.size:
        raise SystemExit(
            f"Token {tokens[bad[0]]} at index {bad[0]} is outside the model's "
            f"vocabulary [0, {vocab_size}) ({bad.size} such tokens)."
        )


def write_demo_checkpoint(directory: pathlib.Path, text: str) -> None:
    """A tiny random Llama and a byte-level BPE tokenizer trained on `text`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(keepends=True), trainer)
    tokenizer.save(str(directory / TOKENIZER_FILE))
    config = eqx_embed.TransformerConfig(
        family="llama",
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=128,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    model.to_huggingface(directory)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring for how windows and bits per byte are "
        "defined.",
    )
    parser.add_argument(
        "checkpoint",
        nargs="?",
        type=pathlib.Path,
        help="a Hugging Face checkpoint directory (config.json, *.safetensors)",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", type=pathlib.Path, help="a UTF-8 text file to score")
    source.add_argument(
        "--token-ids",
        type=pathlib.Path,
        help="token ids to score: whitespace-separated integers, or a .npy array",
    )
    parser.add_argument(
        "--tokenizer",
        type=pathlib.Path,
        help=f"a tokenizers file for --text (default: CHECKPOINT/{TOKENIZER_FILE})",
    )
    parser.add_argument(
        "--window",
        type=int,
        help="tokens per window (default and maximum: max_position_embeddings)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        help="tokens between window starts (default: --window, no overlap)",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per call")
    parser.add_argument(
        "--dtype",
        help="weight and activation dtype, such as bfloat16 (default: the "
        "checkpoint's)",
    )
    parser.add_argument(
        "--generate",
        metavar="PROMPT",
        help="continue PROMPT (encoded with the tokenizer) instead of scoring a text",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=32, help="tokens --generate adds"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="--generate's sampling temperature (default 0: greedy)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="--generate's sampling seed"
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="score this file's source with a tiny random checkpoint written to a "
        "temporary directory",
    )
    args = parser.parse_args(argv)
    if args.demo:
        if args.checkpoint or args.text or args.token_ids or args.tokenizer:
            parser.error("--demo makes its own checkpoint, tokenizer and text.")
    elif args.checkpoint is None:
        parser.error("give a checkpoint directory, or --demo.")
    elif args.generate is None and args.text is None and args.token_ids is None:
        parser.error("give --text, --token-ids or --generate.")
    if args.generate is not None and (args.text or args.token_ids):
        parser.error("--generate continues a prompt; it takes no --text/--token-ids.")
    for name in ("window", "stride", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}.")
    return args


def score(args: argparse.Namespace) -> dict[str, float]:
    """Loads the checkpoint, scores the tokens and prints the results; returns them."""
    model = eqx_embed.TransformerLM.from_huggingface(
        args.checkpoint, param_dtype=args.dtype, activation_dtype=args.dtype
    )
    config = model.config
    if args.text is not None:
        tokenizer_file = args.tokenizer or args.checkpoint / TOKENIZER_FILE
        text = read_utf8(args.text, "--text")
        tokens, predicted_bytes = encode_text(text, tokenizer_file)
    else:
        tokens, predicted_bytes = read_token_ids(args.token_ids), None
    check_token_ids(tokens, config.vocab_size)
    window = args.window or config.max_position_embeddings
    if window > config.max_position_embeddings:
        raise SystemExit(
            f"--window {window} exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings})."
        )
    stride = args.stride or window
    if stride > window:
        raise SystemExit(f"--stride {stride} exceeds --window {window}.")
    windows = make_windows(tokens, window=window, stride=stride)
    num_scored = int(windows.scored.sum())
    nll = total_negative_log_likelihood(model, windows, args.batch_size)
    results = dict(perplexity=math.exp(nll / num_scored))
    print(
        f"{config.family} model: vocabulary {config.vocab_size}, "
        f"{config.num_layers} layers, {config.param_dtype} weights"
    )
    print(
        f"scored {num_scored} of {len(tokens)} tokens in {len(windows.inputs)} "
        f"windows of {window} (stride {stride})"
    )
    print(f"perplexity: {results['perplexity']:.8g}")
    if predicted_bytes:
        results["bits_per_byte"] = nll / math.log(2) / predicted_bytes
        print(f"bits per byte: {results['bits_per_byte']:.8g}")
    return results


def eos_token_ids(checkpoint: pathlib.Path) -> list[int] | None:
    """The EOS id(s) named by the checkpoint's generation or model config, if any."""
    for name in ("generation_config.json", "config.json"):
        path = checkpoint / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return [eos] if isinstance(eos, int) else list(eos)
    return None


def continue_prompt(args: argparse.Namespace) -> dict[str, str]:
    """Loads the checkpoint, continues `args.generate` and prints it."""
    from tokenizers import Tokenizer

    model = eqx_embed.TransformerLM.from_huggingface(
        args.checkpoint, param_dtype=args.dtype, activation_dtype=args.dtype
    )
    tokenizer_file = args.tokenizer or args.checkpoint / TOKENIZER_FILE
    if not tokenizer_file.exists():
        raise SystemExit(f"{tokenizer_file} does not exist: pass --tokenizer.")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    prompt = np.array(tokenizer.encode(args.generate).ids, dtype=np.int32)
    if not len(prompt):
        raise SystemExit("--generate: the prompt encodes to no tokens.")
    check_token_ids(prompt, model.config.vocab_size)
    room = model.config.max_position_embeddings
    if len(prompt) + args.max_new_tokens > room:
        raise SystemExit(
            f"--generate: {len(prompt)} prompt tokens plus --max-new-tokens "
            f"{args.max_new_tokens} exceed max_position_embeddings ({room})."
        )
    eos = eos_token_ids(args.checkpoint)
    new = np.asarray(
        model.generate(
            prompt[None],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            key=jax.random.key(args.seed) if args.temperature > 0 else None,
            eos_token_id=eos,
        )
    )[0]
    if eos is not None:
        # As transformers: the EOS is kept, the padding after it dropped.
        ended = np.flatnonzero(np.isin(new, eos))
        new = new[: ended[0] + 1] if len(ended) else new
    text = tokenizer.decode(prompt.tolist() + new.tolist())
    print(text)
    return dict(generated=text)


def main(argv: list[str] | None = None) -> dict[str, float] | dict[str, str]:
    args = parse_arguments(argv)
    run = score if args.generate is None else continue_prompt
    if not args.demo:
        return run(args)
    with tempfile.TemporaryDirectory() as directory:
        source = pathlib.Path(__file__)
        write_demo_checkpoint(pathlib.Path(directory), source.read_text())
        args.checkpoint = pathlib.Path(directory)
        what = (
            "its perplexity is of the order of its vocabulary size"
            if args.generate is None
            else "its continuation is noise"
        )
        print(
            f"--demo: a tiny Llama with RANDOM, untrained weights: {what}, which says "
            "nothing about any real model: give a checkpoint directory for that."
        )
        if args.generate is None:
            args.text = source
        return run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
