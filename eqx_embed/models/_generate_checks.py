"""The checks of `generate`'s and `prefill`'s arguments, each a `ValueError` naming
the argument, all before anything is compiled; and the settings of the per-step
controls they make."""

import numbers
from collections.abc import Sequence

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Int

from ..nn._indices import error_if_outside
from ._config import TransformerConfig
from ._generation_config import GenerationConfig
from ._sampling import LogitsProcessor, LogitsSettings
from ._transformer_forward import checked_token_ids

# OpenAI's documented range for `presence_penalty` and `frequency_penalty`.
OPENAI_PENALTY_BOUND = 2


def is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value) -> bool:
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
            # Traced: checked when the program runs, as a traced id is, by the
            # model's policy: an error, or (`_cache.prefill`) NaN logits for the row,
            # which `generate` returns as NAN_TOKEN. Only the error needs a host
            # callback, which a program exported for several platforms cannot hold.
            if config.out_of_range == "error":
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
    if not is_int(capacity) or capacity < needed:
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


def check_sampling(
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
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be a positive integer, got {max_new_tokens!r}."
        )
    # A positive temperature below float32's smallest normal number is zero to the
    # device (flushed), one past its largest is inf: neither is honoured.
    float32 = np.finfo(np.float32)
    if not is_number(temperature) or not (
        temperature == 0 or float32.tiny <= temperature <= float32.max
    ):
        raise ValueError(
            "temperature must be a number >= 0: 0 for greedy decoding, or to sample, "
            f"one in [{float32.tiny}, {float32.max}] (float32's normal range); got "
            f"{temperature!r}."
        )
    if top_k is not None and (not is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(
            f"top_k must be None or an integer in [1, {vocab_size}] (the vocabulary), "
            f"got {top_k!r}."
        )
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}.")
    if min_p is not None and (not is_number(min_p) or not 0 <= min_p <= 1):
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
    elif is_int(eos_token_id):
        eos = (int(eos_token_id),)
    elif isinstance(eos_token_id, Sequence) and all(map(is_int, eos_token_id)):
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
        if not is_int(token) or not 0 <= token < vocab_size:
            raise ValueError(
                f"{name} must be a token id in [0, {vocab_size}), got {token!r}."
            )
    return eos, int(pad_token_id)


def check_no_controls_with_beams(
    settings: LogitsSettings, stop_sequences: tuple[tuple[int, ...], ...]
) -> None:
    """Beam search scores its beams without the per-step controls: one that is on is
    refused by name rather than ignored."""
    on = [
        name
        for name, value in [
            ("repetition_penalty", settings.repetition_penalty),
            ("presence_penalty", settings.presence_penalty),
            ("frequency_penalty", settings.frequency_penalty),
            ("min_new_tokens", settings.min_new_tokens),
            ("logits_processor", settings.logits_processor),
            ("stop_sequences", stop_sequences or None),
        ]
        if value is not None
    ]
    if on:
        raise ValueError(
            f"Beam search (num_beams > 1) does not apply {', '.join(on)}: set "
            "num_beams=1 to use them, or leave them unset (a repetition_penalty "
            "may come from the model's generation_config: pass repetition_penalty=1)."
        )


def check_beam_search(
    *,
    num_beams,
    num_return_sequences,
    length_penalty,
    early_stopping,
    return_scores,
    temperature,
) -> None:
    """Raises a `ValueError` naming the first bad beam search argument."""
    if not is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
    if not is_int(num_return_sequences) or not (1 <= num_return_sequences <= num_beams):
        raise ValueError(
            f"num_return_sequences must be an integer in [1, num_beams={num_beams}] "
            f"(the best finished beams), got {num_return_sequences!r}."
        )
    if not is_number(length_penalty) or not np.isfinite(length_penalty):
        raise ValueError(
            f"length_penalty must be a finite number, got {length_penalty!r}."
        )
    if not (early_stopping is True or early_stopping is False) and not (
        isinstance(early_stopping, str) and early_stopping == "never"
    ):
        raise ValueError(
            f'early_stopping must be True, False or "never", got {early_stopping!r}.'
        )
    if not isinstance(return_scores, bool):
        raise ValueError(f"return_scores must be True or False, got {return_scores!r}.")
    if num_beams == 1:
        for name, value, unchanged in [
            ("length_penalty", length_penalty, length_penalty == 1),
            ("early_stopping", early_stopping, early_stopping is False),
            ("return_scores", return_scores, return_scores is False),
        ]:
            if not unchanged:
                raise ValueError(
                    f"{name} applies only to beam search (num_beams > 1), got "
                    f"{name}={value!r} with num_beams=1."
                )
        return
    if temperature != 0:
        raise ValueError(
            f"num_beams={num_beams} searches greedily (beam sampling is not "
            f"supported): temperature must be 0, got temperature={temperature!r}."
        )


def check_key(key) -> None:
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
            or not all(is_int(token) and 0 <= token < vocab_size for token in sequence)
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
    `min_p` come checked by `check_sampling`."""
    if repetition_penalty is not None and (
        not is_number(repetition_penalty) or not 0 < repetition_penalty < float("inf")
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
            not is_number(penalty)
            or not -OPENAI_PENALTY_BOUND <= penalty <= OPENAI_PENALTY_BOUND
        ):
            raise ValueError(
                f"{name} must be None or a number in [-2, 2] (OpenAI's range, 0 for "
                f"none), got {penalty!r}."
            )
    if min_new_tokens is not None and (
        not is_int(min_new_tokens) or not 0 <= min_new_tokens <= max_new_tokens
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


def or_default(value, default):
    return default if value is None else value


def check_generation_config(defaults: GenerationConfig, vocab_size: int) -> None:
    """Raises the `ValueError` that `generate` would raise on the first bad field of
    `defaults` (a checkpoint's file), naming it."""
    temperature = or_default(defaults.temperature, 0.0)
    sampling = is_number(temperature) and temperature > 0
    eos, _ = check_sampling(
        vocab_size=vocab_size,
        max_new_tokens=or_default(defaults.max_new_tokens, 1),
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
