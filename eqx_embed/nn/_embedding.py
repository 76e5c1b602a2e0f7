from collections.abc import Callable
from typing import Any, TypedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import (
    Array,
    ArrayLike,
    Bool,
    DTypeLike,
    Float,
    Integer,
    PRNGKeyArray,
)

from ._contracts import check_feature_size, check_positive, checked
from ._indices import (
    IntegerSequence,
    OutOfRange,
    check_indices,
    check_policy,
    gather_rows,
)
from ._mesh import first_columns, on_explicit_mesh, row_sharding
from ._numerics import default_float_dtype
from ._quantize import quantize_table
from ._table_kind import Table, TableKind, dot_with_table

Initializer = Callable[[PRNGKeyArray, tuple[int, ...], Any], Array]

# One token id. Not `Integer[ArrayLike, ""]`: that admits every NumPy scalar, floats
# included, unchecked.
TokenId = Integer[Array, ""] | Integer[np.ndarray, ""] | np.integer | int


# A function rather than `jax.nn.initializers.normal(stddev=1.0)` (same draws), so that
# it has a docstring of its own in the API docs.
@checked
def default_embedding_init(
    key: PRNGKeyArray, shape: tuple[int, ...], dtype: Any = jnp.float32
) -> Array:
    """The default table initialiser: a standard normal, exactly as
    `equinox.nn.Embedding` draws it, so that swapping one for the other with the same
    key gives the same table. For a table that is also the output projection (tied
    decoding), `jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal",
    out_axis=0)` (flax's default, standard deviation `1/sqrt(embedding_size)`) keeps
    the initial logits of order one.

    **Arguments:**

    - `key`: a `jax.random.PRNGKey`.
    - `shape`: the table's shape, `(num_embeddings, embedding_size)`.
    - `dtype`: the table's dtype.

    **Returns:**

    An array of standard normal draws.

    **Raises:**

    - `jaxtyping.TypeCheckError` for a `shape` that is not a tuple of integers.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_embed

    table = eqx_embed.default_embedding_init(jax.random.key(0), (100, 16))
    # The same draws as equinox.nn.Embedding's from the same key.
    peer = eqx.nn.Embedding(100, 16, key=jax.random.key(0))
    assert jnp.array_equal(table, peer.weight)
    # For a tied table, flax's default keeps the initial logits of order one.
    tied = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    embedding = eqx_embed.Embedding(100, 16, init=tied, key=jax.random.key(0))
    ```
    """
    return jax.random.normal(key, shape, dtype)


def _gather_on_mesh(table: Array, token: Array, num_rows: int) -> Array:
    """The lookup of a token id, already checked against `num_rows` (a bad one is
    `num_rows`), in a `table` sharded over explicit mesh axes or padded past its
    `num_rows` rows (`pad_vocabulary`): a bad id reads past the padding rows, as
    NaNs, and the row comes back whole (`row_sharding`)."""
    if table.shape[0] > num_rows:
        token = jnp.where(token < num_rows, token, table.shape[0])
    return gather_rows(
        table, token, negative_from_end=True, out_sharding=row_sharding(table)
    )


def _canonical_dtype(dtype: DTypeLike | None) -> jnp.dtype | None:
    return None if dtype is None else jnp.dtype(dtype)


class EmbeddingOptions(TypedDict, total=False):
    """The keyword arguments of [`Embedding`][eqx_embed.Embedding] besides the table
    and the key, as a `TypedDict`: what
    [`ReversibleEmbedding`][eqx_embed.ReversibleEmbedding] takes as
    `**embedding_options` and passes on to its lookup table unchanged. Each is
    documented on `Embedding.__init__`.

    **Raises:**

    - Nothing itself: it is a type. `Embedding` raises `ValueError` for bad values.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp
    import eqx_embed

    options: eqx_embed.EmbeddingOptions = dict(padding_idx=0, dtype=jnp.bfloat16)
    table = eqx_embed.ReversibleEmbedding(16, 8, key=jax.random.key(0), **options)
    assert table.embedding.padding_idx == 0
    assert table(3).dtype == jnp.bfloat16
    ```
    """

    dtype: DTypeLike | None
    param_dtype: DTypeLike | None
    init: Initializer
    padding_idx: int | None
    out_of_range: OutOfRange


