"""Low-rank adaptation (LoRA): `LowRank`, the trainable update `scale * up @ down` of a
frozen `(rows, columns)` weight, read a block of rows or a few rows at a time.

One convention serves every weight, the way it is stored here: a linear's
`(out_features, in_features)` weight (PEFT's `lora_B` is `up`, its `lora_A` is
`down`) and an embedding table's `(vocabulary, width)` (PEFT's `lora_embedding_A` is
`up.T`, its `lora_embedding_B` is `down.T`). A table's rows are then
`W[ids] + scale * up[ids] @ down`: the adapted table is never built.
"""

from typing import cast

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, Integer, PRNGKeyArray

from ._contracts import check_positive
from ._loss_kernel import Blocking, add_rows_gradient, slice_in_place
from ._numerics import accumulation_dtype
from ._table_kind import (
    Table,
    TableKind,
    as_array,
    rows_function,
    table_dtype,
)


def check_rank(rank: int, rows: int, columns: int, *, name: str = "rank") -> None:
    """Raises a `ValueError` naming `name` unless `rank` is a positive integer at most
    `min(rows, columns)`, the rank of a `(rows, columns)` weight."""
    check_positive(name, rank, integer=True)
    if rank > min(rows, columns):
        raise ValueError(
            f"{name} must be at most {min(rows, columns)} (the smaller side of a "
            f"{rows} x {columns} weight), got {rank}."
        )


def _product(left: Array, right: Array, dtype: DTypeLike) -> Array:
    """`left @ right` in `dtype`, accumulated in float32 for low precision."""
    return jnp.matmul(
        left.astype(dtype),
        right.astype(dtype),
        preferred_element_type=accumulation_dtype(dtype),
    )


class LowRank(eqx.Module):
    """The LoRA update of a `(rows, columns)` weight: `scale * up @ down`, with
    `scale = alpha / rank`. Its two arrays are the only trainable ones of an adapted
    model (see `lora_filter`). A leading axis (a model's stacked layers) may come
    before each array's two."""

    up: Float[Array, "*layers rows rank"]
    down: Float[Array, "*layers rank columns"]
    alpha: float = eqx.field(static=True)
    dropout: float = eqx.field(static=True)

    @property
    def rank(self) -> int:
        """The rank of the update."""
        return self.down.shape[-2]

    @property
    def scale(self) -> float:
        """`alpha / rank`, what `up @ down` is multiplied by."""
        return self.alpha / self.rank

    def delta(self) -> Array:
        """The whole update, `scale * up @ down`, in the arrays' dtype: for merging
        only (the forward passes never build it)."""
        product = jnp.matmul(
            self.up, self.down, preferred_element_type=accumulation_dtype(self.up.dtype)
        )
        return (self.scale * product).astype(self.up.dtype)

    def block_rows(self, start: int | Array, size: int, dtype: DTypeLike) -> Array:
        """Rows `[start, start + size)` of the update, in `dtype`."""
        up = slice_in_place(
            lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), self.up
        )
        return self.scale * jnp.matmul(
            up.astype(dtype),
            self.down.astype(dtype),
            preferred_element_type=accumulation_dtype(dtype),
        )

    def apply(
        self,
        x: Float[Array, "*batch columns"],
        dtype: DTypeLike,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch rows"]:
        """`scale * x @ (up @ down).T` as two thin products (`x @ down.T` first), in
        `dtype`; with `key` and a positive `dropout`, `x` is dropped out first
        (PEFT's `lora_dropout`)."""
        if key is not None and self.dropout > 0:
            keep = jax.random.bernoulli(key, 1 - self.dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.dropout), 0)
        accumulate = accumulation_dtype(dtype)
        inner = jnp.matmul(
            x.astype(dtype),
            self.down.astype(dtype).T,
            preferred_element_type=accumulate,
        )
        out = jnp.matmul(
            inner.astype(dtype),
            self.up.astype(dtype).T,
            preferred_element_type=accumulate,
        )
        return (self.scale * out).astype(dtype)


