"""The per-step controls of generation, as one pipeline in the order of transformers'
`_get_logits_processor` (5.25): repetition penalty, then OpenAI's presence and
frequency penalties (which transformers lacks), the EOS suppression of
`min_new_tokens`, the user's `logits_processor`, and, when sampling, temperature,
top-k, top-p and min-p. Also the record of the tokens so far that the penalties and
the stop sequences read.

Values that may change between calls without changing the program (penalties,
temperature, `top_p`, `min_p`, `min_new_tokens`) are traced scalars; what sets a shape
or a branch (`top_k`, the EOS ids, the stop sequences, the hook, and whether each
control is on at all) is static.
"""

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

LogitsProcessor = Callable[
    [Float[Array, "batch vocab"], Int[Array, "batch max_new_tokens"], Int[Array, ""]],
    Float[Array, "batch vocab"],
]


class LogitsSettings(eqx.Module):
    """The checked controls of `process_logits`; a `None` control is off.

    - `repetition_penalty`: transformers' `repetition_penalty` (CTRL's): the logit
        of every token seen in the prompt or the output is divided by it when
        positive, multiplied when negative.
    - `presence_penalty`, `frequency_penalty`: OpenAI's: each logit less
        `frequency_penalty` times the token's count in the output so far, less
        `presence_penalty` if that count is positive.
    - `min_new_tokens`: transformers' `min_new_tokens`: the EOS ids' logits are
        `-inf` until that many tokens have been generated.
    - `eos`: the EOS ids that `min_new_tokens` suppresses.
    - `logits_processor`: `(logits, tokens, step) -> logits`, transformers'
        `logits_processor` as one pure function, after the built-in processors and
        before the sampling filters, as there.
    - `temperature`: `None` for greedy decoding (no filter below then applies);
        otherwise the logits are divided by it.
    - `top_k`, `top_p`, `min_p`: transformers' filters, in that order.
    """

    repetition_penalty: Float[Array, ""] | None = None
    presence_penalty: Float[Array, ""] | None = None
    frequency_penalty: Float[Array, ""] | None = None
    min_new_tokens: Int[Array, ""] | None = None
    eos: tuple[int, ...] = eqx.field(static=True, default=())
    logits_processor: LogitsProcessor | None = eqx.field(static=True, default=None)
    temperature: Float[Array, ""] | None = None
    top_k: int | None = eqx.field(static=True, default=None)
    top_p: Float[Array, ""] | None = None
    min_p: Float[Array, ""] | None = None