class Embedding(eqx.Module):
    """A lookup table of token embeddings, one token per call.

    A drop-in for `equinox.nn.Embedding` (same constructor, same per-token call, same
    default initialisation) with what `flax.linen.Embed` adds: a compute `dtype`
    separate from the table's `param_dtype`, any initialiser, and `attend`. Bad token
    ids never read a valid-looking row (see `out_of_range`).

    Batch it with `jax.vmap`, over as many axes as you like:
    `jax.vmap(jax.vmap(embedding))(tokens)` for `tokens` of shape `(batch, seq)`.

    A table padded for a device mesh by
    [`pad_vocabulary`][eqx_embed.pad_vocabulary] has rows past `num_embeddings`,
    which nothing reads: every result is that of the unpadded table.

    **Raises:**

    - `ValueError` at construction, naming the argument: sizes that are not positive,
        a `weight` that is not 2-D or disagrees with the sizes given, a `padding_idx`
        outside the table, an unknown `out_of_range`, an `init` that returns the wrong
        shape. When called: an out-of-range token id under `out_of_range="error"`; a
        query of the wrong width (`attend`); `mask` without a `padding_idx`.
    - `jaxtyping.TypeCheckError` when called with anything but one integer token id (a
        batch: use `jax.vmap`; a float).

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    embedding = eqx_embed.Embedding(100, 16, key=jax.random.key(0))
    row = embedding(jnp.array(7))
    rows = jax.vmap(jax.vmap(embedding))(jnp.array([[1, 2, 3], [4, 5, 6]]))
    assert row.shape == (16,) and rows.shape == (2, 3, 16)
    assert jnp.isnan(embedding(jnp.array(100))).all()  # outside the table: NaNs
    ```
    """

    # A plain float array or a table kind (`_table_kind.py`), such as a quantized
    # table.
    weight: Table
    num_embeddings: int = eqx.field(static=True)
    embedding_size: int = eqx.field(static=True)
    dtype: jnp.dtype | None = eqx.field(static=True)
    padding_idx: int | None = eqx.field(static=True)
    out_of_range: OutOfRange = eqx.field(static=True)
    # Under auto mesh axes, whose arrays' types do not say how they are split: the
    # mesh axes that split the rows, as `shard_model` placed them (`None`: not
    # known), so that the fused losses walk each shard instead of gathering them.
    vocab_axes: tuple[str, ...] | None = eqx.field(static=True, default=None)

    def __init__(
        self,
        num_embeddings: int | None = None,
        embedding_size: int | None = None,
        weight: Float[ArrayLike, "num_embeddings embedding_size"] | None = None,
        *,
        dtype: DTypeLike | None = None,
        param_dtype: DTypeLike | None = None,
        init: Initializer = default_embedding_init,
        padding_idx: int | None = None,
        out_of_range: OutOfRange = "nan",
        key: PRNGKeyArray | None = None,
    ):
        """**Arguments:**

        Either a new table:

        - `num_embeddings`: the number of rows (the vocabulary size). Positive.
        - `embedding_size`: the width of each row. Positive.
        - `key`: a `jax.random.PRNGKey` for the initialiser. (Keyword only.)
        - `init`: a `jax.nn.initializers`-style callable `init(key, shape, dtype)`.
            Defaults to a standard normal, as `equinox.nn.Embedding`
            ([`default_embedding_init`][eqx_embed.default_embedding_init] says why
            and what to use for tied decoding).
        - `param_dtype`: the table's dtype. Defaults to float32 (float64 when JAX
            runs in 64-bit mode).

        Or an existing one:

        - `weight`: the table, of shape `(num_embeddings, embedding_size)`, a JAX or
            NumPy array (stored as a JAX array);
            `num_embeddings` and `embedding_size`, if given, must agree with it.
            `param_dtype`, if given, casts it.

        And for both:

        - `dtype`: the compute dtype of the rows returned (and of `attend`), applied
            after the lookup so the table is never cast as a whole. `None` returns the
            table's dtype. Unlike in `equinox.nn.Embedding`, this is not the table's
            dtype: use `param_dtype` for that.
        - `padding_idx`: a row that the lookup returns as zeros and that gets no
            gradient from the lookup, as in PyTorch. A new table also starts with it
            zeroed. Negative values count from the end.
        - `out_of_range`: what a token id outside `[-num_embeddings, num_embeddings)`
            gives: `"nan"` (the default, a row of NaNs, free under `jit`, as flax) or
            `"error"` (an error naming the id and the table size, under `jit` too).
            Ids in `[-num_embeddings, 0)` count from the end, as in flax and equinox
            (so Hugging Face's `-100` ignore label reads a real row of a table of 100
            rows or more: mask it). A one-row table is no exception, unlike flax's,
            which returns its row for every id.
        """
        check_policy(out_of_range)
        if weight is None:
            if num_embeddings is None or embedding_size is None or key is None:
                raise ValueError(
                    "Embedding needs either `weight=...` or all of `num_embeddings`, "
                    "`embedding_size` and `key`; got "
                    f"num_embeddings={num_embeddings!r}, "
                    f"embedding_size={embedding_size!r}, key={key!r}."
                )
            check_positive("num_embeddings", num_embeddings, integer=True)
            check_positive("embedding_size", embedding_size, integer=True)
            if param_dtype is None:
                param_dtype = default_float_dtype()
            weight = init(key, (num_embeddings, embedding_size), param_dtype)
            if weight.shape != (num_embeddings, embedding_size):
                raise ValueError(
                    f"init returned shape {weight.shape}, expected "
                    f"{(num_embeddings, embedding_size)}."
                )
            if padding_idx is not None:
                weight = weight.at[padding_idx].set(0)
        else:
            # A NumPy table is taken as equinox's and flax's embeddings take it.
            weight = jnp.asarray(weight)
            if weight.ndim != 2:
                raise ValueError(
                    "weight must have shape (num_embeddings, embedding_size), got "
                    f"shape {weight.shape}."
                )
            expected = (
                weight.shape[0] if num_embeddings is None else num_embeddings,
                weight.shape[1] if embedding_size is None else embedding_size,
            )
            if weight.shape != expected:
                raise ValueError(
                    f"weight has shape {weight.shape} but num_embeddings="
                    f"{num_embeddings}, embedding_size={embedding_size} were given."
                )
            if param_dtype is not None:
                weight = weight.astype(param_dtype)
        num_embeddings, embedding_size = weight.shape
        n = num_embeddings
        if padding_idx is not None and not -n <= padding_idx < n:
            raise ValueError(
                f"padding_idx must be in [{-num_embeddings}, {num_embeddings}), "
                f"got {padding_idx}."
            )
        self.weight = weight
        self.num_embeddings = num_embeddings
        self.embedding_size = embedding_size
        self.dtype = _canonical_dtype(dtype)
        self.padding_idx = None if padding_idx is None else padding_idx % num_embeddings
        self.out_of_range = out_of_range

    def _is_padding(
        self, token: Integer[ArrayLike, "*shape"], padding_idx: int
    ) -> Bool[Array, "*shape"]:
        token = jnp.asarray(token)
        return (token == padding_idx) | (token == padding_idx - self.num_embeddings)

    @jax.named_scope("eqx_embed.Embedding")
    @checked
    def __call__(
        self, token: TokenId, *, key: PRNGKeyArray | None = None
    ) -> Float[Array, " embedding_size"]:
        """**Arguments:**

        - `token`: one token id, a scalar integer. Use `jax.vmap` for many.
        - `key`: ignored; for compatibility with the rest of the Equinox API.

        **Returns:**

        The token's row, of shape `(embedding_size,)`, in the compute `dtype`. Zeros
        for `padding_idx`; NaNs (or an error) for an out-of-range id.
        """
        token = check_indices(
            token,
            size=self.num_embeddings,
            out_of_range=self.out_of_range,
            name="token id",
            negative_from_end=True,
        )
        weight = self.weight
        if isinstance(weight, TableKind):
            row = self._gather_kind(weight, token)
        elif self.num_embeddings == 1:
            # A one-row table needs no gather, only a select. Unlike flax's, whose
            # select returns the row for every id, ids other than 0 and -1 read NaNs
            # here, as they would from any table.
            row = jnp.where((token == 0) | (token == -1), weight[0], jnp.nan)
        elif self._is_padded() or on_explicit_mesh(weight):
            row = _gather_on_mesh(weight, token, self.num_embeddings)
        else:
            # A bad id comes back as `num_embeddings`, one past the table: NaNs.
            row = gather_rows(weight, token, negative_from_end=True)
        if self.padding_idx is not None:
            row = jnp.where(
                self._is_padding(token, self.padding_idx), jnp.zeros_like(row), row
            )
        return row if self.dtype is None else row.astype(self.dtype)

    @checked
    def attend(
        self, query: Float[Array, " embedding_size"]
    ) -> Float[Array, " num_embeddings"]:
        """The logits of `query` against every row: `weight @ query`, as
        `flax.linen.Embed.attend`.

        **Arguments:**

        - `query`: one vector of width `embedding_size`. Use `jax.vmap` for many.

        **Returns:**

        Shape `(num_embeddings,)`, in the compute `dtype` (accumulated in float32 when
        that is a low-precision dtype).
        """
        check_feature_size(
            query, self.embedding_size, name="query", owner="table's embedding_size"
        )
        logits = dot_with_table(self.weight, query, dtype=self.dtype)
        if self._is_padded():
            # Only a padded table has columns to drop: `first_columns` is a no-op on
            # any other, on a mesh or not.
            return first_columns(logits, self.num_embeddings)
        return logits

    def _gather_kind(self, table: TableKind, token: Array) -> Array:
        """The row of a checked `token` from `table`, this embedding's table kind,
        which reads ids in `[0, rows]`, `rows` as NaNs: negative ids are counted from
        the end here, and bad ids and those of padding rows become `rows`."""
        token = jnp.where(token < 0, token + self.num_embeddings, token)
        in_table = (token >= 0) & (token < self.num_embeddings)
        return table.gather(jnp.where(in_table, token, table.shape[0]))

    def _is_padded(self) -> bool:
        """Whether the table has rows past `num_embeddings` (`pad_vocabulary`)."""
        return self.weight.shape[0] > self.num_embeddings

    @checked
    def quantize(self, mode: str, *, group_size: int | None = None) -> "Embedding":
        """This embedding with its table weight-only quantized, as keras'
        `Embedding.quantize(mode)`: the same integers and scales, kept as a
        `QuantizedTable` in `weight`. The lookup dequantizes only the rows it reads;
        the decode and the fused losses one block of rows at a time (never the
        whole table).

        **Arguments:**

        - `mode`: `"int8"`: symmetric, one scale per row,
            `q = round(x * 127 / max|x|)` read back as `q / scale`. `"int4"`:
            asymmetric, in groups of `group_size` columns of a row, each with a
            scale and a zero point (keras' sub-channel int4), two values per byte.
        - `group_size`: int4's columns per group, a divisor of `embedding_size`
            (which must be even). Defaults to 128, as keras, or the whole row where
            the row is narrower.

        **Returns:**

        A new `Embedding`. Its scales have the table's dtype; its integers are
        int8 arrays, which `eqx.is_inexact_array` leaves out of gradients and
        optimiser state ([`unquantized_filter`][eqx_embed.unquantized_filter]
        freezes the scales too).

        **Raises:**

        - `ValueError`: an unknown `mode`, a `group_size` that does not divide the
            width (or given for int8), an odd width for int4, a table already
            quantized.
        """
        table = quantize_table(self.weight, mode, group_size=group_size, name="weight")
        return eqx.tree_at(lambda embedding: embedding.weight, self, table)

    @checked
    def mask(
        self, tokens: Integer[ArrayLike, "*shape"] | IntegerSequence
    ) -> Bool[Array, "*shape"]:
        """Keras' `mask_zero`: `True` where a token is real, `False` at `padding_idx`.

        **Arguments:**

        - `tokens`: token ids of any shape.

        **Returns:**

        A boolean array of the same shape.
        """
        if self.padding_idx is None:
            raise ValueError("Embedding.mask needs an Embedding with a padding_idx.")
        # Checked in their own dtype, so that a bad id never wraps onto padding_idx.
        tokens = check_indices(
            tokens,
            size=self.num_embeddings,
            out_of_range="nan",
            name="token id",
            negative_from_end=True,
        )
        return ~self._is_padding(tokens, self.padding_idx)
