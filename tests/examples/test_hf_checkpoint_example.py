"""`examples/hf_checkpoint.py` end to end: a tiny Llama built and saved by
`transformers` (no download), a byte-level BPE trained here, the example run as a
subprocess, its perplexity and bits per byte against `transformers`' own forward."""

import importlib.util
import math
import pathlib
import re
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

EXAMPLE = pathlib.Path(__file__).parents[2] / "examples" / "hf_checkpoint.py"
MAX_POSITIONS = 32
BOS = "<s>"
# Both sides run in float32 and agree to about 3e-7 here. Tighter than the 1e-3 that
# would do for perplexity alone, so that bits per byte that counted the first token's
# bytes (0.1% more bytes) would fail.
RTOL = 1e-5
# Non-ASCII on purpose: bits per byte counts UTF-8 bytes, not characters.
TEXT = (
    EXAMPLE.read_text().split('"""')[1]
    + "\nNaïve café owners serve crème brûlée — “déjà vu” ✓ 日本語のテキスト.\n"
)


def load_example():
    spec = importlib.util.spec_from_file_location("hf_checkpoint", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = load_example()


def train_tokenizer(*, add_bos: bool) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[BOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXT.splitlines(keepends=True), trainer)
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", special_tokens=[(BOS, tokenizer.token_to_id(BOS))]
        )
    return tokenizer


@pytest.fixture(scope="module")
def hf_model() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=train_tokenizer(add_bos=False).get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POSITIONS,
        # Logits of order one: with the default 0.02, every model's perplexity is
        # within a fraction of a percent of the vocabulary size.
        initializer_range=0.3,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def checkpoint(hf_model, tmp_path_factory) -> pathlib.Path:
    directory = tmp_path_factory.mktemp("llama")
    hf_model.save_pretrained(directory)
    return directory


def run_example(*arguments: str) -> str:
    completed = subprocess.run(
        [sys.executable, str(EXAMPLE), *arguments],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


def printed(name: str, output: str) -> float:
    match = re.search(rf"^{name}: (\S+)$", output, flags=re.MULTILINE)
    assert match, f"no {name!r} line in:\n{output}"
    return float(match.group(1))


def printed_scored(output: str) -> tuple[int, int]:
    match = re.search(r"^scored (\d+) of (\d+) tokens", output, flags=re.MULTILINE)
    assert match, output
    return int(match.group(1)), int(match.group(2))


def reference_nll(
    model: transformers.LlamaForCausalLM, ids: np.ndarray, *, window: int, stride: int
) -> tuple[float, int]:
    """The summed negative log-likelihood (float64 log-softmax of transformers'
    logits) and the number of predictions, window by window as in Hugging Face's
    "perplexity of fixed-length models", each prediction counted once."""
    last = len(ids) - 1  # predictions are made from inputs 0 .. last - 1
    nll, count, done = 0.0, 0, 0
    for start in range(0, last, stride):
        end = min(start + window, last)
        with torch.no_grad():
            logits = model(torch.tensor(ids[None, start:end])).logits[0]
        log_probs = torch.log_softmax(logits.double(), dim=-1).numpy()
        targets = ids[start + 1 : end + 1]
        picked = log_probs[np.arange(end - start), targets]
        new = picked[done - start :]
        nll -= new.sum()
        count += len(new)
        done = end
        if end == last:
            break
    return nll, count


def test_text_perplexity_and_bits_per_byte_match_transformers(
    hf_model, checkpoint, tmp_path
):
    tokenizer = train_tokenizer(add_bos=True)
    tokenizer.save(str(checkpoint / "tokenizer.json"))
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    output = run_example(str(checkpoint), "--text", str(text_file), "--batch-size", "4")

    ids = np.asarray(
        transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(checkpoint / "tokenizer.json")
        )(TEXT)["input_ids"]
    )
    assert ids[0] == tokenizer.token_to_id(BOS)
    assert len(ids) > 4 * MAX_POSITIONS  # several windows, and a padded last batch
    nll, count = reference_nll(
        hf_model, ids, window=MAX_POSITIONS, stride=MAX_POSITIONS
    )
    assert printed_scored(output) == (count, len(ids)) == (len(ids) - 1, len(ids))
    np.testing.assert_allclose(
        printed("perplexity", output), math.exp(nll / count), rtol=RTOL
    )
    # After the beginning-of-sequence token every byte of the text is predicted.
    bits_per_byte = nll / math.log(2) / len(TEXT.encode("utf-8"))
    np.testing.assert_allclose(
        printed("bits per byte", output), bits_per_byte, rtol=RTOL
    )


def test_bits_per_byte_leave_out_the_first_token(hf_model, checkpoint, tmp_path):
    tokenizer = train_tokenizer(add_bos=False)
    tokenizer_file = tmp_path / "no_bos.json"
    tokenizer.save(str(tokenizer_file))
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT, encoding="utf-8")
    output = run_example(
        str(checkpoint), "--text", str(text_file), "--tokenizer", str(tokenizer_file)
    )

    ids = np.asarray(tokenizer.encode(TEXT).ids)
    nll, count = reference_nll(
        hf_model, ids, window=MAX_POSITIONS, stride=MAX_POSITIONS
    )
    assert printed_scored(output) == (count, len(ids))
    first_token_bytes = len(tokenizer.decode(ids[:1].tolist()).encode("utf-8"))
    predicted_bytes = len(TEXT.encode("utf-8")) - first_token_bytes
    np.testing.assert_allclose(
        printed("bits per byte", output),
        nll / math.log(2) / predicted_bytes,
        rtol=RTOL,
    )


