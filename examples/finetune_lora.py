"""Fine-tunes a language model on your own text with LoRA, and writes the adapter as
a Hugging Face PEFT adapter directory.

The model is either the output directory of `train_tiny_lm.py` (its checkpoint and
its tokenizer) or a Hugging Face checkpoint directory (`config.json`,
`*.safetensors` and a byte-level BPE `tokenizer.json`, or `--tokenizer byte` for a
model whose first 256 tokens are the bytes). Its weights stay frozen: `add_lora`
puts low-rank adapters beside the chosen projections (`--targets`), `lora_filter`
hands only those to the optimiser, and `--int8` quantizes the frozen base first
(QLoRA). Held-out bits per byte are printed before and after.

    python examples/train_tiny_lm.py --out tiny            # a model to start from
    python examples/finetune_lora.py tiny --text my_notes/ --out tuned
    python examples/finetune_lora.py tiny --text my_notes/ --int8
    python examples/finetune_lora.py --demo                # no model needed

`--out` receives `base/` (the frozen model as a Hugging Face checkpoint, dequantized
for `--int8`) and `adapter/` (`adapter_config.json`, `adapter_model.safetensors`),
which `peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base),
adapter)` loads. `--demo` fine-tunes a tiny random Llama on this file's own source.
"""

import argparse
import json
import math
import pathlib
import tempfile
from collections.abc import Sequence

import _command_line as command_line
import _data as data
import equinox as eqx
import jax
import optax
import train_tiny_lm
from _checkpointing import (
    CHECKPOINTS_DIR,
    checkpoint_manager,
    latest_record,
    restore_state,
)
from _tokenizers import BPETokenizer, ByteTokenizer

import eqx_embed
from eqx_embed.huggingface import save_peft_adapter

DEFAULT_TARGETS = ["q_proj", "v_proj", "o_proj", "down_proj"]


def load_model(directory: pathlib.Path, tokenizer_kind: str):
    """The model and tokenizer of a `train_tiny_lm.py` output or a Hugging Face
    checkpoint directory."""
    if (directory / CHECKPOINTS_DIR).is_dir():
        # The newest checkpoint of a `train_tiny_lm.py` run (its orbax directory).
        with checkpoint_manager(directory) as manager:
            record = latest_record(manager, directory)
            config = eqx_embed.TransformerConfig.from_dict(record["config"])
            settings = argparse.Namespace(**record["args"])
            optimiser = train_tiny_lm.make_optimiser(settings)
            model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
            state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))
            model, _ = restore_state(manager, record["step"], model, state)
        if settings.tokenizer == "byte":
            return model, ByteTokenizer()
        return model, BPETokenizer.load(directory)
    model = eqx_embed.TransformerLM.from_huggingface(directory)
    if tokenizer_kind == "byte":
        return model, ByteTokenizer()
    return model, BPETokenizer.load(directory)


