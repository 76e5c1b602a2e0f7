"""Weight-only quantization of whole models: every embedding table and every linear
weight of a pytree (a `TransformerLM`, a block, one module) replaced by a
`QuantizedTable` (`nn/_quantize.py`), and back."""

from typing import Any

import equinox as eqx
import jax

from ..nn._contracts import checked
from ..nn._embedding import Embedding
from ..nn._quantize import QuantizedTable, check_mode
from ._linear import Linear


def _is_quantizable(node: Any) -> bool:
    return isinstance(node, (Embedding, Linear))


@checked
def quantize(tree: Any, mode: str, *, group_size: int | None = None) -> Any:
    """Quantizes the weights of every embedding table and linear layer in `tree`, as
    `Embedding.quantize` and `Linear.quantize` do one: the token tables (lookup and
    decode, tied or not) and every projection of a `TransformerLM`, per row (a
    token, an output channel). Norms, biases and position tables stay as they are.

    **Arguments:**

    - `tree`: a `TransformerLM`, or any pytree of modules.
    - `mode`: `"int8"` (symmetric, one scale per row) or `"int4"` (sub-channel
        groups with a zero point, as keras).
    - `group_size`: int4's columns per group; see
        [`Embedding.quantize`][eqx_embed.Embedding.quantize].

    **Returns:**

    `tree` with its weights quantized; tables already quantized are refused.

    **Raises:**

    - `ValueError`: an unknown `mode`, a `group_size` that does not divide a width
        (or given for int8), a weight already quantized.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=2, max_position_embeddings=16,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    small = eqx_embed.quantize(model, "int8")
    logits = small(jnp.arange(8))
    # The integers are not float arrays: no gradient, no optimiser state.
    params, static = eqx.partition(small, eqx.is_inexact_array)
    ```
    """
    check_mode(mode)
    return jax.tree.map(
        lambda node: (
            node.quantize(mode, group_size=group_size)
            if _is_quantizable(node)
            else node
        ),
        tree,
        is_leaf=_is_quantizable,
    )


def _is_quantized(node: Any) -> bool:
    return isinstance(node, QuantizedTable)


def has_quantized_weights(tree: Any) -> bool:
    """Whether `tree` holds a quantized weight."""
    nodes = jax.tree.leaves(tree, is_leaf=_is_quantized)
    return any(_is_quantized(node) for node in nodes)


@checked
def dequantize(tree: Any) -> Any:
    """`tree` with every quantized weight replaced by its float array (the
    integers times their scales): what a Hugging Face export writes.

    **Arguments:**

    - `tree`: any pytree, quantized with [`quantize`][eqx_embed.quantize] or not.

    **Returns:**

    `tree` with float weights in the scales' dtype. Quantized then dequantized,
    a weight keeps its quantization error: this does not restore the original.

    **Raises:**

    - Nothing of its own.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    table = jax.random.normal(jax.random.key(0), (100, 16))
    quantized = eqx_embed.Embedding(weight=table).quantize("int8")
    plain = eqx_embed.dequantize(quantized)
    assert plain.weight.shape == (100, 16)
    assert jnp.allclose(plain.weight, table, atol=jnp.abs(table).max() / 127)
    ```
    """
    return jax.tree.map(
        lambda node: node.dequantize() if _is_quantized(node) else node,
        tree,
        is_leaf=_is_quantized,
    )


@checked
def unquantized_filter(tree: Any) -> Any:
    """A filter for `eqx.partition` and `eqx.filter_grad`: `True` for the float
    arrays of `tree` outside its quantized weights (norms, biases, adapters),
    `False` for every leaf of a quantized weight, its float scales included.

    `eqx.is_inexact_array` already leaves a quantized weight's integers out (they
    are int8): use it to train the scales too, and this to freeze them.

    **Arguments:**

    - `tree`: a pytree, such as a quantized `TransformerLM`.

    **Returns:**

    A pytree of booleans, a prefix of `tree`: `eqx.partition(tree,
    unquantized_filter(tree))`.

    **Raises:**

    - Nothing of its own.

    **Example:**

    ```python
    import equinox as eqx
    import jax

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, max_position_embeddings=16,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    model = eqx_embed.quantize(model, "int8")
    trainable, frozen = eqx.partition(model, eqx_embed.unquantized_filter(model))
    # Only the norms are left to train (two per layer, stacked, and the final one).
    assert len(jax.tree.leaves(trainable)) == 3
    assert trainable.embedding.embedding.weight.scale is None
    ```
    """
    return jax.tree.map(
        lambda node: (
            jax.tree.map(lambda _: False, node)
            if _is_quantized(node)
            else eqx.is_inexact_array(node)
        ),
        tree,
        is_leaf=_is_quantized,
    )
