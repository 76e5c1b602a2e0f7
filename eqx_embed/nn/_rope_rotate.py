"""RoPE's rotation: `RopeRotation`, the cos and sin rows of one sequence of positions,
applied to every tensor rotated at those positions.

The rotation is plain `jax.numpy` (static slices, products and a concatenate, or a
stack where interleaved), which XLA fuses into one loop over `x`, and which every JAX
transformation and platform handles with its own rules. Vmapped over heads as equinox
documents (`jax.vmap(rope, in_axes=1, out_axes=1)`), JAX's batching rules move the
vmapped axis to the front and back; XLA folds those transposes into the same fused
loop, so the queries are still read once and the result written once, with no
transposed copy in between.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ._contracts import check_feature_size, checked
from ._numerics import accumulation_dtype


def rotate(
    x: Float[Array, "seq *heads rotary_dim"],
    cos: Float[Array, "seq half_rotary_dim"],
    sin: Float[Array, "seq half_rotary_dim"],
    interleaved: bool,
) -> Float[Array, "seq *heads rotary_dim"]:
    """Rotates each pair `(a, b)` of `x`'s features (its last axis) to
    `(a cos - b sin, b cos + a sin)`, by the angles of its row (its first axis);
    every axis between is rotated alike.

    The pairs are `(x[i], x[i + half])` in the half-split layout and
    `(x[2i], x[2i + 1])` in the interleaved one. `cos`, `sin` and `x` have one dtype.
    """
    half = cos.shape[-1]
    rows = (cos.shape[0],) + (1,) * (x.ndim - 2) + (half,)
    cos, sin = cos.reshape(rows), sin.reshape(rows)
    if interleaved:
        pairs = x.reshape(*x.shape[:-1], half, 2)
        first, second = pairs[..., 0], pairs[..., 1]
    else:
        first, second = x[..., :half], x[..., half:]
    halves = [first * cos - second * sin, second * cos + first * sin]
    if interleaved:
        return jnp.stack(halves, axis=-1).reshape(x.shape)
    # Slices and a concatenate: on CPU, XLA's loop over them is faster than over a
    # (2, half) reshape and a stack.
    return jnp.concatenate(halves, axis=-1)


class RopeRotation(eqx.Module):
    """RoPE's cos and sin rows for one sequence of positions, from
    [`RotaryPositionalEmbedding.rotation`][eqx_embed.RotaryPositionalEmbedding.rotation].
    Apply it to every tensor rotated at those positions (queries and keys, in every
    layer). It is built per call, never stored in a model, so its float rows are
    never trained.

    **Raises:**

    - `ValueError`: an `x` whose first axis is not the rotation's number of positions,
        or whose last axis is not `embedding_size`.
    - `jaxtyping.TypeCheckError`: an integer `x`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    rope = eqx_embed.RotaryPositionalEmbedding(8, max_seq_len=32)
    queries, keys = jax.random.normal(jax.random.key(0), (2, 10, 4, 8))
    rotation = rope.rotation(10)  # positions checked and gathered once
    assert jnp.array_equal(rotation(queries), rope(queries))
    assert jnp.array_equal(rotation(keys), rope(keys))
    ```
    """

    cos: Float[Array, "seq half_rotary_dim"]
    sin: Float[Array, "seq half_rotary_dim"]
    embedding_size: int = eqx.field(static=True)
    interleaved: bool = eqx.field(static=True)

    @jax.named_scope("eqx_embed.RopeRotation")
    @checked
    def __call__(
        self, x: Float[Array, "seq *heads embedding_size"]
    ) -> Float[Array, "seq *heads embedding_size"]:
        """**Arguments:**

        - `x`: as for
            [`RotaryPositionalEmbedding.__call__`][eqx_embed.RotaryPositionalEmbedding.__call__],
            with as many rows as the rotation has positions.

        **Returns:**

        The rotated `x`, same shape and dtype; the features past `rotary_dim` pass
        through unchanged.
        """
        check_feature_size(
            x, self.embedding_size, name="x", owner="rotation's embedding_size"
        )
        if x.shape[0] != self.cos.shape[0]:
            raise ValueError(
                f"x has {x.shape[0]} rows but the rotation was built for "
                f"{self.cos.shape[0]} positions."
            )
        rotary_dim = 2 * self.cos.shape[-1]
        compute = accumulation_dtype(x.dtype)
        cos, sin = self.cos.astype(compute), self.sin.astype(compute)
        rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
        rotated = rotate(rotated.astype(compute), cos, sin, self.interleaved)
        rotated = rotated.astype(x.dtype)
        if passed.shape[-1]:
            rotated = jnp.concatenate([rotated, passed], axis=-1)
        return rotated
