"""The training example's command line: every option, its default and its help, and
the argparse types that refuse values that cannot work before anything runs."""

import argparse
import math
from collections.abc import Sequence


def integer(minimum: int):
    """An argparse type: an integer of at least `minimum`."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(
                f"expected an integer >= {minimum}, got {text!r}"
            )
        return value

    return parse


def number(minimum: float, *, inclusive: bool):
    """An argparse type: a finite float above `minimum` (or equal to it, if
    `inclusive`)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not (
            math.isfinite(value) and (value > minimum or inclusive and value == minimum)
        ):
            bound = ">=" if inclusive else ">"
            raise argparse.ArgumentTypeError(
                f"expected a finite number {bound} {minimum}, got {text!r}"
            )
        return value

    return parse


def non_empty(text: str) -> str:
    """An argparse type: a non-empty string."""
    if not text:
        raise argparse.ArgumentTypeError(f"expected a non-empty string, got {text!r}")
    return text


def add_process_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "more than one process",
        "run the same command once per process, each with its --process-id: every "
        "process computes each global batch, feeds its share of the rows and saves "
        "its shards of the checkpoints to --out (which they all must see); process "
        "0 writes the other outputs",
    )
    group.add_argument(
        "--num-processes",
        type=integer(1),
        default=1,
        help="how many processes run together (jax.distributed)",
    )
    group.add_argument(
        "--process-id",
        type=integer(0),
        default=0,
        help="this process's index, from 0; process 0 coordinates",
    )
    group.add_argument(
        "--coordinator",
        default="127.0.0.1:12355",
        help="host:port of process 0, which the others connect to",
    )


def build_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "--text",
        help="a file or directory to learn from; "
        "None: the Python standard library's top-level modules",
    )
    add(
        "--tokenizer",
        choices=("byte", "bpe"),
        default="bpe",
        help="a byte-level BPE trained on the training text first, or bytes",
    )
    add("--vocab-size", type=integer(256), default=2048, help="BPE vocabulary size")
    add(
        "--train-bytes",
        type=integer(1),
        default=4_000_000,
        help="at most this much text trains, from the first documents on",
    )
    add("--eval-bytes", type=integer(1), default=65_536, help="held-out bytes scored")
    add("--seed", type=integer(0), default=0, help="seeds model, batches, samples")
    add("--steps", type=integer(1), default=1500, help="training steps in all")
    add("--batch-size", type=integer(1), default=32, help="windows per step")
    add("--seq-len", type=integer(2), default=64, help="tokens per window")
    add("--hidden-size", type=integer(1), default=96, help="model width")
    add("--intermediate-size", type=integer(1), default=288, help="MLP width")
    add("--num-layers", type=integer(1), default=2, help="transformer blocks")
    add("--num-heads", type=integer(1), default=4, help="query heads")
    add("--num-kv-heads", type=integer(1), default=2, help="key/value heads")
    positive = number(0, inclusive=False)
    add("--learning-rate", type=positive, default=1e-2, help="peak learning rate")
    add(
        "--warmup-steps",
        type=integer(0),
        default=50,
        help="linear warmup steps, at most half of --steps",
    )
    non_negative = number(0, inclusive=True)
    add("--weight-decay", type=non_negative, default=0.1, help="AdamW weight decay")
    add(
        "--eval-every",
        type=integer(1),
        default=750,
        help="steps between held-out evaluations (and one at the end)",
    )
    add("--out", default="runs/tiny_lm", help="output directory")
    add("--resume", action="store_true", help="continue the run saved in --out")
    add(
        "--save-every",
        type=integer(1),
        default=500,
        help="steps between checkpoints (and one at the end)",
    )
    add(
        "--stop-after",
        type=integer(1),
        help="stop (and checkpoint) after this many steps in all, keeping the "
        "schedule of --steps; None: run them all",
    )
    add(
        "--prompt",
        type=non_empty,
        help="the text the samples continue; None: a Python function header, or "
        "with --text the start of the held-out text",
    )
    add("--num-samples", type=integer(1), default=3, help="samples printed")
    add("--sample-length", type=integer(1), default=200, help="new tokens per sample")
    add(
        "--temperature",
        type=non_negative,
        default=0.7,
        help="sampling temperature; 0 takes the likeliest token",
    )
    add_process_options(parser)
    return parser


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """The command line's settings; `given` is the set of those given explicitly,
    even at their default value (which `--resume` must not take for absent)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    # argparse fills in a default only where the namespace has no value yet.
    unset = object()
    probe = argparse.Namespace(**dict.fromkeys(vars(args), unset))
    probe = parser.parse_args(argv, probe)
    args.given = {name for name, value in vars(probe).items() if value is not unset}
    return args
