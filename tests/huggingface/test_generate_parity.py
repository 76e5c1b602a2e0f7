"""Greedy `TransformerLM.generate` against `transformers`' `generate(do_sample=False)`,
token for token, for every family loaded from a tiny random checkpoint."""

import json

import numpy as np
import pytest
import torch
import transformers
from test_huggingface import CASES, VOCAB, build

from eqx_embed import GenerationConfig, TransformerLM

NEW_TOKENS = 40
LENGTHS = np.array([7, 3, 5])
PROMPTS = np.random.default_rng(1).integers(0, VOCAB, size=(3, LENGTHS.max()))


def livelier(model: torch.nn.Module, case: str) -> None:
    """Layers that outweigh the residual stream. With `build`'s weights alone, a tied
    embedding's greedy continuation repeats a token forever (the last token's own
    embedding wins), which would test little."""
    embeddings = ("embed", "lm_head", "wte", "wpe")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 2 and not any(part in name for part in embeddings):
                parameter.mul_(3.0)
            if case in ("gemma2", "gemma3") and "post_" in name and "norm" in name:
                # Gemma 2's and 3's norms on the layers' outputs set their scale.
                parameter.add_(5.0)
            if "wpe" in name:
                # GPT-2's learned positions, which vary at every step, lead.
                parameter.mul_(30.0)


def hf_greedy(model: torch.nn.Module, prompt: np.ndarray, **settings) -> np.ndarray:
    """transformers' greedy continuation of one prompt (no padding needed)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor(prompt[None]),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            **settings,
        )
    return out[0, len(prompt) :].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_generation_equals_transformers(case, tmp_path):
    hf_model = build(case)
    livelier(hf_model, case)
    # Random models may emit the config's EOS id: never stop early here.
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    hf_model.save_pretrained(tmp_path)
    ours = TransformerLM.from_huggingface(tmp_path)
    got = np.asarray(
        ours.generate(PROMPTS, prompt_lengths=LENGTHS, max_new_tokens=NEW_TOKENS)
    )
    for row, length in enumerate(LENGTHS):
        expected = hf_greedy(hf_model, PROMPTS[row, :length])
        assert len(set(expected.tolist())) > 3, "a degenerate continuation"
        np.testing.assert_array_equal(got[row], expected, err_msg=f"row {row}")
    # With an EOS that row 0 emits mid-way: transformers pads after it as we do.
    eos = int(got[0, NEW_TOKENS // 2])
    stopped = np.asarray(
        ours.generate(
            PROMPTS,
            prompt_lengths=LENGTHS,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=eos,
            pad_token_id=0,
        )
    )
    expected = hf_greedy(
        hf_model, PROMPTS[0, : LENGTHS[0]], eos_token_id=eos, pad_token_id=0
    )
    np.testing.assert_array_equal(stopped[0, : len(expected)], expected)
    assert (stopped[0, len(expected) :] == 0).all()


class EndsWithOneOf(transformers.StoppingCriteria):
    """Stops a row whose tokens (prompt included) end with one of `sequences`: stop
    sequences of token ids, as transformers' own criteria see the whole row."""

    def __init__(self, sequences: list[list[int]]):
        self.sequences = [torch.tensor(sequence) for sequence in sequences]

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        ended = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for sequence in self.sequences:
            if input_ids.shape[1] >= len(sequence):
                tail = input_ids[:, -len(sequence) :]
                ended |= (tail == sequence).all(dim=1)
        return ended


def loaded_pair(case: str, path) -> tuple[torch.nn.Module, TransformerLM]:
    hf_model = build(case)
    livelier(hf_model, case)
    hf_model.generation_config.eos_token_id = None
    hf_model.generation_config.pad_token_id = 0
    hf_model.save_pretrained(path)
    return hf_model, TransformerLM.from_huggingface(path)


def assert_rows_equal(got: np.ndarray, hf_model, **settings) -> None:
    """Each row of `got` equals transformers' continuation of its prompt alone, then
    padding (0) where transformers stopped."""
    for row, length in enumerate(LENGTHS):
        expected = hf_greedy(hf_model, PROMPTS[row, :length], **settings)
        np.testing.assert_array_equal(
            got[row, : len(expected)], expected, err_msg=f"row {row}"
        )
        assert (got[row, len(expected) :] == 0).all(), f"row {row}"


# Sliding windows (Mistral's and Gemma 2's, 5 and 4) are passed 8 times over.
@pytest.mark.parametrize("case", ["llama", "mistral", "gemma2", "gpt2"])
def test_greedy_controls_equal_transformers(case, tmp_path):
    hf_model, ours = loaded_pair(case, tmp_path)
    shared = dict(prompt_lengths=LENGTHS, max_new_tokens=NEW_TOKENS)
    # repetition_penalty, over prompt and output.
    got = np.asarray(ours.generate(PROMPTS, repetition_penalty=1.5, **shared))
    assert_rows_equal(got, hf_model, repetition_penalty=1.5)
    plain = [
        hf_greedy(hf_model, PROMPTS[row, :length]) for row, length in enumerate(LENGTHS)
    ]
    assert any(not np.array_equal(got[row], plain[row]) for row in range(3))
    # min_new_tokens with an EOS that row 0 emits before it; stop sequences of
    # lengths 2 and 3 from rows 1 and 2, and one that never occurs.
    min_new = 8
    eos = int(plain[0][2])
    stops = [plain[1][10:12].tolist(), plain[2][15:18].tolist(), [5, 5, 5, 5]]
    got = np.asarray(
        ours.generate(
            PROMPTS,
            min_new_tokens=min_new,
            eos_token_id=eos,
            pad_token_id=0,
            stop_sequences=stops,
            **shared,
        )
    )
    assert_rows_equal(
        got,
        hf_model,
        min_new_tokens=min_new,
        eos_token_id=eos,
        pad_token_id=0,
        stopping_criteria=transformers.StoppingCriteriaList([EndsWithOneOf(stops)]),
    )
    assert eos not in got[0, :min_new]  # the EOS was suppressed
    # Some row ended early on a stop sequence, padded after it.
    ends = [
        first_stop(PROMPTS[row, :length], got[row], stops)
        for row, length in enumerate(LENGTHS)
    ]
    assert any(
        end is not None and end < NEW_TOKENS - 1 and (got[row, end + 1 :] == 0).all()
        for row, end in enumerate(ends)
    )


