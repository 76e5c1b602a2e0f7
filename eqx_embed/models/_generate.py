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
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray

from ._beam_search import beam_search
from ._cache import KVCache, decode_step, prefill

# What `generate` returns: the new tokens, and with beam search their scores if asked.
Generated = (
    Int[Array, "rows max_new_tokens"]
    | tuple[Int[Array, "rows max_new_tokens"], Float[Array, " rows"]]
)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_prompts(
    prompts: ArrayLike,
    prompt_lengths: ArrayLike | None,
    capacity: int | None,
    *,
    new_tokens: int,
    max_positions: int,
) -> tuple[Int[Array, "batch seq"], Int[Array, " batch"], int]:
    """Prompts as an int array, their lengths (default: the padded width) and the
    capacity (default: the padded width plus `new_tokens`), checked."""
    prompts = jnp.asarray(prompts)
    if prompts.ndim != 2 or not jnp.issubdtype(prompts.dtype, jnp.integer):
        raise ValueError(
            "prompts must be integer token ids of shape (batch, seq), right-padded, "
            f"got dtype {prompts.dtype} and shape {prompts.shape}."
        )
    batch, width = prompts.shape
    if width == 0 or batch == 0:
        raise ValueError(f"prompts must not be empty, got shape {prompts.shape}.")
    if prompt_lengths is None:
        lengths = jnp.full((batch,), width, jnp.int32)
    else:
        lengths = jnp.asarray(prompt_lengths)
        if lengths.shape != (batch,) or not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise ValueError(
                f"prompt_lengths must be {batch} integers (one per prompt), got "
                f"dtype {lengths.dtype} and shape {lengths.shape}."
            )
        if not isinstance(lengths, jax.core.Tracer):
            concrete = np.asarray(lengths)
            if concrete.min() < 1 or concrete.max() > width:
                raise ValueError(
                    f"prompt_lengths must be in [1, {width}] (the prompts' padded "
                    f"width), got {concrete.tolist()}."
                )
        lengths = lengths.astype(jnp.int32)
    needed = width + new_tokens
    if capacity is None:
        capacity = needed
    if not _is_int(capacity) or capacity < needed:
        raise ValueError(
            f"capacity must be an integer of at least the prompts' padded width plus "
            f"the new tokens, {width} + {new_tokens} = {needed}; got {capacity!r}."
        )
    if capacity > max_positions:
        raise ValueError(
            f"capacity ({capacity}) exceeds the model's max_position_embeddings "
            f"({max_positions}); the prompts' width plus max_new_tokens must fit."
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
        max_positions=model.config.max_position_embeddings,
    )
    return prefill(model, prompts, lengths, capacity)


def _check_sampling(
    *,
    vocab_size: int,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
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
    if not _is_number(temperature) or not temperature >= 0:
        raise ValueError(
            "temperature must be a number >= 0 (0 for greedy decoding), got "
            f"{temperature!r}."
        )
    if top_k is not None and (not _is_int(top_k) or not 1 <= top_k <= vocab_size):
        raise ValueError(
            f"top_k must be None or an integer in [1, {vocab_size}] (the vocabulary), "
            f"got {top_k!r}."
        )
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}.")
    if temperature == 0 and (top_k is not None or top_p is not None):
        raise ValueError(
            "top_k and top_p apply only when sampling (temperature > 0); greedy "
            f"decoding (temperature=0) got top_k={top_k!r}, top_p={top_p!r}."
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


def _check_beam_search(
    *,
    num_beams,
    num_return_sequences,
    length_penalty,
    early_stopping,
    return_scores,
    temperature,
) -> None:
    """Raises a `ValueError` naming the first bad beam search argument."""
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams must be a positive integer, got {num_beams!r}.")
    if not _is_int(num_return_sequences) or not (
        1 <= num_return_sequences <= num_beams
    ):
        raise ValueError(
            f"num_return_sequences must be an integer in [1, num_beams={num_beams}] "
            f"(the best finished beams), got {num_return_sequences!r}."
        )
    if not _is_number(length_penalty) or not np.isfinite(length_penalty):
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


def _choose(
    logits: Float[Array, "batch vocab"],
    key: PRNGKeyArray | None,
    temperature: Float[Array, ""],
    top_k: int | None,
    top_p: Float[Array, ""] | None,
) -> Int[Array, " batch"]:
    """The next token: the argmax when `key` is None, otherwise a sample at
    `temperature` among the `top_k` most likely tokens and the smallest set whose
    probability reaches `top_p` (in that order, as Hugging Face)."""
    if key is None:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        descending = -jnp.sort(-logits, axis=-1)
        probabilities = jax.nn.softmax(descending, axis=-1)
        before = jnp.cumsum(probabilities, axis=-1) - probabilities
        # The most likely token is always kept; then each while the mass before it
        # is still short of top_p.
        kept = jnp.where(before < top_p, descending, jnp.inf)
        logits = jnp.where(logits < kept.min(axis=-1, keepdims=True), -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@eqx.filter_jit
def _generate(
    model,
    prompts,
    lengths,
    key,
    temperature,
    top_p,
    *,
    max_new_tokens: int,
    capacity: int,
    top_k: int | None,
    eos: tuple[int, ...],
    pad: int,
):
    logits, cache = prefill(model, prompts, lengths, capacity)
    batch = prompts.shape[0]

    def unfinished(state):
        step, _, _, _, done = state
        return (step < max_new_tokens) & ~jnp.all(done)

    def advance(state):
        step, logits, cache, tokens, done = state
        step_key = None if key is None else jax.random.fold_in(key, step)
        token = _choose(logits, step_key, temperature, top_k, top_p)
        token = jnp.where(done, pad, token)
        tokens = tokens.at[:, step].set(token)
        if eos:
            done = done | jnp.isin(token, jnp.asarray(eos))
        logits, cache = decode_step(model, cache, token)
        return step + 1, logits, cache, tokens, done

    state = (
        jnp.int32(0),
        logits,
        cache,
        jnp.full((batch, max_new_tokens), pad, jnp.int32),
        jnp.zeros((batch,), bool),
    )
    return jax.lax.while_loop(unfinished, advance, state)[3]


def generate(
    model,
    prompts,
    *,
    prompt_lengths,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
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
    """See `TransformerLM.generate`: every argument is checked before compiling."""
    config = model.config
    _check_beam_search(
        num_beams=num_beams,
        num_return_sequences=num_return_sequences,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        return_scores=return_scores,
        temperature=temperature,
    )
    eos, pad = _check_sampling(
        vocab_size=config.vocab_size,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        key=key,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
    )
    prompts, lengths, capacity = check_prompts(
        prompts,
        prompt_lengths,
        capacity,
        new_tokens=max_new_tokens,
        max_positions=config.max_position_embeddings,
    )
    if num_beams > 1:
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
    sampling = temperature > 0
    return _generate(
        model,
        prompts,
        lengths,
        key if sampling else None,
        jnp.float32(temperature),
        None if top_p is None else jnp.float32(top_p),
        max_new_tokens=int(max_new_tokens),
        capacity=capacity,
        top_k=None if top_k is None else int(top_k),
        eos=eos,
        pad=pad,
    )
