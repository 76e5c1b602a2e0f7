"""The forward pass of a `TransformerLM` (`model` below), up to the final norm: the
token checks, the embedding, the rotations gathered once for every layer, and the scan
over the stacked blocks. The full forward (`hidden_states`) and the cached ones
(`_cache.py`) share these steps."""

from collections.abc import Callable
from typing import Any, overload

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, Integer

from ..nn._indices import IntegerSequence, check_indices, checked_integers
from ..nn._rope_rotate import RopeRotation
from ._attention import NO_WINDOW, segment_runs
from ._config import TransformerConfig
from ._remat import rematerialised
from ._sharding import on_auto_axes

Rotations = tuple[RopeRotation | None, RopeRotation | None]


def checked_token_ids(
    config: TransformerConfig, tokens: Integer[ArrayLike, "*shape"] | IntegerSequence
) -> Int[Array, "*shape"]:
    """Token ids of any shape (a sequence, a batch, a prompt), checked in their own
    dtype with the embedding's policy before anything narrows or traces them, so that
    an int64 id past int32 never wraps and bad ids known now raise now. They come back
    as int32 in [0, vocab_size], which the lookup accepts unchanged (`vocab_size`, a
    bad id, reads NaNs)."""
    return check_indices(
        tokens,
        size=config.vocab_size,
        out_of_range=config.out_of_range,
        name="token id",
        negative_from_end=True,
    )


def check_tokens(
    config: TransformerConfig, tokens: Integer[ArrayLike, " seq"] | IntegerSequence
) -> Int[Array, " seq"]:
    """Checks a sequence's ids and length."""
    tokens = checked_token_ids(config, tokens)
    if tokens.ndim != 1:
        raise ValueError(
            f"tokens must be one sequence of ids, shape (seq,), got shape "
            f"{tokens.shape}; use jax.vmap for a batch."
        )
    seq_len = tokens.shape[0]
    if seq_len > config.max_position_embeddings:
        raise ValueError(
            f"tokens has {seq_len} tokens but the model supports at most "
            f"max_position_embeddings={config.max_position_embeddings}."
        )
    return tokens


def embed(
    model: Any,
    tokens: Int[Array, " seq"],
    positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
) -> Float[Array, "seq hidden"]:
    """The (scaled) embeddings of checked `tokens`, plus the learned embeddings of
    `positions` (default `0 .. seq-1`) for a model that has them (GPT-2)."""
    config = model.config
    x = jax.vmap(model.embedding)(tokens)
    if config.scale_embeddings:
        x = x * jnp.asarray(config.hidden_size**0.5, dtype=x.dtype)
    if model.position_embedding is not None:
        if positions is None:
            positions = jnp.arange(tokens.shape[0])
        x = x + jax.vmap(model.position_embedding)(positions).astype(x.dtype)
    return x


def gather_rotations(
    model: Any,
    seq_len: int,
    positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
) -> Rotations:
    """The rotations of the global and the local (Gemma 3's sliding layers) RoPE at
    `positions`, checked and gathered once for every layer; `None` where the model has
    no such RoPE."""
    global_rope, local_rope = (
        None if rope is None else rope.rotation(seq_len, positions=positions)
        for rope in (model.rope, model.local_rope)
    )
    return global_rope, local_rope


def layer_rotation(rotations: Rotations, window: Any) -> RopeRotation | None:
    """The rotation of a layer with `window` (static, or traced per layer): the local
    one for a sliding layer when the model has one."""
    rotation, local_rotation = rotations
    if local_rotation is None:
        return rotation
    if not isinstance(window, jax.Array):
        return rotation if window is None else local_rotation
    return jax.tree.map(
        lambda local, full: jnp.where(window != NO_WINDOW, local, full),
        local_rotation,
        rotation,
    )


def scanned_windows(config: TransformerConfig) -> int | None | Int[Array, " layers"]:
    """The window shared by every layer, static, or one traced per layer."""
    windows = config.layer_windows
    if len(set(windows)) == 1:
        return windows[0]
    return jnp.asarray(
        [NO_WINDOW if w is None else w for w in windows], dtype=jnp.int32
    )