class TokensSoFar(eqx.Module):
    """What the controls read of each row's tokens so far (a leading batch axis on
    every array, so that beams reorder it with one gather). Arrays that no control
    needs are `None`.

    - `tokens`: the generated tokens, `pad` past the current step.
    - `in_prompt`: which ids each prompt holds (for `repetition_penalty`).
    - `counts`: how often each id was generated (for the penalties).
    - `recent`: the last tokens of prompt and output, as long as the longest stop
        sequence, `-1` before the prompt's start.
    """

    tokens: Int[Array, "batch max_new_tokens"]
    in_prompt: Bool[Array, "batch vocab"] | None
    counts: Int[Array, "batch vocab"] | None
    recent: Int[Array, "batch window"] | None

    @classmethod
    def start(
        cls,
        prompts: Int[Array, "batch seq"],
        lengths: Int[Array, " batch"],
        *,
        max_new_tokens: int,
        pad: int,
        vocab_size: int,
        settings: LogitsSettings,
        stop_sequences: tuple[tuple[int, ...], ...],
    ) -> "TokensSoFar":
        batch, width = prompts.shape
        rows = jnp.arange(batch)[:, None]
        in_prompt = counts = recent = None
        if settings.repetition_penalty is not None:
            held = (jnp.arange(width) < lengths[:, None]) & (prompts >= 0)
            ids = jnp.where(held & (prompts < vocab_size), prompts, vocab_size)
            in_prompt = jnp.zeros((batch, vocab_size), bool)
            in_prompt = in_prompt.at[rows, ids].set(True, mode="drop")
        if any(
            control is not None
            for control in (
                settings.repetition_penalty,
                settings.presence_penalty,
                settings.frequency_penalty,
            )
        ):
            counts = jnp.zeros((batch, vocab_size), jnp.int32)
        if stop_sequences:
            window = max(map(len, stop_sequences))
            positions = lengths[:, None] - window + jnp.arange(window)
            tail = jnp.take_along_axis(prompts, jnp.maximum(positions, 0), axis=1)
            recent = jnp.where(positions >= 0, tail, -1).astype(jnp.int32)
        tokens = jnp.full((batch, max_new_tokens), pad, jnp.int32)
        return cls(tokens, in_prompt, counts, recent)

    def append(
        self, step: Int[Array, ""], token: Int[Array, " batch"]
    ) -> "TokensSoFar":
        """With `token` as every row's generated token number `step`."""
        counts = self.counts
        if counts is not None:
            counts = counts.at[jnp.arange(len(token)), token].add(1)
        recent = self.recent
        if recent is not None:
            recent = jnp.concatenate([recent[:, 1:], token[:, None]], axis=1)
        tokens = self.tokens.at[:, step].set(token)
        return TokensSoFar(tokens, self.in_prompt, counts, recent)

    def stopped(
        self, stop_sequences: tuple[tuple[int, ...], ...]
    ) -> Bool[Array, " batch"]:
        """Whether each row's tokens so far end with one of `stop_sequences`."""
        ended = jnp.zeros(self.tokens.shape[:1], bool)
        if self.recent is None:
            return ended
        for sequence in stop_sequences:
            tail = self.recent[:, self.recent.shape[1] - len(sequence) :]
            ended = ended | jnp.all(tail == jnp.asarray(sequence), axis=1)
        return ended


def process_logits(
    logits: Float[Array, "batch vocab"],
    tokens_so_far: TokensSoFar,
    step: Int[Array, ""],
    settings: LogitsSettings,
) -> Float[Array, "batch vocab"]:
    """The logits of the next token after every control of `settings`, in float32,
    in transformers' order: `-inf` where a token may not be chosen. `step` counts
    the tokens generated before this one."""
    logits = logits.astype(jnp.float32)
    counts = tokens_so_far.counts
    if settings.repetition_penalty is not None:
        assert tokens_so_far.in_prompt is not None and counts is not None
        seen = tokens_so_far.in_prompt | (counts > 0)
        penalty = settings.repetition_penalty
        penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
        logits = jnp.where(seen, penalised, logits)
    if settings.frequency_penalty is not None:
        assert counts is not None
        logits = logits - settings.frequency_penalty * counts
    if settings.presence_penalty is not None:
        assert counts is not None
        logits = logits - settings.presence_penalty * (counts > 0)
    if settings.min_new_tokens is not None and settings.eos:
        eos = jnp.zeros(logits.shape[-1], bool).at[jnp.asarray(settings.eos)].set(True)
        logits = jnp.where(eos & (step < settings.min_new_tokens), -jnp.inf, logits)
    if settings.logits_processor is not None:
        logits = settings.logits_processor(logits, tokens_so_far.tokens, step)
    if settings.temperature is None:
        return logits
    # Shifted so that the largest is 0 before the division: a tiny temperature then
    # sends the others to -inf (the greedy limit) instead of overflowing.
    logits = logits - jnp.max(logits, axis=-1, keepdims=True)
    logits = logits / settings.temperature
    if settings.top_k is not None:
        kth = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if settings.top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probabilities = jax.nn.softmax(descending, axis=-1)
        before = jnp.cumsum(probabilities, axis=-1) - probabilities
        # The most likely token is always kept; then each while the mass before it
        # is still short of top_p.
        kept = jnp.where(before < settings.top_p, descending, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    if settings.min_p is not None:
        probabilities = jax.nn.softmax(logits, axis=-1)
        floor = settings.min_p * probabilities.max(axis=-1, keepdims=True)
        logits = jnp.where(probabilities < floor, -jnp.inf, logits)
    return logits


def choose_token(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None,
) -> Int[Array, " batch"]:
    """The next token from `process_logits`' output: the argmax when `key` is None,
    otherwise a draw from the softmax."""
    if key is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
