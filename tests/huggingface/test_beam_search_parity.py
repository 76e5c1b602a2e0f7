"""Beam search, `TransformerLM.generate(num_beams=4)`, against `transformers`'
`generate(num_beams=4)`: the same sequences token for token and the same scores, for
four families (Mistral's sliding window generating past it), ragged prompts, two EOS
ids, two sequences returned per prompt, and each value of `early_stopping`."""

import numpy as np
import pytest
import torch
from _tolerances import tolerance
from test_generate_parity import LENGTHS, PROMPTS, livelier
from test_huggingface import COMMON, VOCAB, build

from eqx_embed import TransformerLM

NEW_TOKENS = 16
BEAMS = 4
RETURNED = 2
# (length_penalty, early_stopping): each stopping rule, each with a length penalty
# that changes which finished hypothesis wins.
SETTINGS = [(1.0, False), (0.5, True), (2.0, "never")]
# Each score sums NEW_TOKENS log-probabilities, each behind the layers' dot products
# and the vocabulary's log-sum-exp.
CHAIN = NEW_TOKENS * (COMMON["hidden_size"] + COMMON["intermediate_size"] + VOCAB)


def hf_beam_search(model: torch.nn.Module, **settings):
    """transformers' sequences (new tokens only) and scores for the ragged prompts,
    left-padded as transformers wants them."""
    width = PROMPTS.shape[1]
    padded = np.zeros_like(PROMPTS)
    mask = np.zeros_like(PROMPTS)
    for row, length in enumerate(LENGTHS):
        padded[row, width - length :] = PROMPTS[row, :length]
        mask[row, width - length :] = 1
    with torch.no_grad():
        out = model.generate(
            torch.tensor(padded),
            attention_mask=torch.tensor(mask),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            num_beams=BEAMS,
            num_return_sequences=RETURNED,
            output_scores=True,
            return_dict_in_generate=True,
            **settings,
        )
    return out.sequences[:, width:].numpy(), out.sequences_scores.numpy()


def ended(sequence: np.ndarray, eos: list[int]) -> int:
    """The length of a hypothesis: up to and with its first EOS, else all of it."""
    hits = np.flatnonzero(np.isin(sequence, eos))
    return int(hits[0]) + 1 if hits.size else len(sequence)


@pytest.mark.parametrize("case", ["llama", "mistral", "qwen2", "gpt2"])
def test_beam_search_equals_transformers(case, tmp_path):
    hf_model = build(case)
    livelier(hf_model, case)
    hf_model.generation_config.eos_token_id = None
    hf_model.save_pretrained(tmp_path)
    ours = TransformerLM.from_huggingface(tmp_path)
    # Two EOS ids that the beams meet mid-way: tokens of the greedy continuation.
    with torch.no_grad():
        greedy = hf_model.generate(
            torch.tensor(PROMPTS[:1, : LENGTHS[0]]),
            do_sample=False,
            max_new_tokens=8,
            pad_token_id=0,
        )[0, LENGTHS[0] :].numpy()
    eos = [int(greedy[3]), int(greedy[6])]
    results = []
    for length_penalty, early_stopping in SETTINGS:
        settings = dict(
            eos_token_id=eos,
            pad_token_id=0,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
        )
        tokens, scores = ours.generate(
            PROMPTS,
            prompt_lengths=LENGTHS,
            max_new_tokens=NEW_TOKENS,
            num_beams=BEAMS,
            num_return_sequences=RETURNED,
            return_scores=True,
            **settings,
        )
        tokens = np.asarray(tokens)
        expected, expected_scores = hf_beam_search(hf_model, **settings)
        assert tokens.shape == (len(LENGTHS) * RETURNED, NEW_TOKENS)
        for row, sequence in enumerate(expected):
            size = ended(sequence, eos)
            message = f"{case}, {settings}, sequence {row}"
            np.testing.assert_array_equal(
                tokens[row, :size], sequence[:size], err_msg=message
            )
            # After its EOS, a sequence holds pad_token_id.
            assert (tokens[row, size:] == 0).all(), message
        np.testing.assert_allclose(
            np.asarray(scores),
            expected_scores,
            **tolerance(np.float32, CHAIN, scale=np.abs(expected_scores).max()),
        )
        results.append(tokens)
    # Stopping as soon as each prompt has its beams finished gives other sequences
    # than the other rules, and some end at an EOS before the last step: the
    # comparison covers the stopping rules.
    assert not np.array_equal(results[1], results[0])
    assert not np.array_equal(results[1], results[2])
    assert any(ended(row, eos) < NEW_TOKENS for row in np.concatenate(results))