def low_rank(
    rows: int,
    columns: int,
    *,
    rank: int,
    alpha: float | int,
    dropout: float | int,
    dtype: DTypeLike,
    table: bool,
    key: PRNGKeyArray,
    layers: tuple[int, ...] = (),
) -> LowRank:
    """A fresh `LowRank` whose update starts at zero, as PEFT's: `up` (PEFT's `lora_B`,
    or a table's `lora_embedding_A`) is zeros and `down` is drawn, uniform in
    `±1/sqrt(columns)` for a linear (PEFT's Kaiming draw of `lora_A`), standard normal
    for a `table` (as PEFT draws `lora_embedding_B`). `layers` are leading axes.

    **Raises:**

    - `ValueError`: a `rank` that is not a positive integer at most
        `min(rows, columns)`, a non-positive `alpha`, a `dropout` outside `[0, 1)`.
    """
    check_rank(rank, rows, columns)
    check_positive("alpha", alpha)
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}.")
    up = jnp.zeros((*layers, rows, rank), dtype)
    down_shape = (*layers, rank, columns)
    if table:
        down = jax.random.normal(key, down_shape, dtype)
    else:
        bound = columns**-0.5
        down = jax.random.uniform(key, down_shape, dtype, -bound, bound)
    return LowRank(up, down, float(alpha), float(dropout))


class LoRATable(TableKind):
    """An embedding table with a LoRA update, a table kind: its rows are
    `base[ids] + scale * up[ids] @ down`, read a block or a few rows at a time,
    never as a whole adapted table. `base` is a plain float array or another table
    kind (a quantized one: QLoRA), frozen; tied, the decode and the fused losses
    read the same adapted rows."""

    base: Table
    adapter: LowRank

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.base.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return table_dtype(self.base)

    def rows(self, start: int | Array, size: int, dtype: DTypeLike) -> Array:
        base = rows_function(self.base)(self.base, start, size, jnp.dtype(dtype))
        return base + self.adapter.block_rows(start, size, dtype).astype(dtype)

    def gather(self, ids: Integer[Array, "*shape"]) -> Float[Array, "*shape width"]:
        if not isinstance(self.base, TableKind):
            base = jnp.take(self.base, ids, axis=0, mode="fill", fill_value=jnp.nan)
        else:
            base = self.base.gather(ids)
        up = jnp.take(self.adapter.up, ids, axis=0, mode="fill", fill_value=0)
        delta = self.adapter.scale * _product(up, self.adapter.down, self.dtype)
        return base.astype(self.dtype) + delta.astype(self.dtype)

    def dequantize(self) -> Float[Array, "rows width"]:
        return as_array(self.base) + self.adapter.delta().astype(self.dtype)

    def add_rows_gradient(
        self, gradient: "LoRATable", start: Array, d_rows: Array, blocking: Blocking
    ) -> "LoRATable":
        """The kernel's hook (`_loss_kernel.add_rows_gradient`): a block's cotangent
        `d_rows` reaches `up`'s rows of the block, `scale * d_rows @ down.T`
        (written), and `down`, `scale * up[block].T @ d_rows` (added); a plain base,
        its rows (written), a kind's base, through its own hook."""
        size, dtype = d_rows.shape[0], blocking.compute_dtype
        adapter, scale = self.adapter, self.adapter.scale
        d_rows = d_rows.astype(dtype)
        d_up = scale * _product(d_rows, adapter.down.T, dtype)
        up = slice_in_place(
            lambda x: jax.lax.dynamic_slice_in_dim(x, start, size), adapter.up
        )
        d_down = scale * _product(up.T, d_rows, dtype)
        grads = gradient.adapter
        new_adapter = LowRank(
            jax.lax.dynamic_update_slice_in_dim(
                grads.up, d_up.astype(grads.up.dtype), start, 0
            ),
            grads.down + d_down.astype(grads.down.dtype),
            adapter.alpha,
            adapter.dropout,
        )
        if not isinstance(self.base, TableKind):
            plain = cast(Array, gradient.base)  # a plain base's gradient: an array
            base = jax.lax.dynamic_update_slice_in_dim(
                plain, d_rows.astype(plain.dtype), start, 0
            )
        else:
            rows = blocking._replace(table_rows=rows_function(self.base))
            base = add_rows_gradient(self.base, gradient.base, start, d_rows, rows)
        return LoRATable(base, new_adapter)
