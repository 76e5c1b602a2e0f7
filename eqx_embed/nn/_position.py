"""Absolute position embeddings: learned (`PositionEmbedding`, GPT-2's `wpe`) and
fixed sinusoids (`SinusoidalPositionalEncoding`, Vaswani et al.)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, DTypeLike, Float, PRNGKeyArray, UInt

from ._contracts import check_positive, checked
from ._embedding import Initializer, TokenId
from ._indices import OutOfRange, check_indices, check_policy, gather_rows
from ._numerics import default_float_dtype
from ._tables import TablesPerLength, as_bits


def _position_row(table, position, *, max_seq_len, out_of_range):
    """Row `position` of `table`, any position outside `[0, max_seq_len)` following
    `out_of_range`: an error, or a row of NaNs. Never a wrap or a clamp."""
    position = check_indices(
        position,
        size=max_seq_len,
        out_of_range=out_of_range,
        name="position",
        negative_from_end=False,
    )
    return gather_rows(table, position, negative_from_end=False)


def gpt2_position_init(
    key: PRNGKeyArray, shape: tuple[int, ...], dtype: DTypeLike = jnp.float32
) -> Array:
    """`PositionEmbedding`'s default initialiser: a normal of standard deviation
    0.02, as GPT-2 and BERT draw their position tables."""
    return 0.02 * jax.random.normal(key, shape, dtype)


def _default_dtype(dtype: DTypeLike | None) -> jnp.dtype:
    dtype = default_float_dtype() if dtype is None else jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}.")
    return dtype


class PositionEmbedding(eqx.Module):
    """Learned absolute position embeddings: one trained row per position, as
    GPT-2's `wpe`, BERT's `position_embeddings` and keras_hub's `PositionEmbedding`.

    Called on one position, like [`Embedding`][eqx_embed.Embedding] on one token;
    `jax.vmap(positions)(jnp.arange(seq))` gives a sequence's rows, to add to its
    token embeddings. `offset` reserves leading rows that no position reads (OPT's
    learned positions start at row 2). A position outside `[0, max_seq_len)` reads
    NaNs or raises, as out-of-range token ids do; it is never clamped to the last
    row, so a sequence longer than the model was trained for cannot pass unnoticed.

    **Raises:**

    - `ValueError` at construction, naming the argument: sizes that are not positive,
        a negative `offset`, a `weight` that disagrees with the sizes given; at call
        time, in `"error"` mode, a position outside `[0, max_seq_len)`.
    - `jaxtyping.TypeCheckError` for a position that is not one integer.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_embed

    positions = eqx_embed.PositionEmbedding(1024, 16, key=jax.random.key(0))
    rows = jax.vmap(positions)(jnp.arange(8))
    assert rows.shape == (8, 16)
    assert jnp.isnan(positions(1024)).all()  # out of range: NaNs, never a clamp
    ```
    """

    weight: Float[Array, "rows embedding_size"]
    max_seq_len: int = eqx.field(static=True)
    embedding_size: int = eqx.field(static=True)
    offset: int = eqx.field(static=True)
    dtype: jnp.dtype | None = eqx.field(static=True)
    out_of_range: OutOfRange = eqx.field(static=True)

    def __init__(
        self,
        max_seq_len: int | None = None,
        embedding_size: int | None = None,
        weight: Float[ArrayLike, "rows embedding_size"] | None = None,
        *,
        key: PRNGKeyArray | None = None,
        init: Initializer = gpt2_position_init,
        offset: int = 0,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        out_of_range: OutOfRange = "nan",
    ):
        """**Arguments:**

        Either a new table:

        - `max_seq_len`: the number of positions, `0 .. max_seq_len-1`. Positive.
        - `embedding_size`: the width of each row. Positive.
        - `key`: a `jax.random.PRNGKey` for the initialiser. (Keyword only, as all
            that follow.)
        - `init`: a `jax.nn.initializers`-style callable `init(key, shape, dtype)`.
            Defaults to a normal of standard deviation 0.02, as GPT-2 and BERT.
        - `param_dtype`: the table's dtype. Defaults to float32 (float64 when JAX
            runs in 64-bit mode).

        Or an existing one:

        - `weight`: the table, of shape `(offset + max_seq_len, embedding_size)`;
            `max_seq_len` and `embedding_size`, if given, must agree with it.
            `param_dtype`, if given, casts it.

        And for both:

        - `offset`: the number of leading rows before position 0's (OPT: 2). They
            are part of the table, so that a checkpoint's weight loads as it is.
        - `dtype`: the compute dtype of the rows returned. `None`: the table's.
        - `out_of_range`: what a traced position outside `[0, max_seq_len)` gives:
            `"nan"` (the default, a row of NaNs) or `"error"` (an error when the
            program runs), as for token ids in [`Embedding`][eqx_embed.Embedding].
            Concrete positions outside the range raise in `"error"` mode at once.
            Negative positions are out of range: nothing counts from the end.
        """
        check_policy(out_of_range)
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative integer, got {offset!r}.")
        if weight is None:
            if max_seq_len is None or embedding_size is None or key is None:
                raise ValueError(
                    "PositionEmbedding needs either `weight=...` or all of "
                    "`max_seq_len`, `embedding_size` and `key`; got "
                    f"max_seq_len={max_seq_len!r}, "
                    f"embedding_size={embedding_size!r}, key={key!r}."
                )
            check_positive("max_seq_len", max_seq_len, integer=True)
            check_positive("embedding_size", embedding_size, integer=True)
            shape = (offset + max_seq_len, embedding_size)
            weight = init(key, shape, _default_dtype(param_dtype))
            if weight.shape != shape:
                raise ValueError(
                    f"init returned shape {weight.shape}, expected {shape}."
                )
        else:
            weight = jnp.asarray(weight)  # a NumPy table, as for `Embedding`
            if weight.ndim != 2 or weight.shape[0] <= offset:
                raise ValueError(
                    "weight must have shape (offset + max_seq_len, embedding_size) "
                    f"with max_seq_len > 0, got shape {weight.shape} with "
                    f"offset={offset}."
                )
            given = (max_seq_len, embedding_size)
            found = (weight.shape[0] - offset, weight.shape[1])
            if any(g is not None and g != f for g, f in zip(given, found, strict=True)):
                raise ValueError(
                    f"weight of shape {weight.shape} with offset={offset} holds "
                    f"max_seq_len={found[0]}, embedding_size={found[1]}, but "
                    f"max_seq_len={max_seq_len}, embedding_size={embedding_size} "
                    "were given."
                )
            if param_dtype is not None:
                weight = weight.astype(param_dtype)
        self.weight = weight
        self.max_seq_len = weight.shape[0] - offset
        self.embedding_size = weight.shape[1]
        self.offset = offset
        self.dtype = None if dtype is None else jnp.dtype(dtype)
        self.out_of_range = out_of_range

    @jax.named_scope("eqx_embed.PositionEmbedding")
    @checked
    def __call__(
        self, position: TokenId, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " embedding_size"]:
        """**Arguments:**

        - `position`: one position, a scalar integer in `[0, max_seq_len)`. Use
            `jax.vmap` for a sequence: `jax.vmap(self)(jnp.arange(seq))`.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        Row `offset + position` of the table, of shape `(embedding_size,)`, in the
        compute `dtype`. NaNs (or an error) for a position out of range.
        """
        # The rows that positions read: a static slice, so that the offset rows
        # count as out of range rather than as negative positions.
        row = _position_row(
            self.weight[self.offset :],
            position,
            max_seq_len=self.max_seq_len,
            out_of_range=self.out_of_range,
        )
        return row if self.dtype is None else row.astype(self.dtype)


class SinusoidalPositionalEncoding(eqx.Module):
    """The fixed sinusoidal position encoding of "Attention Is All You Need"
    (Vaswani et al., 2017), as keras_hub's `SinePositionEncoding`: feature `2i` of
    position `p` is `sin(p / max_wavelength ** (2i / embedding_size))` and feature
    `2i + 1` is the cosine of the same angle.

    **Nothing is trained.** The encodings are computed in float64 NumPy and cast
    once to `dtype`. With `max_seq_len` they are stored bit-cast to unsigned integers,
    as [`RotaryPositionalEmbedding`][eqx_embed.RotaryPositionalEmbedding]'s tables
    (so `eqx.is_inexact_array` leaves them out of gradients, optimiser state and
    weight decay); without it they are built at trace time for each static sequence
    length and kept per instance.

    Call it on one position (it needs `max_seq_len`), and batch with `jax.vmap`; or
    take a whole sequence's rows with
    [`encodings`][eqx_embed.SinusoidalPositionalEncoding.encodings].

    **Raises:**

    - `ValueError` at construction, naming the argument: a size that is not
        positive, `max_wavelength <= 1`, a dtype that is not floating; at call time,
        a per-position call without `max_seq_len`, or (in `"error"` mode) a position
        out of range.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_embed

    encoding = eqx_embed.SinusoidalPositionalEncoding(16)
    assert encoding.encodings(10).shape == (10, 16)
    assert jax.tree.leaves(encoding) == []  # nothing to train
    ```
    """

    table_bits: UInt[Array, "max_seq_len embedding_size"] | None
    embedding_size: int = eqx.field(static=True)
    max_seq_len: int | None = eqx.field(static=True)
    max_wavelength: float = eqx.field(static=True)
    dtype: jnp.dtype = eqx.field(static=True)
    out_of_range: OutOfRange = eqx.field(static=True)
    _tables_per_length: TablesPerLength | None = eqx.field(static=True, repr=False)

    def __init__(
        self,
        embedding_size: int,
        *,
        max_seq_len: int | None = None,
        max_wavelength: float | int = 10_000,
        dtype: DTypeLike | None = None,
        out_of_range: OutOfRange = "nan",
    ):
        """**Arguments:**

        - `embedding_size`: the width of each encoding. Positive (odd sizes end on a
            sine, as in keras_hub).
        - `max_seq_len`: the number of positions stored, `0 .. max_seq_len-1`.
            `None`: nothing is stored; `encodings(seq_len)` builds the rows at trace
            time. (Keyword only, as all that follow.)
        - `max_wavelength`: the longest wavelength, `10_000` in the paper.
        - `dtype`: the dtype of the encodings. Defaults to float32 (float64 when
            JAX runs in 64-bit mode).
        - `out_of_range`: what a traced position outside `[0, max_seq_len)` gives in
            a per-position call: `"nan"` (the default) or `"error"`, as for token ids
            in [`Embedding`][eqx_embed.Embedding]. Never a wrap or a clamp.
        """
        check_policy(out_of_range)
        check_positive("embedding_size", embedding_size, integer=True)
        if max_seq_len is not None:
            check_positive("max_seq_len", max_seq_len, integer=True)
        if max_wavelength <= 1:
            raise ValueError(
                f"max_wavelength must be greater than 1, got {max_wavelength}."
            )
        dtype = _default_dtype(dtype)

        def build(seq_len: int) -> np.ndarray:
            return _sinusoids(seq_len, embedding_size, float(max_wavelength)).astype(
                dtype
            )

        if max_seq_len is None:
            self.table_bits = None
            self._tables_per_length = TablesPerLength(
                (embedding_size, float(max_wavelength), dtype), build
            )
        else:
            self.table_bits = as_bits(build(max_seq_len))
            self._tables_per_length = None
        self.embedding_size = embedding_size
        self.max_seq_len = max_seq_len
        self.max_wavelength = float(max_wavelength)
        self.dtype = dtype
        self.out_of_range = out_of_range

    def encodings(self, seq_len: int) -> Float[Array, "seq_len embedding_size"]:
        """The encodings of positions `0 .. seq_len-1`, to add to a sequence's token
        embeddings (keras_hub's `SinePositionEncoding()(x)`).

        **Arguments:**

        - `seq_len`: the number of positions, static; at most `max_seq_len` when
            that is set.

        **Returns:**

        Shape `(seq_len, embedding_size)`, in `dtype`: a static slice of the stored
        table, or this instance's rows for `seq_len` (built in float64 the first
        time a length is asked for, then kept).
        """
        if self._tables_per_length is not None:
            return jnp.asarray(self._tables_per_length(seq_len))
        max_seq_len, table_bits = self._stored_table()
        if seq_len > max_seq_len:
            raise ValueError(
                f"seq_len={seq_len} is more than the max_seq_len={max_seq_len} "
                "positions stored; build the module with a larger max_seq_len, or "
                "without one."
            )
        return jax.lax.bitcast_convert_type(table_bits, self.dtype)[:seq_len]

    def _stored_table(self) -> tuple[int, Array]:
        """`max_seq_len` and the stored bits of the table, or a `ValueError` for a
        module built without `max_seq_len`."""
        if self.max_seq_len is None or self.table_bits is None:
            raise ValueError(
                "A per-position call reads a stored table: build the module with "
                "max_seq_len=..., or use encodings(seq_len) for positions "
                "0 .. seq_len-1."
            )
        return self.max_seq_len, self.table_bits

    @jax.named_scope("eqx_embed.SinusoidalPositionalEncoding")
    @checked
    def __call__(
        self, position: TokenId, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " embedding_size"]:
        """**Arguments:**

        - `position`: one position, a scalar integer in `[0, max_seq_len)`. Use
            `jax.vmap` for many.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The position's encoding, of shape `(embedding_size,)`, in `dtype`. NaNs (or
        an error) for a position out of range.
        """
        max_seq_len, table_bits = self._stored_table()
        table = jax.lax.bitcast_convert_type(table_bits, self.dtype)
        return _position_row(
            table,
            position,
            max_seq_len=max_seq_len,
            out_of_range=self.out_of_range,
        )


def _sinusoids(seq_len: int, embedding_size: int, max_wavelength: float) -> np.ndarray:
    """Vaswani et al.'s encodings in float64: sines on even features, cosines on odd
    ones, both of the angle `p / max_wavelength ** (2 * (j // 2) / embedding_size)`."""
    features = np.arange(embedding_size)
    exponents = 2 * (features // 2) / embedding_size
    angles = np.outer(
        np.arange(seq_len, dtype=np.float64),
        np.float64(max_wavelength) ** -exponents,
    )
    return np.where(features % 2 == 0, np.sin(angles), np.cos(angles))
