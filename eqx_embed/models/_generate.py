"""Generation: argument checks, then one compiled program per shape that prefills the
cache and decodes in a `lax.while_loop`, stopping as soon as every row has finished.
"""

import numbers
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ..nn._indices import error_if_outside
from ._cache import KVCache, decode_step, prefill
from ._config import TransformerConfig
from ._generation_config import GenerationConfig
from ._sampling import (
    LogitsProcessor,
    LogitsSettings,
    TokensSoFar,
    choose_token,
    process_logits,
)
from ._transformer_forward import checked_token_ids

NAN_TOKEN = -1
"""What `generate` returns for a row whose logits hold a NaN (a bad id in its prompt
under `out_of_range="nan"`, or NaN weights): at that step and every later one, never a
valid-looking token."""

# OpenAI's documented range for `presence_penalty` and `frequency_penalty`.
OPENAI_PENALTY_BOUND = 2


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _unnarrowed(values: ArrayLike) -> np.ndarray | jax.Array:
    """`values` as an array in their own dtype: a NumPy int64 `2**32 + 1` must be
    checked as itself, not as the 1 that `jnp.asarray` would make of it."""
    return values if isinstance(values, np.ndarray | jax.Array) else np.asarray(values)


def check_prompts(
    prompts: ArrayLike,
    prompt_lengths: ArrayLike | None,
    capacity: int | None,
    *,
    new_tokens: int,
    config: TransformerConfig,
) -> tuple[Int[Array, "batch seq"], Int[Array, " batch"], int]:
    """Prompts as an int array, their lengths (default: the padded width) and the
    capacity (default: the padded width plus `new_tokens`), checked: the integers
    in their own dtype, before anything narrows them."""
    prompts = _unnarrowed(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            "prompts must be integer token ids of shape (batch, seq), right-padded, "
            f"got dtype {prompts.dtype} and shape {prompts.shape}."
        )
    prompts = checked_token_ids(config, prompts)
    batch, width = prompts.shape
    if width == 0 or batch == 0:
        raise ValueError(f"prompts must not be empty, got shape {prompts.shape}.")
    if prompt_lengths is None:
        lengths = jnp.full((batch,), width, jnp.int32)
    else:
        lengths = _unnarrowed(prompt_lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"prompt_lengths must be {batch} integers (one per prompt), got "
                f"dtype {lengths.dtype} and shape {lengths.shape}."
            )
        bounds = f"prompt_lengths must be in [1, {width}] (the prompts' padded width)"
        if isinstance(lengths, jax.core.Tracer):
            # Traced: checked when the program runs, as a traced id under
            # `out_of_range="error"`.
            lengths = error_if_outside(
                lengths, low=1, high=width, message=bounds + ", got {value}."
            )
        else:
            concrete = np.asarray(lengths)
            if concrete.min() < 1 or concrete.max() > width:
                raise ValueError(f"{bounds}, got {concrete.tolist()}.")
        lengths = jnp.asarray(lengths).astype(jnp.int32)
    needed = width + new_tokens
    if capacity is None:
        capacity = needed
    if not _is_int(capacity) or capacity < needed:
        raise ValueError(
            f"capacity must be an integer of at least the prompts' padded width plus "
            f"the new tokens, {width} + {new_tokens} = {needed}; got {capacity!r}."
        )
    if capacity > config.max_position_embeddings:
        raise ValueError(
            f"capacity ({capacity}) exceeds the model's max_position_embeddings "
            f"({config.max_position_embeddings}); the prompts' width plus "
            "max_new_tokens must fit."
        )
    return prompts, lengths, int(capacity)


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


