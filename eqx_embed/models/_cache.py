"""`KVCache`: the keys and values of the tokens a `TransformerLM` has seen, for
decoding one token at a time, and the cached forward passes that fill it.

```
prefill(prompts, lengths)   run each prompt once; keep the keys/values of its
                            last `slots` tokens; logits after its last token
decode_step(tokens)         one token per row attends to the cache and to itself;
                            its key/value is written at slot `length % slots`
```

Every layer shares one ring buffer of `slots` rows per sequence (the layers are one
scanned module, so their arrays share a shape). Token `t` lives in slot
`t % slots`; from a row's filled length alone, slot `s` holds the latest `t` below it
with `t % slots == s`. A model whose layers all slide (Mistral) needs only its
window, `slots = min(capacity, window)`, so its memory does not grow with the
capacity; a model with any full-attention layer (Llama, Gemma 2's odd layers) keeps
`slots = capacity`, and its sliding layers mask by window within it.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from ._attention import NO_WINDOW
from ._config import TransformerConfig


def cache_slots(config: TransformerConfig, capacity: int) -> int:
    """The rows of the ring buffer for `capacity` tokens per sequence."""
    windows = config.layer_windows
    if any(window is None for window in windows):
        return capacity
    return min(capacity, max(windows))


def held_indices(length: Int[Array, ""], slots: int) -> Int[Array, " slots"]:
    """The sequence index each slot holds after `length` tokens; negative if empty."""
    last = length - 1
    return last - jnp.mod(last - jnp.arange(slots), slots)


class KVCache(eqx.Module):
    """The rotated keys and values of every layer for a batch of sequences, with the
    number of tokens each sequence has written. Built by
    [`TransformerLM.prefill`][eqx_embed.TransformerLM.prefill] and advanced by
    [`TransformerLM.decode_step`][eqx_embed.TransformerLM.decode_step].

    **Fields:**

    - `keys`, `values`: shape `(num_layers, batch, slots, num_kv_heads, head_dim)`
        in the activation dtype; a ring buffer along `slots` (see the module's
        docstring), so its bytes are
        `2 * num_layers * batch * slots * num_kv_heads * head_dim * itemsize`.
    - `lengths`: shape `(batch,)`, the tokens each sequence has written.
    - `capacity`: the most tokens a sequence may write.

    **Raises:**

    - Nothing itself: `prefill` and `decode_step` raise `ValueError` for bad
        prompts, lengths or capacities, before anything is compiled.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "mistral", vocab_size=64, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, sliding_window=4,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    logits, cache = model.prefill(jnp.array([[1, 2, 3]]), capacity=16)
    assert cache.slots == 4  # a sliding window keeps only its window
    logits, cache = model.decode_step(cache, jnp.argmax(logits, axis=-1))
    assert int(cache.lengths[0]) == 4
    ```
    """

    keys: Float[Array, "layers batch slots kv_heads head_dim"]
    values: Float[Array, "layers batch slots kv_heads head_dim"]
    lengths: Int[Array, " batch"]
    capacity: int = eqx.field(static=True)

    @property
    def slots(self) -> int:
        """The rows of the ring buffer per sequence and layer."""
        return self.keys.shape[2]


def prefill(
    model,
    prompts: Int[Array, "batch seq"],
    lengths: Int[Array, " batch"],
    capacity: int,
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Runs right-padded prompts (row `b`'s tokens are `prompts[b, :lengths[b]]`)
    and fills a cache with them; the logits after each prompt's last token."""
    slots = cache_slots(model.config, capacity)
    seq_len = prompts.shape[1]

    def one(tokens, length):
        x = model._embed(model._check_tokens(tokens))
        rotations = model._rotations(seq_len)
        # Empty slots take row 0: decode_step masks them by `held_indices`.
        held = jnp.maximum(held_indices(length, slots), 0)

        def layer(block, x, window, _):
            rotation = model._layer_rotation(rotations, window)
            x, (keys, values) = block.prefill(x, rotation=rotation, window=window)
            return x, (keys[held], values[held])

        x, (keys, values) = model._scan_layers(x, layer)
        last = model.final_norm(x[length - 1])
        return model.embedding.decode(last), keys, values

    logits, keys, values = jax.vmap(one, out_axes=(0, 1, 1))(prompts, lengths)
    return logits, KVCache(keys, values, lengths, capacity)


def decode_step(
    model, cache: KVCache, tokens: Int[Array, " batch"]
) -> tuple[Float[Array, "batch vocab"], KVCache]:
    """Appends one token per sequence; the logits after it."""
    slots = cache.slots

    def one(token, length, keys, values):
        x = model._embed(model._check_tokens(token[None]), length[None])
        rotations = model._rotations(1, length[None])
        held = held_indices(length, slots)

        def layer(block, x, window, cached):
            cached_keys, cached_values = cached
            rotation = model._layer_rotation(rotations, window)
            window = NO_WINDOW if window is None else window
            x, (key, value) = block.decode(
                x,
                rotation=rotation,
                cached_keys=cached_keys,
                cached_values=cached_values,
                cached_mask=(held >= 0) & (length - held < window),
            )
            return x, (key[0], value[0])

        x, (new_keys, new_values) = model._scan_layers(x, layer, xs=(keys, values))
        return model.embedding.decode(model.final_norm(x[0])), new_keys, new_values

    logits, new_keys, new_values = jax.vmap(
        one, in_axes=(0, 0, 1, 1), out_axes=(0, 1, 1)
    )(tokens, cache.lengths, cache.keys, cache.values)
    # One scatter of a row per sequence and layer: the cache is updated in place.
    rows = jnp.arange(tokens.shape[0])
    slot = cache.lengths % slots
    cache = KVCache(
        cache.keys.at[:, rows, slot].set(new_keys),
        cache.values.at[:, rows, slot].set(new_values),
        cache.lengths + 1,
        cache.capacity,
    )
    return logits, cache
