"""Beam search, `TransformerLM.generate(num_beams=...)`: `transformers`' `_beam_search`
(5.x) step for step, in one compiled `lax.while_loop`.

Each prompt keeps `num_beams` running hypotheses and the `num_beams` best finished
ones. A step adds each running beam's score to the log-probabilities of its next
token, keeps the best `max(2, 1 + len(eos)) * num_beams` candidates (enough that
`num_beams` of them do not end), moves those of the best `num_beams` that ended (an
EOS, or the last step) into the finished set, scored by their sum over
`length ** length_penalty`, continues the best `num_beams` that did not, and gathers
the KV cache's rows after them. The loop ends at `max_new_tokens`, or once no prompt
can still improve its finished set (`early_stopping`). As in `transformers`, a
hypothesis that must not be chosen scores `-1e9`, a finite number, so that the
comparisons behind the stopping rule stay the same.
"""

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from ._cache import KVCache, decode_step, prefill

HOPELESS = -1.0e9  # transformers' score for a candidate that must not be chosen


def take_rows(cache: KVCache, rows: Int[Array, " rows"]) -> KVCache:
    """The cache of the sequences `rows` (a gather along its batch axis), in order."""
    return eqx.tree_at(
        lambda c: (c.keys, c.values, c.sliding_keys, c.sliding_values, c.lengths),
        cache,
        (
            cache.keys[:, rows],
            cache.values[:, rows],
            cache.sliding_keys[:, rows],
            cache.sliding_values[:, rows],
            cache.lengths[rows],
        ),
    )


def _per_prompt(array: Array, index: Int[Array, "batch picks"]) -> Array:
    """`array[b, index[b]]` for every prompt `b`: picks among its beams."""
    return jax.vmap(lambda beams, picks: beams[picks])(array, index)


class _Beams(NamedTuple):
    step: Int[Array, ""]
    logits: Float[Array, "batch*beams vocab"]
    cache: KVCache
    running: Int[Array, "batch beams new"]
    running_scores: Float[Array, "batch beams"]
    finished: Int[Array, "batch beams new"]
    finished_scores: Float[Array, "batch beams"]
    is_finished: Bool[Array, "batch beams"]
    improvable: Bool[Array, " batch"]


