"""Beam search (`TransformerLM.generate(num_beams=...)`) against the full forward
pass: each sequence's score is its log-probability, recomputed without a cache, over
its length to the `length_penalty`; one compile for every stopping rule; bad
arguments refused before compiling. (`tests/huggingface/test_beam_search_parity.py`
holds it to `transformers`' beam search, token for token.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _tolerances import tolerance
from test_generate import CONFIGS, LENGTHS, PROMPTS, full_logits, perturbed

from eqx_embed import TransformerLM
from eqx_embed.models import _beam_search, _generate

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def models() -> dict[str, TransformerLM]:
    return {
        name: perturbed(TransformerLM(CONFIGS[name], key=jax.random.key(0)))
        for name in ("llama", "gemma3")
    }


def count_decode_steps(monkeypatch) -> dict[str, int]:
    """Counts the traces of the decode step (greedy's and beam search's) and the
    steps run."""
    counts = {"traced": 0, "run": 0}

    def tick():
        counts["run"] += 1

    for module in (_generate, _beam_search):
        original = module.decode_step

        def counted(*args, original=original):
            counts["traced"] += 1
            jax.debug.callback(tick)
            return original(*args)

        monkeypatch.setattr(module, "decode_step", counted)
    return counts


def test_scores_are_the_sequences_log_probabilities(models):
    # Gemma 3's sliding and full layers: both cache stacks follow the beams, and the
    # windows wrap. A wrongly gathered cache row would change the log-probabilities.
    model = models["gemma3"]
    length_penalty = 1.5
    tokens, scores = model.generate(
        PROMPTS,
        prompt_lengths=LENGTHS,
        max_new_tokens=NEW_TOKENS,
        num_beams=4,
        num_return_sequences=3,
        length_penalty=length_penalty,
        return_scores=True,
    )
    tokens, scores = np.asarray(tokens), np.asarray(scores)
    assert tokens.shape == (9, NEW_TOKENS) and scores.shape == (9,)
    # Each step's log-probability: through every layer's sums (the width, the MLP,
    # the attended tokens) and the vocabulary's log-sum-exp; NEW_TOKENS of them.
    config = model.config
    longest = PROMPTS.shape[1] + NEW_TOKENS
    chain = NEW_TOKENS * (
        config.num_layers * (config.hidden_size + config.intermediate_size + longest)
        + config.vocab_size
    )
    for row, length in enumerate(LENGTHS):
        returned = tokens[3 * row : 3 * row + 3]
        assert len({tuple(sequence) for sequence in returned}) == 3
        expected = []
        for sequence in returned:
            whole = np.concatenate([PROMPTS[row, :length], sequence])
            logits = np.asarray(full_logits(model, jnp.asarray(whole)), np.float64)
            logits = logits[length - 1 : -1]
            shifted = logits - logits.max(axis=-1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
            chosen = np.take_along_axis(log_probs, sequence[:, None], axis=1).sum()
            expected.append(chosen / NEW_TOKENS**length_penalty)
        got = scores[3 * row : 3 * row + 3]
        # Best first.
        assert np.all(np.diff(got) <= 0)
        np.testing.assert_allclose(
            got, expected, **tolerance(np.float32, chain, scale=np.abs(expected).max())
        )


def test_one_compile_for_every_stopping_rule_and_an_early_stop(models, monkeypatch):
    model = models["llama"]
    settings = dict(
        prompt_lengths=LENGTHS, max_new_tokens=NEW_TOKENS, num_beams=4, pad_token_id=0
    )
    counts = count_decode_steps(monkeypatch)
    beams = model.generate(
        PROMPTS, num_return_sequences=4, eos_token_id=[0, 1], **settings
    )
    # The two tokens the beams hold most often, as EOS ids.
    values, frequencies = np.unique(np.asarray(beams), return_counts=True)
    eos = values[np.argsort(-frequencies, kind="stable")[:2]].tolist()
    runs = {}
    for length_penalty, early_stopping in [(1.0, True), (0.5, False), (2.0, "never")]:
        before = counts["run"]
        model.generate(
            PROMPTS,
            eos_token_id=eos,
            length_penalty=length_penalty,
            early_stopping=early_stopping,
            **settings,
        )
        runs[early_stopping] = counts["run"] - before
    # The EOS ids, the stopping rule and the length penalty are traced: the first
    # call's program serves all three.
    assert counts["traced"] == 1
    # True stops once every prompt has 4 finished beams; "never" with a positive
    # length penalty runs to the end.
    assert runs[True] < runs["never"] == NEW_TOKENS


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(num_beams=0), "num_beams must be a positive integer, got 0"),
        (
            dict(num_beams=4, num_return_sequences=5),
            r"num_return_sequences must be an integer in \[1, num_beams=4\]",
        ),
        (
            dict(num_return_sequences=2),
            r"num_return_sequences must be an integer in \[1, num_beams=1\]",
        ),
        (
            dict(num_beams=4, length_penalty=float("nan")),
            "length_penalty must be a finite number",
        ),
        (
            dict(num_beams=4, early_stopping="always"),
            "early_stopping must be True, False or \"never\", got 'always'",
        ),
        (
            dict(num_beams=4, temperature=0.7),
            "beam sampling is not supported.*temperature=0.7",
        ),
        (
            dict(length_penalty=2.0),
            r"length_penalty applies only to beam search \(num_beams > 1\)",
        ),
        (dict(early_stopping=True), "early_stopping applies only to beam search"),
        (dict(return_scores=True), "return_scores applies only to beam search"),
    ],
)
def test_bad_arguments_raise_before_compiling(changes, message, models, monkeypatch):
    counts = count_decode_steps(monkeypatch)
    with pytest.raises(ValueError, match=message):
        models["llama"].generate(
            PROMPTS,
            prompt_lengths=LENGTHS,
            max_new_tokens=4,
            key=jax.random.key(0),
            **changes,
        )
    assert counts["traced"] == 0
