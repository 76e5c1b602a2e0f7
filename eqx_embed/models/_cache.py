"""`KVCache`: the keys and values of the tokens a `TransformerLM` has seen, for
decoding one token at a time, and the cached forward passes that fill it.

```
prefill(prompts, lengths)   run each prompt once; keep each layer's keys/values
                            (a sliding layer: of the last `sliding_slots` tokens);
                            logits after its last token
decode_step(tokens)         one token per row attends to the cache and to itself;
                            its key/value is written at slot `length % slots`
```

Two stacks, each a ring buffer: the full-attention layers' `keys`/`values` keep
`capacity` slots per sequence, the sliding-window layers' `sliding_keys`/
`sliding_values` keep `min(capacity, window)`, so a sliding layer's memory never grows
with the capacity, whether every layer slides (Mistral) or only some do (Gemma 2
alternates, Gemma 3 has five sliding layers to a full one). Token `t` lives in slot
`t % slots` of its stack; from a row's filled length alone, slot `s` holds the latest
`t` below it with `t % slots == s`.

The layers stay one scanned module: layer `i` reads row `stack_index[i]` of its kind's
stack, chosen by a `lax.cond` on its (scanned) kind, so that only that stack's
attention runs. The scan only reads the stacks; the new keys and values come out of it
and are written after it, with one in-place scatter per stack.
"""

import dataclasses
import functools

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._attention import NO_WINDOW
from ._config import TransformerConfig
from ._sharding import model_on_auto_axes
from ._transformer_forward import (
    check_tokens,
    checked_token_ids,
    embed,
    gather_rotations,
    layer_rotation,
    scan_layers,
)


def stack_slots(config: TransformerConfig, capacity: int) -> tuple[int, int]:
    """The slots per sequence of a full-attention layer and of a sliding layer, for
    `capacity` tokens; 0 for a kind of layer the model does not have."""
    windows = config.layer_windows
    sliding = [window for window in windows if window is not None]
    full_slots = capacity if None in windows else 0
    return full_slots, min(capacity, max(sliding)) if sliding else 0