@eqx.filter_jit
def _beam_search(
    model,
    prompts: Int[Array, "batch seq"],
    lengths: Int[Array, " batch"],
    eos: Int[Array, " eos"],
    divisors: Float[Array, " new"],
    best_divisors: Float[Array, " new"],
    stop_when_full: Bool[Array, ""],
    *,
    num_beams: int,
    max_new_tokens: int,
    capacity: int,
    pad: int,
) -> tuple[Int[Array, "batch beams new"], Float[Array, "batch beams"]]:
    batch = prompts.shape[0]
    logits, cache = prefill(model, prompts, lengths, capacity)
    # Every beam starts from its prompt's cache; only the first beam scores 0, so
    # that the first step does not pick the same token once per beam.
    beam_rows = jnp.repeat(jnp.arange(batch), num_beams)
    vocab = logits.shape[-1]
    candidates = max(2, 1 + eos.shape[0]) * num_beams
    among_first = jnp.arange(candidates) < num_beams

    def unfinished(beams: _Beams):
        full = stop_when_full & jnp.all(beams.is_finished)
        return (beams.step < max_new_tokens) & jnp.any(beams.improvable) & ~full

    def advance(beams: _Beams) -> _Beams:
        step = beams.step
        log_probs = jax.nn.log_softmax(beams.logits.astype(jnp.float32), axis=-1)
        # Logits processors plug in here, on the log-probabilities of each beam (one
        # row per beam, `batch * num_beams` rows), as transformers applies them.
        scores = log_probs.reshape(batch, num_beams, vocab)
        scores = scores + beams.running_scores[:, :, None]
        top_scores, top = jax.lax.top_k(scores.reshape(batch, -1), candidates)
        parents = top // vocab
        tokens = (top % vocab).astype(jnp.int32)
        sequences = _per_prompt(beams.running, parents).at[:, :, step].set(tokens)
        ended = jnp.isin(tokens, eos) | (step == max_new_tokens - 1)

        # The best candidates that go on.
        going_on = top_scores + ended.astype(jnp.float32) * HOPELESS
        kept = jax.lax.top_k(going_on, num_beams)[1]
        running = _per_prompt(sequences, kept)
        running_scores = _per_prompt(going_on, kept)
        rows = jnp.arange(batch)[:, None] * num_beams + _per_prompt(parents, kept)

        # The first `num_beams` candidates that ended, merged into the finished set.
        just_finished = ended & among_first
        refused = (
            (stop_when_full & jnp.all(beams.is_finished, axis=1, keepdims=True))
            | ~beams.improvable[:, None]
            | ~just_finished
        )
        final_scores = top_scores / divisors[step]
        final_scores = final_scores + refused.astype(jnp.float32) * HOPELESS
        merged_scores = jnp.concatenate([beams.finished_scores, final_scores], axis=1)
        best = jax.lax.top_k(merged_scores, num_beams)[1]
        finished = _per_prompt(
            jnp.concatenate([beams.finished, sequences], axis=1), best
        )
        is_finished = _per_prompt(
            jnp.concatenate([beams.is_finished, just_finished], axis=1), best
        )
        finished_scores = _per_prompt(merged_scores, best)

        # Can the best running beam, at its best length, still beat a finished one?
        best_possible = running_scores[:, :1] / best_divisors[step]
        worst_finished = jnp.where(
            is_finished, finished_scores.min(axis=1, keepdims=True), HOPELESS
        )
        improvable = beams.improvable & jnp.any(best_possible > worst_finished, axis=1)

        cache = take_rows(beams.cache, rows.reshape(-1))
        logits, cache = decode_step(model, cache, running[:, :, step].reshape(-1))
        return _Beams(
            step + 1,
            logits,
            cache,
            running,
            running_scores,
            finished,
            finished_scores,
            is_finished,
            improvable,
        )

    empty = jnp.full((batch, num_beams, max_new_tokens), pad, jnp.int32)
    first_beam = jnp.arange(num_beams) == 0
    beams = _Beams(
        step=jnp.int32(0),
        logits=logits[beam_rows],
        cache=take_rows(cache, beam_rows),
        running=empty,
        running_scores=jnp.broadcast_to(
            jnp.where(first_beam, 0.0, HOPELESS), (batch, num_beams)
        ),
        finished=empty,
        finished_scores=jnp.full((batch, num_beams), HOPELESS),
        is_finished=jnp.zeros((batch, num_beams), bool),
        improvable=jnp.ones((batch,), bool),
    )
    beams = jax.lax.while_loop(unfinished, advance, beams)
    return beams.finished, beams.finished_scores


def beam_search(
    model,
    prompts: Int[Array, "batch seq"],
    lengths: Int[Array, " batch"],
    *,
    eos: tuple[int, ...],
    pad: int,
    max_new_tokens: int,
    capacity: int,
    num_beams: int,
    num_return_sequences: int,
    length_penalty: float,
    early_stopping: bool | str,
    return_scores: bool,
):
    """The `num_return_sequences` best finished beams of each prompt, best first,
    flattened to `(batch * num_return_sequences, max_new_tokens)`, and with
    `return_scores` their scores; every argument already checked."""
    # The divisors `length ** length_penalty` of the finished beams' sums at each
    # step, in float64 then float32 as transformers computes them; and the ones the
    # stopping rule assumes for the best running beam: its current length, except
    # with early_stopping="never" and a positive length_penalty, the longest.
    new_lengths = np.arange(1, max_new_tokens + 1, dtype=np.float64)
    divisors = new_lengths**length_penalty
    if early_stopping == "never" and length_penalty > 0:
        best_divisors = np.full_like(divisors, divisors[-1])
    else:
        best_divisors = divisors
    finished, scores = _beam_search(
        model,
        prompts,
        lengths,
        jnp.asarray(eos, jnp.int32),
        jnp.asarray(divisors, jnp.float32),
        jnp.asarray(best_divisors, jnp.float32),
        jnp.asarray(early_stopping is True),
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        capacity=capacity,
        pad=pad,
    )
    tokens = finished[:, :num_return_sequences].reshape(-1, max_new_tokens)
    if return_scores:
        return tokens, scores[:, :num_return_sequences].reshape(-1)
    return tokens