def _check_sampling(
    *,
    vocab_size: int,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    min_p,
    key,
    eos_token_id,
    pad_token_id,
) -> tuple[tuple[int, ...], int]:
    """Raises a `ValueError` on the first bad argument; the EOS ids as a tuple and
    the padding id."""
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be a positive integer, got {max_new_tokens!r}."
        )
    # A positive temperature below float32's smallest normal number is zero to the
    # device (flushed), one past its largest is inf: neither is honoured.
    float32 = np.finfo(np.float32)
    if not _is_number(temperature) or not (
        temperature == 0 or float32.tiny <= temperature <= float32.max
    ):
        raise ValueError(
            "temperature must be a number >= 0: 0 for greedy decoding, or to sample, "
            f"one in [{float32.tiny}, {float32.max}] (float32's normal range); got "
            f"{temperature!r}."
        )
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(
            f"top_k must be None or an integer in [1, {vocab_size}] (the vocabulary), "
            f"got {top_k!r}."
        )
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}.")
    if min_p is not None and (not _is_number(min_p) or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be None or in [0, 1], got {min_p!r}.")
    if temperature == 0 and (top_k, top_p, min_p) != (None, None, None):
        raise ValueError(
            "top_k, top_p and min_p apply only when sampling (temperature > 0); "
            f"greedy decoding (temperature=0) got top_k={top_k!r}, top_p={top_p!r}, "
            f"min_p={min_p!r}."
        )
    if temperature > 0 and key is None:
        raise ValueError(
            f"Sampling (temperature={temperature}) needs a `key`, a "
            "jax.random.PRNGKey; got key=None."
        )
    if eos_token_id is None:
        eos = ()
    elif _is_int(eos_token_id):
        eos = (int(eos_token_id),)
    elif isinstance(eos_token_id, Sequence) and all(map(_is_int, eos_token_id)):
        eos = tuple(int(token) for token in eos_token_id)
    else:
        raise ValueError(
            f"eos_token_id must be None, a token id or a list of them, got "
            f"{eos_token_id!r}."
        )
    if pad_token_id is None:
        pad_token_id = eos[0] if eos else 0
    for name, token in [("eos_token_id", t) for t in eos] + [
        ("pad_token_id", pad_token_id)
    ]:
        if not _is_int(token) or not 0 <= token < vocab_size:
            raise ValueError(
                f"{name} must be a token id in [0, {vocab_size}), got {token!r}."
            )
    return eos, int(pad_token_id)


def _check_key(key) -> None:
    """Raises a `ValueError` naming `key` unless it is one PRNG key, typed
    (`jax.random.key`) or raw (`jax.random.PRNGKey`)."""
    try:
        jax.eval_shape(lambda key: jax.random.fold_in(key, 0), key)
    except (TypeError, ValueError) as error:
        described = getattr(key, "dtype", type(key).__name__)
        raise ValueError(
            "key must be one PRNG key, jax.random.key(seed) or "
            f"jax.random.PRNGKey(seed); got {described} of shape "
            f"{np.shape(key)}."
        ) from error


def check_stop_sequences(
    stop_sequences, vocab_size: int
) -> tuple[tuple[int, ...], ...]:
    """`stop_sequences` as a tuple of non-empty tuples of token ids."""
    expected = (
        "stop_sequences must be None or a non-empty list of non-empty sequences of "
        f"token ids in [0, {vocab_size}), such as [[13, 198], [2]]"
    )
    if stop_sequences is None:
        return ()
    if (
        not isinstance(stop_sequences, Sequence | np.ndarray)
        or isinstance(stop_sequences, str)
        or len(stop_sequences) == 0
    ):
        raise ValueError(f"{expected}; got {stop_sequences!r}.")
    checked = []
    for sequence in stop_sequences:
        if (
            not isinstance(sequence, Sequence | np.ndarray)
            or isinstance(sequence, str)
            or len(sequence) == 0
            or not all(_is_int(token) and 0 <= token < vocab_size for token in sequence)
        ):
            raise ValueError(f"{expected}; got {sequence!r} in {stop_sequences!r}.")
        checked.append(tuple(int(token) for token in sequence))
    return tuple(checked)


def _traced(value, *, neutral, dtype=jnp.float32) -> Array | None:
    """`value` as a traced scalar, or `None` (the control off) at its neutral value."""
    return None if value is None or value == neutral else jnp.asarray(value, dtype)


def logits_settings(
    *,
    temperature,
    top_k: int | None,
    top_p,
    min_p,
    repetition_penalty,
    presence_penalty,
    frequency_penalty,
    min_new_tokens,
    max_new_tokens: int,
    eos: tuple[int, ...],
    logits_processor: LogitsProcessor | None,
) -> LogitsSettings:
    """The settings of the controls, each checked (a `ValueError` naming it); those
    at their neutral value are off. `temperature` (0: greedy), `top_k`, `top_p` and
    `min_p` come checked by `_check_sampling`."""
    if repetition_penalty is not None and (
        not _is_number(repetition_penalty) or not 0 < repetition_penalty < float("inf")
    ):
        raise ValueError(
            "repetition_penalty must be None or a positive finite number (1 for none), "
            f"got {repetition_penalty!r}."
        )
    for name, penalty in [
        ("presence_penalty", presence_penalty),
        ("frequency_penalty", frequency_penalty),
    ]:
        if penalty is not None and (
            not _is_number(penalty)
            or not -OPENAI_PENALTY_BOUND <= penalty <= OPENAI_PENALTY_BOUND
        ):
            raise ValueError(
                f"{name} must be None or a number in [-2, 2] (OpenAI's range, 0 for "
                f"none), got {penalty!r}."
            )
    if min_new_tokens is not None and (
        not _is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens
    ):
        raise ValueError(
            f"min_new_tokens must be None or an integer in [0, max_new_tokens] = "
            f"[0, {max_new_tokens}], got {min_new_tokens!r}."
        )
    if logits_processor is not None and not callable(logits_processor):
        raise ValueError(
            "logits_processor must be None or a function (logits, tokens, step) -> "
            f"logits, got {logits_processor!r}."
        )
    return LogitsSettings(
        repetition_penalty=_traced(repetition_penalty, neutral=1),
        presence_penalty=_traced(presence_penalty, neutral=0),
        frequency_penalty=_traced(frequency_penalty, neutral=0),
        min_new_tokens=_traced(min_new_tokens, neutral=0, dtype=jnp.int32),
        eos=eos,
        logits_processor=logits_processor,
        temperature=_traced(temperature, neutral=0),
        top_k=top_k,
        top_p=_traced(top_p, neutral=1),
        min_p=_traced(min_p, neutral=0),
    )


def check_logits_processor(
    settings: LogitsSettings, batch: int, vocab_size: int, max_new_tokens: int
) -> None:
    """Traces the hook once on abstract arguments (nothing runs or compiles): a
    result of another shape or dtype than its logits raises a `ValueError`."""
    if settings.logits_processor is None:
        return
    logits = jax.ShapeDtypeStruct((batch, vocab_size), jnp.float32)
    result = jax.eval_shape(
        settings.logits_processor,
        logits,
        jax.ShapeDtypeStruct((batch, max_new_tokens), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    if (
        not isinstance(result, jax.ShapeDtypeStruct)
        or result.shape != logits.shape
        or result.dtype != logits.dtype
    ):
        got = (
            f"shape {result.shape} and dtype {result.dtype}"
            if isinstance(result, jax.ShapeDtypeStruct)
            else repr(result)
        )
        raise ValueError(
            "logits_processor must return logits of the shape and dtype it is given, "
            f"{logits.shape} float32; got {got}."
        )


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


def _or_default(value, default):
    return default if value is None else value


def check_generation_config(defaults: GenerationConfig, vocab_size: int) -> None:
    """Raises the `ValueError` that `generate` would raise on the first bad field of
    `defaults` (a checkpoint's file), naming it."""
    temperature = _or_default(defaults.temperature, 0.0)
    sampling = _is_number(temperature) and temperature > 0
    eos, _ = _check_sampling(
        vocab_size=vocab_size,
        max_new_tokens=_or_default(defaults.max_new_tokens, 1),
        temperature=temperature,
        top_k=defaults.top_k if sampling else None,
        top_p=defaults.top_p if sampling else None,
        min_p=None,
        # A key is the caller's to give when sampling, never a default.
        key=...,
        eos_token_id=defaults.eos_token_id,
        pad_token_id=defaults.pad_token_id,
    )
    logits_settings(
        temperature=temperature,
        top_k=None,
        top_p=None,
        min_p=None,
        repetition_penalty=defaults.repetition_penalty,
        presence_penalty=None,
        frequency_penalty=None,
        min_new_tokens=None,
        max_new_tokens=1,
        eos=eos,
        logits_processor=None,
    )


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
) -> Int[Array, "batch max_new_tokens"]:
    """See `TransformerLM.generate`: the arguments left `None` take the model's
    `generation_config`, then every argument is checked before compiling."""
    config = model.config
    defaults = model.generation_config
    max_new_tokens = _or_default(max_new_tokens, defaults.max_new_tokens)
    temperature = _or_default(temperature, _or_default(defaults.temperature, 0.0))
    if _is_number(temperature) and temperature > 0:
        # The stored filters are for sampling; greedy decoding leaves them.
        top_k = _or_default(top_k, defaults.top_k)
        top_p = _or_default(top_p, defaults.top_p)
    eos, pad = _check_sampling(
        vocab_size=config.vocab_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        key=key,
        eos_token_id=_or_default(eos_token_id, defaults.eos_token_id),
        pad_token_id=_or_default(pad_token_id, defaults.pad_token_id),
    )
    if temperature > 0:
        _check_key(key)
    settings = logits_settings(
        temperature=temperature,
        top_k=None if top_k is None else int(top_k),
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=_or_default(repetition_penalty, defaults.repetition_penalty),
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