def layer_stacks(config: TransformerConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, whether it slides, and its row in its kind's stack."""
    sliding = np.array([window is not None for window in config.layer_windows])
    stack_index = np.where(sliding, np.cumsum(sliding), np.cumsum(~sliding)) - 1
    return sliding, stack_index


def held_indices(
    length: Int[Array, "*batch"], slots: int
) -> Int[Array, "*batch slots"]:
    """The sequence index each slot holds after `length` tokens; negative if empty."""
    last = length[..., None] - 1
    return last - jnp.mod(last - jnp.arange(slots), slots)


class KVCache(eqx.Module):
    """The rotated keys and values of every layer for a batch of sequences, with the
    number of tokens each sequence has written. Built by
    [`TransformerLM.prefill`][eqx_embed.TransformerLM.prefill] and advanced by
    [`TransformerLM.decode_step`][eqx_embed.TransformerLM.decode_step].

    **Fields:**

    - `keys`, `values`: the full-attention layers', shape
        `(num_full_layers, batch, slots, num_kv_heads, head_dim)` with
        `slots = capacity` (`0` when every layer slides).
    - `sliding_keys`, `sliding_values`: the sliding-window layers', shape
        `(num_sliding_layers, batch, sliding_slots, num_kv_heads, head_dim)` with
        `sliding_slots = min(capacity, sliding_window)` (`0` when no layer slides).
    - `lengths`: shape `(batch,)`, the tokens each sequence has written.
    - `capacity`: the most tokens a sequence may write.
    - `layer_windows`, `num_kv_heads`, `head_dim`, `dtype`: what the cache was built
        for (the model's config: each layer's window, `None` for full attention, and
        its activation dtype). `decode_step` refuses a cache built for another
        config with a `ValueError` naming the field.

    All four arrays are ring buffers along their slots (see the module's docstring),
    in the activation dtype, so the cache's bytes are
    `2 * batch * num_kv_heads * head_dim * itemsize * (num_full_layers * slots +
    num_sliding_layers * sliding_slots)`.

    **Raises:**

    - Nothing itself: `prefill` and `decode_step` raise `ValueError` for bad
        prompts, lengths or capacities, before anything is compiled.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "gemma2", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, head_dim=8, sliding_window=4,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    logits, cache = model.prefill(jnp.array([[1, 2, 3]]), capacity=16)
    # Layer 0 slides and keeps only its window; layer 1 keeps the capacity.
    assert cache.sliding_slots == 4 and cache.slots == 16
    logits, cache = model.decode_step(cache, jnp.argmax(logits, axis=-1))
    assert int(cache.lengths[0]) == 4
    ```
    """

    keys: Float[Array, "full_layers batch slots kv_heads head_dim"]
    values: Float[Array, "full_layers batch slots kv_heads head_dim"]
    sliding_keys: Float[Array, "sliding_layers batch sliding_slots kv_heads head_dim"]
    sliding_values: Float[Array, "sliding_layers batch sliding_slots kv_heads head_dim"]
    lengths: Int[Array, " batch"]
    capacity: int = eqx.field(static=True)
    layer_windows: tuple[int | None, ...] = eqx.field(static=True)
    num_kv_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    dtype: str = eqx.field(static=True)

    @property
    def slots(self) -> int:
        """The ring buffer's rows per sequence in a full-attention layer."""
        return self.keys.shape[2]

    @property
    def sliding_slots(self) -> int:
        """The ring buffer's rows per sequence in a sliding-window layer."""
        return self.sliding_keys.shape[2]


def built_for(config: TransformerConfig) -> dict:
    """The metadata of a cache built for `config`: `KVCache`'s fields by name."""
    return dict(
        layer_windows=config.layer_windows,
        num_kv_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        dtype=config.activation_dtype,
    )


def check_cache(config: TransformerConfig, cache: KVCache) -> None:
    """Raises a `ValueError` naming the first field in which `cache` was built for
    another config than `config`."""
    for name, expected in built_for(config).items():
        if getattr(cache, name) != expected:
            raise ValueError(
                f"The cache was built for another model: its {name} is "
                f"{getattr(cache, name)!r}, this model's is {expected!r}. Use a "
                "cache from this model's prefill."
            )
    if cache.capacity > config.max_position_embeddings:
        raise ValueError(
            f"The cache's capacity ({cache.capacity}) exceeds this model's "
            f"max_position_embeddings ({config.max_position_embeddings})."
        )


def prefill(
    model,
    prompts: Int[Array, "batch seq"],
    lengths: Int[Array, " batch"],
    capacity: int,
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Runs right-padded prompts (row `b`'s tokens are `prompts[b, :lengths[b]]`)
    and fills a cache with them; the logits after each prompt's last token. On a
    sharded model, the blocks' collectives are GSPMD's and the results replicated."""
    return model_on_auto_axes(functools.partial(_prefill, capacity=capacity))(
        model, prompts, lengths
    )


def _prefill(model, prompts, lengths, *, capacity: int):
    full_slots, sliding_slots = stack_slots(model.config, capacity)
    sliding = layer_stacks(model.config)[0]
    seq_len = prompts.shape[1]

    def one(tokens, length):
        # A length outside [1, seq] (traced, under the "nan" policy: concrete ones
        # and the "error" policy's are refused before) gives NaN logits, which
        # `generate` turns into its NaN_TOKEN: never a valid-looking row.
        bad_length = (length < 1) | (length > seq_len)
        length = jnp.clip(length, 1, seq_len)
        # The padding never reaches a result: a bad id there would read NaN keys and
        # values, which the masks of later steps cannot remove (0 x NaN).
        tokens = jnp.where(jnp.arange(seq_len) < length, tokens, 0)
        x = embed(model, check_tokens(model.config, tokens))
        rotations = gather_rotations(model, seq_len)
        # Empty slots take row 0: decode_step masks them by `held_indices`.
        held = jnp.maximum(held_indices(length, sliding_slots), 0)

        def layer(block, x, window, _):
            rotation = layer_rotation(rotations, window)
            x, keys_values = block.prefill(x, rotation=rotation, window=window)
            if not full_slots:
                # Every layer slides: only the window leaves the scan.
                keys_values = jax.tree.map(lambda kv: kv[held], keys_values)
            return x, keys_values

        x, keys_values = scan_layers(model, x, layer)
        last = model.final_norm(x[length - 1])
        if full_slots:
            # Token t < capacity lives in slot t: the prompt, then room to write.
            padding = ((0, 0), (0, full_slots - seq_len), (0, 0), (0, 0))
            full = [jnp.pad(kv[~sliding], padding) for kv in keys_values]
            window = [kv[sliding][:, held] for kv in keys_values]
        else:
            full = [kv[:0, :0] for kv in keys_values]
            window = keys_values
        logits = jnp.where(bad_length, jnp.nan, model.embedding.decode(last))
        return logits, *full, *window

    logits, keys, values, sliding_keys, sliding_values = jax.vmap(
        one, out_axes=(0, 1, 1, 1, 1)
    )(prompts, lengths)
    return logits, KVCache(
        keys,
        values,
        sliding_keys,
        sliding_values,
        lengths,
        capacity,
        **built_for(model.config),
    )


def check_decode_tokens(
    config: TransformerConfig, cache: KVCache, tokens: ArrayLike
) -> Int[Array, " batch"]:
    """`tokens` as an array of one id per row of `cache` (checked in their own dtype
    with the model's policy), which must have room left (checked when its lengths
    are concrete)."""
    tokens = checked_token_ids(config, tokens)
    if tokens.shape != cache.lengths.shape:
        raise ValueError(
            f"tokens must have shape {cache.lengths.shape}, one per row of the "
            f"cache, got shape {tokens.shape}."
        )
    # NumPy: under `jit`, even a constant cache's `jnp.any` would be traced.
    if not isinstance(cache.lengths, jax.core.Tracer) and bool(
        np.any(np.asarray(cache.lengths) >= cache.capacity)
    ):
        raise ValueError(
            f"The cache is full: a row holds capacity={cache.capacity} tokens."
        )
    return tokens


def decode_step(
    model, cache: KVCache, tokens: Int[Array, " batch"]
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Appends one token per sequence; the logits after it (on a sharded model, as
    `prefill`)."""
    check_cache(model.config, cache)
    return model_on_auto_axes(_decode_step)(model, cache, tokens)


def _decode_step(model, cache: KVCache, tokens):
    sliding, stack_index = layer_stacks(model.config)
    mixed = sliding.any() and not sliding.all()
    lengths = cache.lengths
    x = jax.vmap(
        lambda token, length: embed(
            model, check_tokens(model.config, token[None]), length
        )
    )(tokens, lengths[:, None])
    rotations = jax.vmap(lambda length: gather_rotations(model, 1, length))(
        lengths[:, None]
    )
    full = cache.keys, cache.values
    window_stacks = cache.sliding_keys, cache.sliding_values

    # The batch is mapped inside each layer, not around the scan: the stacks stay
    # layer-major, so reading one layer's rows copies that layer only.
    def layer(block, x, window, scanned):
        layer_slides, index = scanned
        rotation = layer_rotation(rotations, window)
        window = NO_WINDOW if window is None else window

        def attend(keys, values):
            held = held_indices(lengths, keys.shape[2])
            mask = (held >= 0) & (lengths[:, None] - held < window)

            def one(x, rotation, keys, values, mask):
                return block.decode(
                    x,
                    rotation=rotation,
                    cached_keys=keys,
                    cached_values=values,
                    cached_mask=mask,
                )

            return jax.vmap(one)(x, rotation, keys[index], values[index], mask)

        if not mixed:
            return attend(*(window_stacks if sliding[0] else full))
        # A static kind per layer, scanned and unbatched: a real branch, so a layer
        # attends over its own stack's slots only.
        return jax.lax.cond(
            layer_slides, lambda: attend(*window_stacks), lambda: attend(*full)
        )

    scanned = (jnp.asarray(sliding), jnp.asarray(stack_index, jnp.int32))
    x, (new_keys, new_values) = scan_layers(model, x, layer, xs=scanned)
    logits = jax.vmap(model.embedding.decode)(model.final_norm(x[:, 0]))
    # One scatter of a row per sequence and layer into each stack: the cache is
    # updated in place.
    rows = jnp.arange(tokens.shape[0])

    def written(stack, new, layers):
        if stack.shape[0] == 0:
            return stack
        if not layers.all():
            new = new[layers]
        return stack.at[:, rows, lengths % stack.shape[2]].set(new[:, :, 0])

    cache = dataclasses.replace(
        cache,
        keys=written(cache.keys, new_keys, ~sliding),
        values=written(cache.values, new_values, ~sliding),
        sliding_keys=written(cache.sliding_keys, new_keys, sliding),
        sliding_values=written(cache.sliding_values, new_values, sliding),
        lengths=lengths + 1,
    )
    return logits, cache
