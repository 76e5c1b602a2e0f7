"""Table kinds: what an embedding table is stored as, and the one interface through
which the lookup, the decode, the fused losses and `TransformerLM` read it.

A table is either a plain `(rows, width)` float array, the plain kind (what
`Embedding.weight` has always been), or a [`TableKind`][]: an `eqx.Module` whose
leaves are arrays (a quantized table: integers and float scales; an adapted one: a
base and low-rank factors). `Embedding.weight` holds either. Every reader goes
through the functions below, which hand a plain array to the code that was there
before (same results, same programs) and a kind to its methods.

**Adding a table kind.** Subclass [`TableKind`][] and give it:

- `shape`: `(rows, width)`, the shape of the float table it stands for;
- `dtype`: the float dtype of the rows it gives back (the dequantized dtype);
- `rows(start, size, dtype)`: rows `[start, start + size)` as a `(size, width)`
    array of `dtype`, the kernel's plug-in ([`table_rows`][]'s contract: `start` may
    be traced, it is called once per block inside the losses' loops, so it must read
    only that block: never the whole table);
- `gather(ids)`: the rows of integer `ids` of any shape, `ids.shape + (width,)` in
    `dtype`; an id equal to `rows` (how the lookup marks a bad one) gives NaNs;
- `dequantize()`: the whole table as a float array, for export only (it is the copy
    that the other methods never make).

The kind itself, the module, is the pytree passed to the losses' kernel, and its
`rows` method, unbound (`type(kind).rows`), is the kernel's static
[`TableRows`][] function. The decode of one hidden state is built from `rows` too
([`dot_with_table`][]), block by block. The fused losses differentiate a kind's float
leaves through `rows` (the integers of a quantized kind get none, as
`eqx.is_inexact_array` leaves them out).
"""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, DTypeLike, Float, Integer

from ._loss_kernel import (
    DEFAULT_BLOCK_SIZE,
    TableRows,
    num_blocks,
    shifted_start,
    table_rows,
)
from ._numerics import dot_with_rows


class TableKind(eqx.Module):
    """The interface of a table that is not a plain float array, such as a
    [`QuantizedTable`][eqx_embed.QuantizedTable]: an `Embedding` holds one as its
    `weight`, its lookup reads rows through `gather`, and the decode and the fused
    losses read blocks of rows through `rows`, never the whole float table. A new
    kind subclasses it and defines these members (the module `_table_kind.py` says
    how it plugs into the losses' kernel). Abstract: see its subclasses.

    **Raises:**

    - `NotImplementedError`: a member the subclass does not define.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    embedding = eqx_embed.Embedding(64, 32, key=jax.random.key(0))
    kind = embedding.quantize("int8").weight
    assert isinstance(kind, eqx_embed.TableKind) and kind.shape == (64, 32)
    table = kind.dequantize()
    assert jnp.array_equal(kind.rows(8, 4, jnp.float32), table[8:12])
    assert jnp.array_equal(kind.gather(jnp.array([3, 5])), table[jnp.array([3, 5])])
    ```
    """

    @property
    def shape(self) -> tuple[int, ...]:
        """`(rows, width)`, the shape of the float table this kind stands for."""
        raise NotImplementedError

    @property
    def dtype(self) -> jnp.dtype:
        """The float dtype of the rows it gives back."""
        raise NotImplementedError

    def rows(self, start: int | Array, size: int, dtype: DTypeLike) -> Array:
        """Rows `[start, start + size)`, `(size, width)`, in `dtype`: the kernel's
        plug-in (`type(kind).rows` has the signature of the losses' `TableRows`)."""
        raise NotImplementedError

    def gather(self, ids: Integer[Array, "*shape"]) -> Float[Array, "*shape width"]:
        """The rows of `ids` in `dtype`, NaNs for an id equal to `rows`."""
        raise NotImplementedError

    def dequantize(self) -> Float[Array, "rows width"]:
        """The whole table as a float array of `dtype` (for export)."""
        raise NotImplementedError


Table = Float[Array, "num_embeddings embedding_size"] | TableKind
"""What `Embedding.weight` holds: a plain float array or a [`TableKind`][]."""


def is_plain(table: Any) -> bool:
    """Whether `table` is of the plain kind, a float array (not a [`TableKind`][]).
    Type checkers narrow on `isinstance(table, TableKind)`, which callers that need
    the narrowing use instead."""
    return not isinstance(table, TableKind)


def rows_function(table: Table) -> TableRows:
    """The kernel's static plug-in reading `table`'s rows."""
    return type(table).rows if isinstance(table, TableKind) else table_rows


def as_array(table: Table) -> Array:
    """`table` as one float array: itself when plain, else dequantized whole (for
    export: the copy that every other reader avoids)."""
    return table.dequantize() if isinstance(table, TableKind) else table


def dot_with_table(
    table: Table,
    x: Float[Array, "*batch width"],
    *,
    dtype: DTypeLike | None,
    soft_cap: float | None = None,
) -> Float[Array, "*batch rows"]:
    """[`dot_with_rows`][] of `table`'s rows with `x`. For a kind, the rows are read
    [`DEFAULT_BLOCK_SIZE`][] at a time, so that no float copy of the whole table is
    made; the logits are written block by block (the last block, shifted back to end
    at the last row, first: the block before overwrites the rows they share, with
    the same values)."""
    if not isinstance(table, TableKind):
        return dot_with_rows(table, x, dtype=dtype, soft_cap=soft_cap)
    length = table.shape[0]
    size = min(DEFAULT_BLOCK_SIZE, length)
    dtype = jnp.result_type(table.dtype, x) if dtype is None else jnp.dtype(dtype)
    logits = jnp.zeros((*x.shape[:-1], length), dtype)

    def step(logits, index):
        _, start = shifted_start(index, size, length)
        rows = table.rows(start, size, dtype)
        block = dot_with_rows(rows, x, dtype=dtype, soft_cap=soft_cap)
        return lax.dynamic_update_slice_in_dim(logits, block, start, -1), None

    logits, _ = lax.scan(
        step, logits, jnp.arange(num_blocks(length, size)), reverse=True
    )
    return logits


def table_dtype(table: Table) -> jnp.dtype:
    """The dtype of `table`'s rows (its dequantized dtype, for a kind)."""
    return jnp.dtype(table.dtype)


def promoted_dtype(table: Table, x: Array) -> jnp.dtype:
    """The promoted dtype of `table`'s rows and `x`."""
    return jnp.result_type(table_dtype(table), x)
