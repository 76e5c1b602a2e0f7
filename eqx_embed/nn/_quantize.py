"""Weight-only quantized tables, as keras' `quantize("int8" | "int4")`: a table kind
(`_table_kind.py`) whose rows are integers and float scales, dequantized only where
they are read.

- `"int8"`: symmetric, one scale per row (an embedding's token, a linear's output
    channel): `q = round(x * scale)` in `[-127, 127]` with `scale = 127 / (max|x| +
    eps)`, read back as `q / scale`.
- `"int4"`: asymmetric, in sub-channel groups of `group_size` consecutive columns of
    a row: `scale = (max - min + eps) / 15` and a zero point per group,
    `q = round(x / scale) + zero` in `[-8, 7]`, read back as `(q - zero) * scale`;
    two values per byte (the first column in the low nibble), as keras packs them.

Keras' `eps` is its `backend.epsilon()`, `1e-7`. The scales have the table's dtype;
the integers (values and zero points) are int8 arrays, which
`eqx.is_inexact_array` leaves out of gradients and optimiser state.
"""

import equinox as eqx
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, DTypeLike, Float, Int8, Integer

from ._contracts import checked
from ._table_kind import TableKind

QUANTIZATION_MODES = ("int8", "int4")
"""The quantization modes there are."""

DEFAULT_GROUP_SIZE = 128
"""int4's default group size (keras'), or the whole row when it is narrower."""

_EPSILON = 1e-7  # keras.backend.epsilon()
_INT8_MAX = 127
_INT4_MIN, _INT4_MAX = -8, 7


def check_mode(mode: str) -> None:
    """Raises a `ValueError` naming `mode` unless it is one of ours."""
    if mode not in QUANTIZATION_MODES:
        raise ValueError(f"mode must be one of {QUANTIZATION_MODES}, got {mode!r}.")


def _group_size_for(width: int, group_size: int | None) -> int:
    if group_size is None:
        return min(DEFAULT_GROUP_SIZE, width)
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be an int or None, got {group_size!r}.")
    if group_size <= 0 or width % group_size:
        raise ValueError(
            f"group_size must be a positive divisor of the width ({width}), got "
            f"{group_size}."
        )
    return group_size


class QuantizedTable(TableKind):
    """A weight-only quantized table (or a stack of them, along leading axes): int8
    or int4 integers and float scales, read a block of rows at a time, as keras
    stores a quantized `Embedding`. What `Embedding.quantize` (and
    [`quantize`][eqx_embed.quantize], for every table and linear of a model) puts in
    a module's `weight`.

    - `"int8"`: `values` `(rows, width)`, `scale` `(rows,)`: a row is
        `values / scale`, with `scale = 127 / max|row|` (symmetric).
    - `"int4"`: `values` `(rows, width // 2)`, two per byte (the even column in the
        low nibble), `scale` and `zero` `(rows, groups)`: a group of columns is
        `(values - zero) * scale` (asymmetric, keras' sub-channel int4).

    The integers (`values`, `zero`) are int8 arrays, which `eqx.is_inexact_array`
    leaves out of gradients and optimiser state; the scales have the float table's
    dtype.

    **Raises:**

    - Nothing itself: `Embedding.quantize` raises `ValueError` for bad arguments.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    table = jax.random.normal(jax.random.key(0), (100, 16))
    embedding = eqx_embed.Embedding(weight=table).quantize("int4", group_size=8)
    weight = embedding.weight
    assert isinstance(weight, eqx_embed.QuantizedTable)
    assert weight.values.shape == (100, 8) and weight.scale.shape == (100, 2)
    rows = weight.rows(10, 5, jnp.float32)  # only these rows are read
    assert jnp.allclose(rows, weight.dequantize()[10:15])
    ```
    """

    values: Int8[Array, "*stack rows packed"]
    scale: Float[Array, "*stack rows"] | Float[Array, "*stack rows groups"]
    zero: Int8[Array, "*stack rows groups"] | None
    mode: str = eqx.field(static=True)
    width: int = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        """The float table's shape: `(*stack, rows, width)`."""
        return (*self.values.shape[:-1], self.width)

    @property
    def dtype(self) -> jnp.dtype:
        """The dtype of the rows read back: the scales'."""
        return self.scale.dtype

    @property
    def group_size(self) -> int | None:
        """int4's columns per group; `None` for int8."""
        return None if self.zero is None else self.width // self.zero.shape[-1]

    def _dequantized(self, values: Array, scale: Array, zero: Array | None) -> Array:
        """Rows read back, in the scales' dtype, from their integers."""
        if zero is None:
            return values.astype(scale.dtype) / scale[..., None]
        low = jnp.left_shift(values, 4) >> 4  # sign-extended low nibble
        high = values >> 4  # arithmetic shift: the sign-extended high nibble
        unpacked = jnp.stack([low, high], axis=-1).reshape(*values.shape[:-1], -1)
        groups = unpacked.reshape(*zero.shape, -1).astype(scale.dtype)
        rows = (groups - zero[..., None].astype(scale.dtype)) * scale[..., None]
        return rows.reshape(*values.shape[:-1], self.width)

    def _fields(self) -> tuple[Array, ...]:
        return (self.values, self.scale) + (() if self.zero is None else (self.zero,))

    @checked
    def rows(self, start: int | Array, size: int, dtype: DTypeLike) -> Array:
        """Rows `[start, start + size)`, `(size, width)`, in `dtype`, dequantized
        from those rows' integers and scales only (the fused losses' plug-in)."""
        block = [lax.dynamic_slice_in_dim(x, start, size) for x in self._fields()]
        zero = block[2] if self.zero is not None else None
        return self._dequantized(block[0], block[1], zero).astype(dtype)

    @checked
    def gather(self, ids: Integer[Array, "*shape"]) -> Array:
        """The rows of `ids` (each in `[0, rows]`), in the scales' dtype, dequantized
        from their integers only: NaNs for an id equal to `rows`."""
        # An id past the rows reads NaN scales, so a NaN row.
        values = self.values.at[ids].get(mode="fill", fill_value=0)
        scale = self.scale.at[ids].get(mode="fill", fill_value=jnp.nan)
        zero = None
        if self.zero is not None:
            zero = self.zero.at[ids].get(mode="fill", fill_value=0)
        return self._dequantized(values, scale, zero)

    @checked
    def dequantize(self) -> Array:
        """The whole float table, in the scales' dtype (for export)."""
        return self._dequantized(self.values, self.scale, self.zero)


