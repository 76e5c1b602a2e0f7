"""Rotary position embeddings: `RotaryPositionalEmbedding`, a drop-in for
`equinox.nn.RotaryPositionalEmbedding` that also reads Hugging Face's RoPE settings.

It holds (or builds per sequence length) the cos and sin tables and hands out a
`RopeRotation` (`_rope_rotate.py`) for a sequence of positions; the scaling rules live
in `_rope_scaling.py` and the stored tables in `_tables.py`.
"""

from collections.abc import Mapping
from typing import Any, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jaxtyping import (
    Array,
    ArrayLike,
    DTypeLike,
    Float,
    Integer,
    PRNGKeyArray,
    UInt,
)

from ._contracts import check_feature_size, check_positive, checked
from ._indices import (
    IntegerSequence,
    OutOfRange,
    check_indices,
    check_policy,
    gather_rows,
)
from ._mesh import row_sharding
from ._numerics import default_float_dtype
from ._rope_rotate import RopeRotation
from ._rope_scaling import (
    RopeScaling,
    default_inverse_frequencies,
    inverse_frequencies,
    parse_scaling,
)
from ._tables import TablesPerLength, as_bits, frozen


class RotaryPositionalEmbedding(eqx.Module):
    """Rotary position embeddings (RoPE), with precomputed tables and any positions.

    Rotates pairs of features of a query or key by an angle proportional to the
    token's position, so that the dot product of a rotated query and key depends on
    their positions only through the difference.

    **A drop-in for `equinox.nn.RotaryPositionalEmbedding`.** The same constructor
    (`RotaryPositionalEmbedding(embedding_size, theta, dtype)`, positionally or by
    keyword, with no table length to give), the same call on `(seq, embedding_size)`
    and the same results, under `jax.vmap(rope, in_axes=1, out_axes=1)` over heads as
    equinox documents, and the same static methods `rotate_half` and
    `precompute_freqs_cis`. The differences are deliberate:

    - **Tables per instance.** equinox caches its tables globally, keyed by
        `(embedding_size, dtype)` only, so a second module with another `theta` (as
        Gemma 3's local and global layers) silently reuses the first one's. Here
        they belong to the instance: stored when `max_seq_len` is given, otherwise
        built at trace time per static sequence length and kept with the instance.
    - **float64 angles.** The tables are computed in float64 and cast once, where
        equinox computes its angles in float32 (off by up to `seq` ulps of an
        angle).
    - **Low-precision inputs.** A float16 or bfloat16 `x` against float32 tables is
        rotated in float32 and cast back once, where equinox raises
        `TypePromotionError` under strict dtype promotion.
    - **Validation.** `embedding_size` must be positive (equinox accepts 0), and
        each bad argument gets a `ValueError` naming it.

    And what real checkpoints need on top:

    - **Queries and keys with heads, directly.** `x` may be `(seq, embedding_size)` or
        `(seq, heads, head_dim)` (any number of axes between `seq` and the features),
        so `rope(queries)` rotates every head at once; `embedding_size` is then the
        head dimension. Batch with `jax.vmap(rope)(queries)`.
    - **Any positions.** `positions` defaults to `0 .. seq-1`; pass others for a
        KV-cache step at offset `t` (`positions=t + jnp.arange(seq)`) or for packed
        sequences whose positions restart per document.
    - **Both layouts.** Half-split pairs feature `i` with `i + rotary_dim / 2`
        (GPT-NeoX, Hugging Face Llama; the default, as equinox); `interleaved=True`
        pairs `2i` with `2i + 1` (GPT-J, Meta's original Llama weights).
    - **Partial rotary.** `rotary_dim < embedding_size` rotates the first `rotary_dim`
        features and passes the rest through bit for bit (GPT-NeoX, Phi).
    - **Hugging Face scaling.** `scaling` takes a `rope_scaling` / `rope_parameters`
        dict from `config.json` and reproduces transformers' cos and sin, attention
        factor included.

    **The tables are not parameters.** With `max_seq_len`, cos and sin are computed
    once, at construction, in float64 and cast once to `dtype`; they belong to the
    instance.
    They are stored bit-cast to unsigned integers of the same width (`cos_bits`,
    `sin_bits`) and cast back for free at call time. Being integer arrays, they are
    not `eqx.is_inexact_array`, so the plain Equinox training recipe
    (`eqx.filter(model, eqx.is_inexact_array)` for the optimiser state,
    `eqx.filter_grad`, `eqx.apply_updates`) gives them no gradient, no optimiser state
    and no weight decay, which `jax.lax.stop_gradient` alone would not prevent; yet
    they are ordinary array leaves, so they move with the model under `jit`, `vmap`,
    sharding and `eqx.tree_serialise_leaves`. Read them as floats with
    [`cos`][eqx_embed.RotaryPositionalEmbedding.cos] and
    [`sin`][eqx_embed.RotaryPositionalEmbedding.sin]. Several layers can share one
    instance.

    **Raises:**

    - `ValueError` at construction, naming the argument: a size or `theta` that is not
        positive, an odd or too large `rotary_dim`, a `dtype` that is not floating, a
        `scaling` dict with an unknown rule or key, or a `rope_theta` /
        `partial_rotary_factor` that disagrees with `theta` / `rotary_dim`. When
        called: more rows than `max_seq_len`, a feature axis that is not
        `embedding_size`, positions not one per row of `x`, positions outside the
        tables (known ones at once; traced ones under `out_of_range="error"` when the
        program runs).
    - `jaxtyping.TypeCheckError`: integer `x`, float positions.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    rope = eqx_embed.RotaryPositionalEmbedding(8, max_seq_len=32)
    queries = jax.random.normal(jax.random.key(0), (10, 4, 8))  # (seq, heads, head_dim)
    rotated = rope(queries)
    # A KV-cache step: the 11th token, at position 10.
    step = rope(queries[:1], positions=jnp.array([10]))
    assert rotated.shape == queries.shape and step.shape == (1, 4, 8)
    ```
    """

    cos_bits: UInt[Array, "max_seq_len half_rotary_dim"] | None
    sin_bits: UInt[Array, "max_seq_len half_rotary_dim"] | None
    embedding_size: int = eqx.field(static=True)
    theta: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)
    max_seq_len: int | None = eqx.field(static=True)
    rotary_dim: int = eqx.field(static=True)
    interleaved: bool = eqx.field(static=True)
    rope_type: str = eqx.field(static=True)
    attention_factor: float = eqx.field(static=True)
    out_of_range: OutOfRange = eqx.field(static=True)
    _tables_per_length: "TablesPerLength | None" = eqx.field(static=True, repr=False)

    def __init__(
        self,
        embedding_size: int,
        theta: float | int = 10_000.0,
        dtype: DTypeLike | None = None,
        *,
        max_seq_len: int | None = None,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        scaling: Mapping[str, Any] | None = None,
        out_of_range: OutOfRange = "nan",
    ):
        """**Arguments:**

        - `embedding_size`: the width of the vectors rotated: the head dimension when
            rotating queries and keys. Positive and even (unless `rotary_dim` is
            smaller).
        - `theta`: the base of the frequencies, `theta ** (-2i / rotary_dim)`.
        - `dtype`: the dtype of the tables. Defaults to float32 (float64 when JAX
            runs in 64-bit mode).

        These three may be positional, as in `equinox.nn.RotaryPositionalEmbedding`;
        all that follow are keyword only.

        - `max_seq_len`: the number of positions in the tables, `0 .. max_seq_len-1`,
            built now and stored in the module. `None` (the default, as equinox):
            the tables are built when a call is traced, for that call's static
            sequence length, and kept per instance and length, so each length is
            computed once however many calls use it. Explicit `positions` need
            `max_seq_len`: a traced position could be anywhere.
        - `rotary_dim`: how many leading features to rotate; even, at most
            `embedding_size`. Defaults to all of them (or to
            `int(embedding_size * partial_rotary_factor)` when `scaling` has one).
        - `interleaved`: `False` for the half-split layout, `True` for GPT-J's pairs
            of adjacent features.
        - `scaling`: a Hugging Face `rope_scaling` or `rope_parameters` dict, with its
            rule in `rope_type` or `type`: `"default"`, `"linear"`, `"dynamic"`,
            `"yarn"`, `"longrope"`, `"llama3"` or `"proportional"`, and that rule's
            keys. Values that transformers reads from the model config go in the
            dict: `original_max_position_embeddings` (for `"dynamic"`, the config's
            `max_position_embeddings`) and, for `"yarn"` and `"longrope"` without a
            `factor`, `max_position_embeddings`. A `rope_theta` or
            `partial_rotary_factor` in the dict must agree with `theta` and
            `rotary_dim` (except for `"proportional"`, which rotates every feature
            and reads `partial_rotary_factor` itself). The rules that depend on the
            current sequence length (`"dynamic"`, and `"longrope"`'s choice of short
            or long factors) give the tables that transformers computes for a
            sequence of length `max_seq_len` (without `max_seq_len`: of the length
            of the call), for every position.
        - `out_of_range`: what a traced position outside `[0, max_seq_len)` gives:
            `"nan"` (the default, NaN rows) or `"error"` (an error when the program
            runs), as for token ids in [`Embedding`][eqx_embed.Embedding]. Positions
            known at trace time always raise at once. Negative positions are out of
            range: nothing wraps or clamps.
        """
        check_policy(out_of_range)
        parsed = parse_scaling(scaling)
        check_positive("embedding_size", embedding_size, integer=True)
        if max_seq_len is not None:
            check_positive("max_seq_len", max_seq_len, integer=True)
        check_positive("theta", theta)
        if parsed.rope_theta is not None and parsed.rope_theta != theta:
            raise ValueError(
                f"scaling['rope_theta']={parsed.rope_theta} disagrees with "
                f"theta={theta}; pass theta={parsed.rope_theta}."
            )
        if parsed.partial_rotary_factor is not None:
            from_factor = int(embedding_size * parsed.partial_rotary_factor)
            if rotary_dim is not None and rotary_dim != from_factor:
                raise ValueError(
                    f"rotary_dim={rotary_dim} disagrees with scaling's "
                    f"partial_rotary_factor={parsed.partial_rotary_factor}, which "
                    f"gives int({embedding_size} * "
                    f"{parsed.partial_rotary_factor}) = {from_factor}."
                )
            rotary_dim = from_factor
        if rotary_dim is None:
            if embedding_size % 2:
                raise ValueError(
                    f"embedding_size={embedding_size} is odd, so rotary_dim (which "
                    "defaults to it) must be given: an even number of leading "
                    "features to rotate."
                )
            rotary_dim = embedding_size
        if not 0 < rotary_dim <= embedding_size or rotary_dim % 2:
            raise ValueError(
                "rotary_dim must be even and in (0, embedding_size="
                f"{embedding_size}], got rotary_dim={rotary_dim}."
            )
        if dtype is None:
            dtype = default_float_dtype()
        dtype = jax.dtypes.canonicalize_dtype(dtype)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"dtype must be a floating dtype, got {dtype}.")

        def build(seq_len: int) -> tuple[np.ndarray, np.ndarray, float]:
            return _tables(
                parsed, rotary_dim=rotary_dim, theta=theta, seq_len=seq_len, dtype=dtype
            )

        # Validates the rule's parameters now, whether or not the tables wait.
        *tables, attention_factor = build(max_seq_len or 1)
        if max_seq_len is None:
            self.cos_bits = self.sin_bits = None
            settings = (rotary_dim, float(theta), dtype, frozen(scaling))
            self._tables_per_length = TablesPerLength(settings, build)
        else:
            self.cos_bits, self.sin_bits = (as_bits(table) for table in tables)
            self._tables_per_length = None
        self.embedding_size = embedding_size
        self.theta = float(theta)
        self.dtype = dtype
        self.max_seq_len = max_seq_len
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        self.rope_type = parsed.rope_type
        self.attention_factor = float(attention_factor)
        self.out_of_range = out_of_range

    @staticmethod
    def rotate_half(
        x: Float[Array, "*shape embedding_size"],
    ) -> Float[Array, "*shape embedding_size"]:
        """`(a, b) -> (-b, a)` on the two halves of the features: the half-split
        rotation by a quarter turn, as `equinox.nn.RotaryPositionalEmbedding`'s."""
        half = x.shape[-1] // 2
        return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)

    @staticmethod
    def precompute_freqs_cis(
        embedding_size: int, end: int, theta: float, dtype: DTypeLike
    ) -> tuple[Float[Array, "end half_emb_size"], Float[Array, "end half_emb_size"]]:
        """The unscaled cos and sin tables for positions `0 .. end-1`, as
        `equinox.nn.RotaryPositionalEmbedding.precompute_freqs_cis` returns them, but
        computed in float64 and cast once to `dtype`."""
        angles = np.outer(
            np.arange(end, dtype=np.float64),
            default_inverse_frequencies(embedding_size, theta),
        )
        return jnp.asarray(np.cos(angles).astype(dtype)), jnp.asarray(
            np.sin(angles).astype(dtype)
        )

    @property
    def cos(self) -> Float[Array, "max_seq_len half_rotary_dim"]:
        """`attention_factor * cos(position * frequency)`, in `dtype`. Only with
        `max_seq_len`; without it, see
        [`tables`][eqx_embed.RotaryPositionalEmbedding.tables]."""
        return self.tables(self._stored_tables("cos")[0])[0]

    @property
    def sin(self) -> Float[Array, "max_seq_len half_rotary_dim"]:
        """`attention_factor * sin(position * frequency)`, in `dtype`. Only with
        `max_seq_len`; without it, see
        [`tables`][eqx_embed.RotaryPositionalEmbedding.tables]."""
        return self.tables(self._stored_tables("sin")[0])[1]

    def _stored_tables(self, name: str) -> tuple[int, Array, Array]:
        """`max_seq_len` and the stored bits of cos and sin, or a `ValueError`
        naming `name` for a module built without `max_seq_len`."""
        if self.max_seq_len is None or self.cos_bits is None or self.sin_bits is None:
            raise ValueError(
                f"This module stores no {name} table (it was built without "
                f"max_seq_len); use tables(seq_len)."
            )
        return self.max_seq_len, self.cos_bits, self.sin_bits

    def tables(
        self, seq_len: int
    ) -> tuple[
        Float[Array, "seq_len half_rotary_dim"], Float[Array, "seq_len half_rotary_dim"]
    ]:
        """cos and sin for positions `0 .. seq_len-1`, in `dtype`: a static slice of
        the stored tables, or, without `max_seq_len`, this instance's tables for
        `seq_len` (built in float64 the first time a length is asked for, then
        kept)."""
        if self._tables_per_length is not None:
            cos, sin, _ = self._tables_per_length(seq_len)
            return jnp.asarray(cos), jnp.asarray(sin)
        max_seq_len, cos_bits, sin_bits = self._stored_tables("cos and sin")
        if seq_len > max_seq_len:
            raise ValueError(
                f"x has {seq_len} positions (its first axis) but the tables hold "
                f"max_seq_len={max_seq_len}; build the module with a larger "
                "max_seq_len."
            )
        cos = jax.lax.bitcast_convert_type(cos_bits, self.dtype)
        sin = jax.lax.bitcast_convert_type(sin_bits, self.dtype)
        # A static slice, not a gather: it fuses into the rotation.
        return cos[:seq_len], sin[:seq_len]

    @checked
    def rotation(
        self,
        seq_len: int,
        *,
        positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
    ) -> RopeRotation:
        """The rotation for `seq_len` tokens at `positions`, to apply to several
        tensors: queries and keys, or the same positions in every layer, without
        checking the positions and gathering their table rows once per tensor.

        **Arguments:**

        - `seq_len`: the number of tokens.
        - `positions`: as for `__call__`; defaults to `0 .. seq_len-1`.

        **Returns:**

        A [`RopeRotation`][eqx_embed.RopeRotation]: `rotation(x)` equals
        `self(x, positions=positions)` for every `x` of `seq_len` rows.
        """
        if positions is None:
            cos, sin = self.tables(seq_len)
        elif self.max_seq_len is None:
            raise ValueError(
                "positions need a module built with max_seq_len (tables of a known "
                "size: a traced position could be anywhere); this one has "
                "max_seq_len=None."
            )
        else:
            # NumPy's annotations leave out sequences of mixed int types.
            shape = np.shape(cast(ArrayLike, positions))
            if shape != (seq_len,):
                raise ValueError(
                    f"positions must have shape ({seq_len},), one per token, got "
                    f"shape {shape}."
                )
            # Positions known now raise now, whatever the policy for traced ones.
            known_now = not isinstance(positions, Tracer)
            positions = check_indices(
                positions,
                size=self.max_seq_len,
                out_of_range="error" if known_now else self.out_of_range,
                name="position",
                negative_from_end=False,
            )
            # Explicit mesh axes need the rows' layout: whole, split as the
            # positions are (a batch of packed rows, say).
            cos, sin = (
                gather_rows(
                    table,
                    positions,
                    negative_from_end=False,
                    out_sharding=row_sharding(table),
                )
                for table in (self.cos, self.sin)
            )
        return RopeRotation(
            cos, sin, embedding_size=self.embedding_size, interleaved=self.interleaved
        )

    @jax.named_scope("eqx_embed.RotaryPositionalEmbedding")
    @checked
    def __call__(
        self,
        x: Float[Array, "seq *heads embedding_size"],
        *,
        positions: Integer[ArrayLike, " seq"] | IntegerSequence | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq *heads embedding_size"]:
        """**Arguments:**

        - `x`: the vectors to rotate, one per position along the first axis:
            `(seq, embedding_size)`, or `(seq, heads, head_dim)` queries or keys (any
            axes between the first and the last are rotated alike). One example; use
            `jax.vmap` for a batch.
        - `positions`: the position of each row of `x`, integers of shape `(seq,)` in
            `[0, max_seq_len)`. Defaults to `0 .. seq-1`. (Keyword only.)
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The rotated `x`, same shape and dtype (low-precision inputs are rotated in
        float32 and cast back once). An out-of-range position raises `ValueError` when
        known at trace time; traced ones follow `out_of_range`. To rotate several
        tensors at the same positions, build their
        [`rotation`][eqx_embed.RotaryPositionalEmbedding.rotation] once instead.
        """
        check_feature_size(
            x, self.embedding_size, name="x", owner="module's embedding_size"
        )
        return self.rotation(x.shape[0], positions=positions)(x)


def _tables(
    scaling: RopeScaling, *, rotary_dim: int, theta: float, seq_len: int, dtype
) -> tuple[np.ndarray, np.ndarray, float]:
    """cos and sin for positions `0 .. seq_len-1` in float64, cast once to `dtype`,
    and the attention factor, which (as transformers) scales them both."""
    frequencies, attention_factor = inverse_frequencies(
        scaling, rotary_dim=rotary_dim, theta=theta, max_seq_len=seq_len
    )
    angles = np.outer(np.arange(seq_len, dtype=np.float64), frequencies)
    return (
        (attention_factor * np.cos(angles)).astype(dtype),
        (attention_factor * np.sin(angles)).astype(dtype),
        attention_factor,
    )
