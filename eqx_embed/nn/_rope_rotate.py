"""RoPE's rotation as a primitive whose batching rule leaves the layout alone.

Equinox's documented usage vmaps the module over heads,
`jax.vmap(rope, in_axes=1, out_axes=1)(x)` on `(seq, heads, head_dim)`. Written with
`reshape`/`stack` (or `concatenate`, or `pad`), the rotation is batched by rules that
first move the vmapped axis to the front: XLA then reads and writes `x` transposed,
in one loop but 2 to 3 times slower than the same rotation on `(seq, heads,
head_dim)`. `jax.custom_batching.custom_vmap` does not help: it too hands its rule
the vmapped axis at the front. A primitive's batching rule is told where the vmapped
axis is, and here it just records it: the batched rotation is the same rotation with
the sequence and feature axes renumbered, any other axis being rotated alike, so no
axis moves and the program is the one the direct call compiles to.

Differentiation: the rotation is linear in `x` (its transpose rotates by the opposite
angle) and bilinear in `x` and the tables, whose tangents go through plain `jax.numpy`.
"""

from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jaxtyping import Array, Float


def _rotate(
    x: Array,
    cos: Float[Array, "seq half_rotary_dim"],
    sin: Float[Array, "seq half_rotary_dim"],
    *,
    seq_axis: int,
    feature_axis: int,
    interleaved: bool,
) -> Array:
    """Rotates each pair `(a, b)` of features to `(a cos - b sin, b cos + a sin)`.

    The pairs are `(x[i], x[i + half])` in the half-split layout and
    `(x[2i], x[2i + 1])` in the interleaved one, along `feature_axis`; `cos` and
    `sin` are broadcast along every axis but `seq_axis` and `feature_axis`. Both
    results come from static slices (of a `(half, 2)` reshape where interleaved) and
    are joined back, which XLA fuses with the products into one loop over `x`.
    """
    last = x.ndim - 1
    if feature_axis != last:
        x = jnp.moveaxis(x, feature_axis, -1)
        seq_axis = seq_axis - (seq_axis > feature_axis)
    half = cos.shape[-1]
    shape = [1] * last + [half]
    shape[seq_axis] = cos.shape[0]
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    if interleaved:
        pairs = x.reshape(*x.shape[:-1], half, 2)
        first, second = pairs[..., 0], pairs[..., 1]
    else:
        first, second = x[..., :half], x[..., half:]
    halves = [first * cos - second * sin, second * cos + first * sin]
    if interleaved:
        rotated = jnp.stack(halves, axis=-1).reshape(x.shape)
    else:
        # Slices and a concatenate: on CPU, XLA's loop over them is faster than
        # over a (2, half) reshape and a stack (1.00x against 1.05x in bench_rope).
        rotated = jnp.concatenate(halves, axis=-1)
    return rotated if feature_axis == last else jnp.moveaxis(rotated, -1, feature_axis)


_rotate_p = Primitive("eqx_embed_rope_rotate")
# Eagerly, op by op, as the jax.numpy code it replaces.
_rotate_p.def_impl(_rotate)
_rotate_p.def_abstract_eval(
    lambda x, cos, sin, **params: jax.core.ShapedArray(x.shape, x.dtype)
)
mlir.register_lowering(_rotate_p, mlir.lower_fun(_rotate, multiple_results=False))


def _batch(arrays, dims, *, seq_axis, feature_axis, interleaved):
    x, cos, sin = arrays
    x_dim, cos_dim, sin_dim = dims
    if cos_dim is not None or sin_dim is not None or x_dim is None:
        # Tables per example (positions vmapped): the general rules of jax.numpy.
        axes = dict(seq_axis=seq_axis, feature_axis=feature_axis)
        rotate = partial(_rotate, **axes, interleaved=interleaved)
        return jax.vmap(rotate, in_axes=dims)(x, cos, sin), 0

    def renumber(axis: int) -> int:
        return axis + (axis >= x_dim)

    rotated = _rotate_p.bind(
        x,
        cos,
        sin,
        seq_axis=renumber(seq_axis),
        feature_axis=renumber(feature_axis),
        interleaved=interleaved,
    )
    return rotated, x_dim


def _jvp(primals, tangents, **params):
    x, cos, sin = primals
    x_dot, cos_dot, sin_dot = tangents
    rotated = _rotate_p.bind(x, cos, sin, **params)
    terms = []
    if type(x_dot) is not ad.Zero:
        terms.append(_rotate_p.bind(x_dot, cos, sin, **params))
    for table_dot, as_cos in [(cos_dot, True), (sin_dot, False)]:
        if type(table_dot) is not ad.Zero:
            zeros = jnp.zeros_like(table_dot)
            tables = (table_dot, zeros) if as_cos else (zeros, table_dot)
            terms.append(_rotate(x, *tables, **params))
    # JAX calls this with at least one tangent that is not a symbolic zero.
    return rotated, sum(terms[1:], terms[0])


def _transpose(cotangent, x, cos, sin, **params):
    # Only `x` is linear here (the tables' tangents went through jax.numpy).
    if type(cotangent) is ad.Zero:
        return ad.Zero(x.aval), None, None
    return _rotate_p.bind(cotangent, cos, -sin, **params), None, None


batching.primitive_batchers[_rotate_p] = _batch
ad.primitive_jvps[_rotate_p] = _jvp
ad.primitive_transposes[_rotate_p] = _transpose


def rotate(
    x: Float[Array, "seq *heads rotary_dim"],
    cos: Float[Array, "seq half_rotary_dim"],
    sin: Float[Array, "seq half_rotary_dim"],
    interleaved: bool,
) -> Float[Array, "seq *heads rotary_dim"]:
    """Rotates `x`'s feature pairs (its last axis) by the angles of its rows (its
    first axis); every axis between is rotated alike."""
    return _rotate_p.bind(
        x, cos, sin, seq_axis=0, feature_axis=x.ndim - 1, interleaved=interleaved
    )