def test_strided_windows_match_transformers(hf_model, checkpoint, tmp_path):
    ids = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, size=150)
    ids_file = tmp_path / "ids.npy"
    np.save(ids_file, ids)
    output = run_example(
        str(checkpoint),
        "--token-ids",
        str(ids_file),
        "--window",
        "24",
        "--stride",
        "10",
        "--batch-size",
        "3",
    )
    nll, count = reference_nll(hf_model, ids, window=24, stride=10)
    assert printed_scored(output) == (count, len(ids)) == (len(ids) - 1, len(ids))
    np.testing.assert_allclose(
        printed("perplexity", output), math.exp(nll / count), rtol=RTOL
    )
    assert "bits per byte" not in output  # token ids carry no bytes


@hypothesis.given(
    num_tokens=st.integers(2, 80),
    window=st.integers(1, 20),
    stride_fraction=st.floats(0.01, 1.0),
)
def test_windows_predict_each_token_once_with_enough_context(
    num_tokens, window, stride_fraction
):
    stride = max(1, round(stride_fraction * window))
    tokens = np.arange(100, 100 + num_tokens)
    windows = example.make_windows(tokens, window=window, stride=stride)
    assert (
        windows.inputs.shape == windows.targets.shape == (len(windows.inputs), window)
    )
    scored_inputs = windows.inputs[windows.scored]
    scored_targets = windows.targets[windows.scored]
    np.testing.assert_array_equal(np.sort(scored_targets), tokens[1:])
    np.testing.assert_array_equal(scored_targets, scored_inputs + 1)
    # Every window starts where a stride puts it, and each scored prediction after
    # the first window sees at least window - stride earlier tokens.
    np.testing.assert_array_equal(
        windows.inputs[:, 0], 100 + stride * np.arange(len(windows.inputs))
    )
    positions = np.broadcast_to(np.arange(window), windows.scored.shape)
    context = positions[windows.scored][(scored_inputs - 100) >= window]
    assert np.all(context >= window - stride)
    # No window past the one that makes the last prediction.
    assert windows.scored[-1].any()


def test_help_documents_the_demo(capsys):
    # tests/test_examples.py runs the demo itself, as its smoke test.
    with pytest.raises(SystemExit) as raised:
        example.parse_arguments(["--help"])
    assert raised.value.code == 0
    assert "--demo" in capsys.readouterr().out
    assert "python examples/hf_checkpoint.py --demo" in example.__doc__


@pytest.mark.parametrize(
    "arguments, message",
    [
        ([], "give a checkpoint directory, or --demo"),
        (["CHECKPOINT"], "give --text, --token-ids or --generate"),
        (["--demo", "CHECKPOINT"], "--demo makes its own checkpoint"),
        (["CHECKPOINT", "--token-ids", "IDS", "--window", "0"], "--window must be"),
    ],
)
def test_bad_arguments_are_named(arguments, message, capsys):
    with pytest.raises(SystemExit) as raised:
        example.parse_arguments(arguments)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "ids, arguments, message",
    [
        (
            "1 2 100000 4",
            [],
            "Token 100000 at index 2 is outside the model's vocabulary",
        ),
        ("1 -2 3", [], "Token -2 at index 1 is outside"),
        ("7", [], "Need at least 2 tokens"),
        ("1 2.5 3", [], "expected whitespace-separated integers"),
        ("1 2 3", ["--window", "33"], "exceeds the model's max_position_embeddings"),
        ("1 2 3", ["--window", "8", "--stride", "9"], "--stride 9 exceeds --window 8"),
    ],
)
def test_bad_inputs_are_named(ids, arguments, message, checkpoint, tmp_path):
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(ids)
    args = example.parse_arguments(
        [str(checkpoint), "--token-ids", str(ids_file), *arguments]
    )
    with pytest.raises(SystemExit, match=re.escape(message)):
        example.score(args)


def test_text_without_a_tokenizer_is_named(checkpoint, tmp_path):
    text_file = tmp_path / "text.txt"
    text_file.write_text(TEXT)
    missing = tmp_path / "missing.json"
    args = example.parse_arguments(
        [str(checkpoint), "--text", str(text_file), "--tokenizer", str(missing)]
    )
    with pytest.raises(SystemExit, match=f"{re.escape(str(missing))} does not exist"):
        example.score(args)


def test_generate_continues_a_prompt_as_transformers_does(
    hf_model, checkpoint, tmp_path
):
    tokenizer = train_tokenizer(add_bos=False)
    tokenizer_file = tmp_path / "no_bos.json"
    tokenizer.save(str(tokenizer_file))
    prompt = "Scores a text"
    arguments = [str(checkpoint), "--generate", prompt, "--tokenizer"]
    result = example.main([*arguments, str(tokenizer_file), "--max-new-tokens", "20"])

    ids = tokenizer.encode(prompt).ids
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=20,
            pad_token_id=0,
        )[0]
    assert len(expected) > len(ids) + 1
    assert result["generated"] == tokenizer.decode(expected.tolist())


@pytest.mark.parametrize("option", ["--text", "--token-ids"])
def test_a_file_that_is_not_utf8_is_named(option, checkpoint, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("1 2 3 caf\u00e9".encode("latin-1"))
    args = example.parse_arguments([str(checkpoint), option, str(latin1)])
    with pytest.raises(SystemExit, match=f"{option} .*not UTF-8 text.*0xe9"):
        example.score(args)


def test_demo_generates_without_a_checkpoint(capsys):
    result = example.main(
        ["--demo", "--generate", "def main(", "--max-new-tokens", "6"]
    )
    assert result["generated"].startswith("def main(")
    # The banner describes what is printed: a continuation, no perplexity.
    banner = capsys.readouterr().out.splitlines()[0]
    assert "RANDOM, untrained weights" in banner
    assert "continuation" in banner and "perplexity" not in banner