def write_demo_model(directory: pathlib.Path) -> None:
    """A tiny random Llama whose tokens are bytes, as a Hugging Face checkpoint."""
    config = eqx_embed.TransformerConfig(
        "llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    eqx_embed.TransformerLM(config, key=jax.random.key(0)).to_huggingface(directory)


def make_train_step(optimiser: optax.GradientTransformation, frozen):
    @eqx.filter_jit
    def train_step(trainable, state, tokens, targets, segment_ids):
        def loss(trainable):
            model = eqx.combine(trainable, frozen)
            return model.mean_loss(tokens, targets, segment_ids=segment_ids)

        value, grads = eqx.filter_value_and_grad(loss)(trainable)
        updates, state = optimiser.update(grads, state, trainable)
        return eqx.apply_updates(trainable, updates), state, value

    return train_step


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add(
        "model", nargs="?", help="train_tiny_lm.py's --out, or a Hugging Face directory"
    )
    add("--demo", action="store_true", help="a tiny random model and this file's text")
    add("--text", help="a file or a directory of files to fine-tune on")
    add(
        "--tokenizer",
        choices=["bpe", "byte"],
        default="bpe",
        help="for a Hugging Face directory: its tokenizer.json, or bytes as tokens",
    )
    add("--int8", action="store_true", help="quantize the frozen base (QLoRA)")
    add("--rank", type=command_line.integer(1), default=8)
    add("--alpha", type=command_line.number(0, inclusive=False), default=16.0)
    add("--targets", nargs="+", default=DEFAULT_TARGETS)
    add("--steps", type=command_line.integer(1), default=200)
    add("--batch-size", type=command_line.integer(1), default=8)
    add("--seq-len", type=command_line.integer(2), default=128)
    add("--learning-rate", type=command_line.number(0, inclusive=False), default=1e-3)
    add("--train-bytes", type=command_line.integer(1), default=2**20)
    add("--eval-bytes", type=command_line.integer(1), default=2**16)
    add("--seed", type=int, default=0)
    add("--out", default="finetune_lora_out")
    return parser  # fmt: skip


def main(argv: Sequence[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    out = pathlib.Path(args.out)
    with tempfile.TemporaryDirectory() as scratch:
        if args.demo:
            write_demo_model(pathlib.Path(scratch))
            args.model, args.tokenizer = scratch, "byte"
            args.text = args.text or __file__
        elif args.model is None or args.text is None:
            raise SystemExit("Give a model directory and --text (or --demo).")
        model, tokenizer = load_model(pathlib.Path(args.model), args.tokenizer)
    seq_len = min(args.seq_len, model.config.max_position_embeddings)

    documents = data.read_documents(args.text)
    train_documents, held_out_documents = data.split_documents(documents)
    if not held_out_documents:  # One document: its last tenth is held out.
        cut = len(documents[0]) * 9 // 10
        train_documents, held_out_documents = [documents[0][:cut]], [documents[0][cut:]]
    _, train_stream, train_segments = data.pack_documents(
        tokenizer, train_documents, args.train_bytes
    )
    _, held_out_stream, held_out_segments = data.pack_documents(
        tokenizer, held_out_documents, args.eval_bytes
    )
    if len(train_stream) <= seq_len:
        raise SystemExit(
            f"The training text has {len(train_stream)} tokens, not more than the "
            f"window of {seq_len}: give more text or a shorter --seq-len."
        )
    windows = data.held_out_windows(
        held_out_stream, held_out_segments, seq_len=seq_len, batch_size=args.batch_size
    )
    scored = len(tokenizer.token_bytes(windows[1][windows[2]]))

    def bits_per_byte(model) -> float:
        return train_tiny_lm.held_out_bits_per_byte(
            model, windows, scored, args.batch_size
        )

    base = eqx_embed.quantize(model, "int8") if args.int8 else model
    before = bits_per_byte(base)
    adapted = eqx_embed.add_lora(
        base,
        rank=args.rank,
        alpha=args.alpha,
        targets=args.targets,
        key=jax.random.key(args.seed),
    )
    trainable, frozen = eqx.partition(adapted, eqx_embed.lora_filter(adapted))
    optimiser = optax.adamw(args.learning_rate)
    state = optimiser.init(trainable)
    count = sum(x.size for x in jax.tree.leaves(trainable))
    total = sum(
        x.size for x in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    print(
        f"LoRA rank {args.rank} on {', '.join(args.targets)}"
        f"{' over an int8 base' if args.int8 else ''}: {count:,} trainable "
        f"parameters of {total:,} ({100 * count / total:.2f}%)"
    )
    print(f"held-out before: {before:.4f} bits/byte")
    train_step = make_train_step(optimiser, frozen)
    losses = []
    for step in range(args.steps):
        tokens, targets, segment_ids = data.batch_at(
            step,
            train_stream,
            train_segments,
            seed=args.seed,
            batch_size=args.batch_size,
            seq_len=seq_len,
        )
        trainable, state, loss = train_step(
            trainable, state, tokens, targets, segment_ids
        )
        losses.append(float(loss))
    if not all(math.isfinite(loss) for loss in losses):
        raise SystemExit("The training loss is not finite: try a lower learning rate.")
    tuned = eqx.combine(trainable, frozen)
    after = bits_per_byte(tuned)
    print(f"held-out after {args.steps} steps: {after:.4f} bits/byte")

    # The frozen base as Hugging Face writes it (an int8 base is written
    # dequantized), and the adapter PEFT loads onto it.
    exported = eqx_embed.dequantize(model if not args.int8 else base)
    exported.to_huggingface(out / "base")
    save_peft_adapter(tuned, out / "adapter")
    result = {"before": before, "after": after, "losses": losses}
    (out / "finetune.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out / 'base'} and {out / 'adapter'}")
    return result


if __name__ == "__main__":
    main()
