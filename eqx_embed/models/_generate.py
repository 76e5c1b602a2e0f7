"""Generation: argument checks, then one compiled program per shape that prefills the
cache and decodes in a `lax.while_loop`, stopping as soon as every row has finished.
"""

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int

from ._beam_search import beam_search
from ._cache import KVCache, decode_step, prefill
from ._generate_checks import (
    check_beam_search,
    check_key,
    check_logits_processor,
    check_no_controls_with_beams,
    check_prompts,
    check_sampling,
    check_stop_sequences,
    is_number,
    logits_settings,
    or_default,
)
from ._sampling import (
    LogitsSettings,
    TokensSoFar,
    choose_token,
    process_logits,
)

NAN_TOKEN = -1
"""What `generate` returns for a row whose logits hold a NaN (a bad id in its prompt
under `out_of_range="nan"`, or NaN weights): at that step and every later one, never a
valid-looking token."""

# What `generate` returns: the new tokens, and with beam search their scores if asked.
Generated = (
    Int[Array, "rows max_new_tokens"]
    | tuple[Int[Array, "rows max_new_tokens"], Float[Array, " rows"]]
)


def prefill_prompts(
    model,
    prompts: ArrayLike,
    prompt_lengths: ArrayLike | None,
    capacity: int,
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """`TransformerLM.prefill`: the prompts checked, then run once into a cache."""
    prompts, lengths, capacity = check_prompts(
        prompts,
        prompt_lengths,
        capacity,
        new_tokens=0,
        config=model.config,
    )
    return prefill(model, prompts, lengths, capacity)


@eqx.filter_jit
def _generate(
    model,
    prompts,
    lengths,
    key,
    settings: LogitsSettings,
    *,
    max_new_tokens: int,
    capacity: int,
    stop_sequences: tuple[tuple[int, ...], ...],
    pad: int,
):
    logits, cache = prefill(model, prompts, lengths, capacity)
    batch = prompts.shape[0]

    def unfinished(state):
        step, _, _, _, done, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state):
        step, logits, cache, so_far, done, first_poisoned = state
        step_key = None if key is None else jax.random.fold_in(key, step)
        # A NaN in a row's logits (a bad id in its prompt, NaN weights) is never
        # sampled as a token: the row is finished, its tokens NAN_TOKEN from here.
        poisoned = jnp.isnan(logits).any(axis=-1) & ~done
        first_poisoned = jnp.where(poisoned, step, first_poisoned)
        logits = process_logits(logits, so_far, step, settings)
        token = jnp.where(done | poisoned, pad, choose_token(logits, step_key))
        so_far = so_far.append(step, token)
        if settings.eos:
            done = done | jnp.isin(token, jnp.asarray(settings.eos))
        done = done | so_far.stopped(stop_sequences) | poisoned
        logits, cache = decode_step(model, cache, token)
        return step + 1, logits, cache, so_far, done, first_poisoned

    so_far = TokensSoFar.start(
        prompts,
        lengths,
        max_new_tokens=max_new_tokens,
        pad=pad,
        vocab_size=model.config.vocab_size,
        settings=settings,
        stop_sequences=stop_sequences,
    )
    never = jnp.full((batch,), max_new_tokens, jnp.int32)
    state = (jnp.int32(0), logits, cache, so_far, jnp.zeros((batch,), bool), never)
    _, _, _, so_far, _, first_poisoned = jax.lax.while_loop(unfinished, advance, state)
    steps = jnp.arange(max_new_tokens)
    return jnp.where(steps >= first_poisoned[:, None], NAN_TOKEN, so_far.tokens)


def generate(
    model,
    prompts,
    *,
    prompt_lengths,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    repetition_penalty,
    presence_penalty,
    frequency_penalty,
    min_new_tokens,
    stop_sequences,
    logits_processor,
    key,
    eos_token_id,
    pad_token_id,
    capacity,
    num_beams,
    num_return_sequences,
    length_penalty,
    early_stopping,
    return_scores,
) -> Generated:
    """See `TransformerLM.generate`: the arguments left `None` take the model's
    `generation_config`, then every argument is checked before compiling."""
    config = model.config
    defaults = model.generation_config
    max_new_tokens = or_default(max_new_tokens, defaults.max_new_tokens)
    temperature = or_default(temperature, or_default(defaults.temperature, 0.0))
    if is_number(temperature) and temperature > 0:
        # The stored filters are for sampling; greedy decoding leaves them.
        top_k = or_default(top_k, defaults.top_k)
        top_p = or_default(top_p, defaults.top_p)
    check_beam_search(
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        return_scores=return_scores,
        temperature=temperature,
    )
    eos, pad = check_sampling(
        vocab_size=config.vocab_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        key=key,
        eos_token_id=or_default(eos_token_id, defaults.eos_token_id),
        pad_token_id=or_default(pad_token_id, defaults.pad_token_id),
    )
    if temperature > 0:
        check_key(key)
    settings = logits_settings(
        temperature=temperature,
        top_k=None if top_k is None else int(top_k),
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=or_default(repetition_penalty, defaults.repetition_penalty),
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        min_new_tokens=min_new_tokens,
        max_new_tokens=max_new_tokens,
        eos=eos,
        logits_processor=logits_processor,
    )
    stop_sequences = check_stop_sequences(stop_sequences, config.vocab_size)
    prompts, lengths, capacity = check_prompts(
        prompts,
        prompt_lengths,
        capacity,
        new_tokens=max_new_tokens,
        config=config,
    )
    check_logits_processor(
        settings, prompts.shape[0], config.vocab_size, max_new_tokens
    )
    if num_beams > 1:
        check_no_controls_with_beams(settings, stop_sequences)
        return beam_search(
            model,
            prompts,
            lengths,
            eos=eos,
            pad=pad,
            max_new_tokens=int(max_new_tokens),
            capacity=capacity,
            num_beams=int(num_beams),
            num_return_sequences=int(num_return_sequences),
            length_penalty=float(length_penalty),
            early_stopping=early_stopping,
            return_scores=return_scores,
        )
    return _generate(
        model,
        prompts,
        lengths,
        key if temperature > 0 else None,
        settings,
        max_new_tokens=int(max_new_tokens),
        capacity=capacity,
        stop_sequences=stop_sequences,
        pad=pad,
    )