def scan_layers(
    model: Any, x: Any, layer: Callable, xs: Any = None, *, blocks: Any = None
):
    """Scans `layer(block, x, window, xs_slice) -> (x, per_layer_output)` over the
    stacked blocks (and `xs`, per-layer data with a leading layer axis); returns the
    final `x` and the stacked outputs."""
    blocks = model.blocks if blocks is None else blocks
    parameters, structure = eqx.partition(blocks, eqx.is_array)
    windows = scanned_windows(model.config)
    static_window = not isinstance(windows, jax.Array)

    def step(x, scanned):
        parameters, window, xs_slice = scanned
        if static_window:
            window = windows
        return layer(eqx.combine(parameters, structure), x, window, xs_slice)

    return jax.lax.scan(
        rematerialised(step, model.config.remat_policy),
        x,
        (parameters, None if static_window else windows, xs),
        unroll=model.config.scan_unroll,
    )


def hidden_states(
    model: Any,
    tokens: Integer[ArrayLike, " seq"] | IntegerSequence,
    token_positions: Integer[ArrayLike, " seq"] | IntegerSequence | None,
    segment_ids: Integer[ArrayLike, " seq"] | IntegerSequence | None,
) -> Float[Array, "seq hidden_size"]:
    """`TransformerLM.hidden_states`, whose documentation states the contract."""
    tokens = check_tokens(model.config, tokens)
    seq_len = tokens.shape[0]
    runs = None
    if segment_ids is not None:
        segment_ids = jnp.asarray(checked_integers(segment_ids, name="segment_ids"))
        if segment_ids.shape != (seq_len,):
            raise ValueError(
                f"segment_ids must have shape ({seq_len},), one per token, got "
                f"shape {segment_ids.shape}."
            )
        runs, run_positions = segment_runs(segment_ids)
        if token_positions is None:
            token_positions = run_positions
    model_rotations = gather_rotations(model, seq_len, token_positions)
    x = embed(model, tokens, token_positions)
    parameters, structure = eqx.partition(model.blocks, eqx.is_array)

    def layers(x, parameters, model_rotations, runs):
        def layer(block, x, window, _):
            rotation = layer_rotation(model_rotations, window)
            out = block(x, rotation=rotation, window=window, segment_ids=runs)
            return out, None

        blocks = eqx.combine(parameters, structure)
        return scan_layers(model, x, layer, blocks=blocks)[0]

    # The blocks' FSDP gathers and tensor-parallel reductions are GSPMD's to place,
    # also under explicit mesh axes.
    x = on_auto_axes(layers, x)(x, parameters, model_rotations, runs)
    return model.final_norm(x)


def flat_hidden_states(
    model: Any,
    tokens: Integer[ArrayLike, "batch seq"],
    token_positions: Integer[ArrayLike, "batch seq"] | None,
    segment_ids: Integer[ArrayLike, "batch seq"] | None,
) -> Float[Array, "batch*seq hidden_size"]:
    """The hidden states of a batch of sequences, each run by `model.hidden_states`
    under `jax.vmap`, as one row per token. Every integer is checked in its own dtype
    first: `jax.vmap` would narrow an int64 one."""
    tokens = checked_token_ids(model.config, tokens)
    # Only the options given are batched: `None` keeps each one's default. Positions
    # known now raise now, as in `hidden_states`.
    bounds = dict(
        token_positions=dict(low=0, high=model.config.max_position_embeddings),
        segment_ids={},
    )
    rows = {
        name: jnp.asarray(checked_integers(value, name=name, **bounds[name]))
        for name, value in (
            ("token_positions", token_positions),
            ("segment_ids", segment_ids),
        )
        if value is not None
    }
    hidden = jax.vmap(lambda t, options: model.hidden_states(t, **options))(
        tokens, rows
    )
    return hidden.reshape(tokens.size, hidden.shape[-1])


@overload
def flat_rows(values: ArrayLike, size: int) -> Array | np.ndarray: ...
@overload
def flat_rows(values: None, size: int) -> None: ...
def flat_rows(values: ArrayLike | None, size: int) -> Array | np.ndarray | None:
    """`values` of a `(batch, seq)` batch as one row per token; `None` stays. Arrays
    keep their own dtype, so that int64 targets reach their check unnarrowed."""
    if values is None:
        return None
    if isinstance(values, np.ndarray | jax.Array):
        return values.reshape(size)
    return jnp.reshape(values, size)
