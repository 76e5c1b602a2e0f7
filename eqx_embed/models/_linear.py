import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..nn._contracts import checked
from ..nn._quantize import quantize_table
from ..nn._table_kind import Table, dot_with_table

_lecun_normal = jax.nn.initializers.variance_scaling(
    1.0, "fan_in", "normal", in_axis=1, out_axis=0
)


class Linear(eqx.Module):
    """An affine map over the last axis, `x @ weight.T + bias`, with the weight stored
    as `(out_features, in_features)` like `equinox.nn.Linear` and PyTorch, and a
    compute dtype separate from the weight's (low-precision products accumulate in
    float32). Its weight may be quantized (`quantize`)."""

    # A float array, or a table kind of that shape (a quantized weight).
    weight: Table
    bias: Float[Array, " out_features"] | None
    dtype: jnp.dtype = eqx.field(static=True)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        dtype: jnp.dtype,
        param_dtype: jnp.dtype,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `in_features`, `out_features`: the widths of the input and output.
        - `use_bias`: whether to add a bias (which starts at zero).
        - `dtype`: the compute dtype.
        - `param_dtype`: the dtype of the weight, drawn from a normal of standard
            deviation `1 / sqrt(in_features)`.
        - `key`: a `jax.random.PRNGKey` for the weight.
        """
        self.weight = _lecun_normal(key, (out_features, in_features), param_dtype)
        self.bias = jnp.zeros((out_features,), param_dtype) if use_bias else None
        self.dtype = dtype

    @checked
    def __call__(
        self, x: Float[Array, "*batch in_features"]
    ) -> Float[Array, "*batch out_features"]:
        """**Arguments:**

        - `x`: inputs whose last axis has width `in_features`.

        **Returns:**

        `x @ weight.T + bias` in the compute dtype.
        """
        output = dot_with_table(self.weight, x, dtype=self.dtype)
        if self.bias is not None:
            output = output + self.bias.astype(self.dtype)
        return output

    def quantize(self, mode: str, *, group_size: int | None = None) -> "Linear":
        """This layer with its weight quantized per output channel (the bias stays
        float); see [`Embedding.quantize`][eqx_embed.Embedding.quantize] for the
        arguments and the formulas. A weight stacked along leading axes (a
        `TransformerLM`'s layers) is quantized per layer and channel."""
        return eqx.tree_at(
            lambda linear: linear.weight,
            self,
            quantize_table(self.weight, mode, group_size=group_size, name="weight"),
        )