def first_stop(prompt, generated, stops) -> int | None:
    """The index of the first generated token that completes a stop sequence."""
    for end in range(len(generated)):
        sequence = [*prompt, *generated[: end + 1]]
        if any(sequence[-len(stop) :] == stop for stop in stops):
            return end
    return None


def test_generation_config_json_sets_the_defaults(tmp_path):
    hf_model = build("llama")
    livelier(hf_model, "llama")
    plain = hf_greedy(hf_model, PROMPTS[0, : LENGTHS[0]], eos_token_id=None)
    settings = dict(
        do_sample=False,
        repetition_penalty=1.4,
        max_new_tokens=12,
        eos_token_id=[int(plain[6]), int(plain[9])],
        pad_token_id=0,
    )
    for name, value in settings.items():
        setattr(hf_model.generation_config, name, value)
    hf_model.save_pretrained(tmp_path / "greedy")
    ours = TransformerLM.from_huggingface(tmp_path / "greedy")
    assert ours.generation_config == GenerationConfig(
        max_new_tokens=12,
        repetition_penalty=1.4,
        eos_token_id=(int(plain[6]), int(plain[9])),
        pad_token_id=0,
    )

    def transformers_rows(**overrides) -> list[np.ndarray]:
        rows = []
        for row, length in enumerate(LENGTHS):
            with torch.no_grad():
                out = hf_model.generate(
                    torch.tensor(PROMPTS[None, row, :length]),
                    attention_mask=torch.ones((1, length), dtype=torch.long),
                    **overrides,
                )
            rows.append(out[0, length:].numpy())
        return rows

    # No argument: the file's defaults, as transformers applies them.
    got = np.asarray(ours.generate(PROMPTS, prompt_lengths=LENGTHS))
    assert got.shape == (3, 12)
    for row, expected in enumerate(transformers_rows()):
        np.testing.assert_array_equal(got[row, : len(expected)], expected)
        assert (got[row, len(expected) :] == 0).all()
    # An explicit argument overrides its default.
    got = np.asarray(
        ours.generate(PROMPTS, prompt_lengths=LENGTHS, repetition_penalty=1.0)
    )
    for row, expected in enumerate(transformers_rows(repetition_penalty=1.0)):
        np.testing.assert_array_equal(got[row, : len(expected)], expected)
    # Written back, transformers reads the same settings.
    ours.to_huggingface(tmp_path / "written")
    written = transformers.GenerationConfig.from_pretrained(tmp_path / "written")
    assert not written.do_sample  # unset: greedy
    for name, value in settings.items():
        if name != "do_sample":
            assert getattr(written, name) == value, name
    assert TransformerLM.from_huggingface(tmp_path / "written").generation_config == (
        ours.generation_config
    )


def test_generation_config_json_for_sampling_and_bad_files(tmp_path):
    hf_model = build("gpt2")
    hf_model.generation_config = transformers.GenerationConfig(
        do_sample=True, temperature=0.7, top_p=0.9, eos_token_id=3
    )
    hf_model.save_pretrained(tmp_path)
    ours = TransformerLM.from_huggingface(tmp_path)
    # transformers' top_k of 50 applies when the file names none.
    assert ours.generation_config == GenerationConfig(
        temperature=0.7, top_k=50, top_p=0.9, eos_token_id=3
    )
    with pytest.raises(ValueError, match=r"Sampling \(temperature=0.7\) needs a `key`"):
        ours.generate(PROMPTS, max_new_tokens=2)
    ours.to_huggingface(tmp_path / "written")
    written = transformers.GenerationConfig.from_pretrained(tmp_path / "written")
    assert (written.do_sample, written.temperature) == (True, 0.7)
    assert (written.top_k, written.top_p, written.eos_token_id) == (50, 0.9, 3)
    # Values that generate refuses are left unset, with a warning (transformers
    # warns of them and runs on); so are keys it does not read.
    file = tmp_path / "generation_config.json"
    for values, message in [
        ({"eos_token_id": [3, VOCAB]}, r"eos_token_id=\(3, 128\) is not used"),
        ({"repetition_penalty": 0}, "repetition_penalty must be None or a positive"),
        ({"do_sample": True, "temperature": 1e-39}, "temperature must be a number"),
        ({"num_beams": 4}, r"does not take \['num_beams'\]"),
    ]:
        file.write_text(json.dumps({"max_new_tokens": 5, **values}))
        with pytest.warns(UserWarning, match=message):
            loaded = TransformerLM.from_huggingface(tmp_path)
        assert loaded.generation_config == GenerationConfig(max_new_tokens=5)
    file.write_text(json.dumps({"do_sample": "yes"}))
    with pytest.raises(ValueError, match="do_sample must be true or false"):
        TransformerLM.from_huggingface(tmp_path)