def _stored(scale: np.ndarray, table: Array) -> np.ndarray:
    """`scale` rounded to `table`'s dtype, as it is stored (and so read back)."""
    return scale.astype(table.dtype).astype(scale.dtype)


def quantize_table(
    table: Float[ArrayLike, "*stack rows width"] | TableKind,
    mode: str,
    *,
    group_size: int | None = None,
    name: str = "table",
) -> QuantizedTable:
    """`table` (any float array of at least two axes: its last is the width,
    quantized per row) quantized as keras does, on the host in NumPy (as keras'
    `to_numpy=True`: the integers and the float32 scales are keras' bit for bit, and
    no device holds a float copy meanwhile). Not for use under `jit`.

    **Arguments:**

    - `table`: the float table.
    - `mode`: `"int8"` or `"int4"`.
    - `group_size`: int4's columns per group, a positive divisor of the (even)
        width. Defaults to 128 (keras'), or the whole row where it is narrower. Not
        for int8.
    - `name`: what the error messages call `table`.

    **Returns:**

    A [`QuantizedTable`][] whose scales have `table`'s dtype.
    """
    check_mode(mode)
    if isinstance(table, TableKind):
        raise ValueError(
            f"{name} must be a float array, got a {type(table).__name__} (already "
            "quantized or adapted): quantize the float weights."
        )
    table = jnp.asarray(table)
    if not jnp.issubdtype(table.dtype, jnp.floating) or table.ndim < 2:
        raise ValueError(
            f"{name} must be a float array of at least two axes, got "
            f"{table.dtype}{list(table.shape)}."
        )
    width = table.shape[-1]
    x = np.asarray(table, np.float32)
    if mode == "int8":
        if group_size is not None:
            raise ValueError(
                f"group_size is for mode 'int4' only, got group_size={group_size} "
                "with mode 'int8'."
            )
        scale = np.divide(_INT8_MAX, np.max(np.abs(x), axis=-1) + _EPSILON)
        scale = _stored(scale, table)
        values = np.clip(np.round(x * scale[..., None]), -_INT8_MAX, _INT8_MAX)
        return _table(table, values, scale, None, mode)
    if width % 2:
        raise ValueError(
            "mode 'int4' packs two values per byte: the width must be even, got "
            f"{width}."
        )
    size = _group_size_for(width, group_size)
    groups = x.reshape(*x.shape[:-1], width // size, size)
    low, high = np.min(groups, axis=-1), np.max(groups, axis=-1)
    scale = _stored(np.divide(high - low + _EPSILON, _INT4_MAX - _INT4_MIN), table)
    zero = np.clip(np.round(np.divide(-low, scale)) + _INT4_MIN, _INT4_MIN, _INT4_MAX)
    values = np.round(np.divide(groups, scale[..., None])) + zero[..., None]
    values = np.clip(values, _INT4_MIN, _INT4_MAX).astype(np.int8)
    values = values.reshape(*x.shape[:-1], width // 2, 2)
    packed = (values[..., 0] & 0x0F) | np.left_shift(values[..., 1], 4)
    return _table(table, packed, scale, zero, mode)


def _table(
    table: Array,
    values: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray | None,
    mode: str,
) -> QuantizedTable:
    """The quantized table's arrays, on `table`'s device."""
    arrays = [
        jnp.asarray(values.astype(np.int8)),
        jnp.asarray(scale, table.dtype),
        None if zero is None else jnp.asarray(zero.astype(np.int8)),
    ]
    return QuantizedTable(*arrays, mode=mode, width=table.shape[-1])
