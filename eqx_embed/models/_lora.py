"""LoRA on a `TransformerLM`: `add_lora` puts a `LowRank` update beside the weights
chosen by name, `merge_lora` folds them back into plain weights, and `lora_filter`
picks out exactly the adapters' arrays for `eqx.partition` and optax.

A target is a module's dotted path in the model (`"blocks.attention.query_proj"`) or
its end (`"query_proj"`, `"attention.query_proj"`, `"mlp.down"`), as PEFT's
`target_modules` are: the linears of the blocks (`query_proj`, `key_proj`,
`value_proj`, `output_proj`, and the MLP's `gate`, `up`, `down`), and the tables:
`embedding` (the lookup; tied, the decode reads the same adapted table) and, for an
untied model, `reverse_embedding` (the decode's own table). Llama's names as PEFT
takes them (`q_proj`, `k_proj`, `v_proj`, `o_proj`, `gate_proj`, `up_proj`,
`down_proj`, `embed_tokens`, `lm_head`) name the same modules.
"""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, DTypeLike, Float, PRNGKeyArray

from ..nn._contracts import checked
from ..nn._lora import LoRATable, LowRank, low_rank
from ..nn._table_kind import as_array, is_plain
from ._linear import Linear
from ._transformer import TransformerLM
from ._transformer_parts import make_embedding


class LoRALinear(eqx.Module):
    """A frozen linear plus a trainable low-rank update: `base(x) + scale * x @ (up @
    down).T`, PEFT's `lora.Linear`."""

    base: Linear
    adapter: LowRank

    @checked
    def __call__(
        self, x: Float[Array, "*batch in_features"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "*batch out_features"]:
        """**Arguments:**

        - `x`: inputs whose last axis has width `in_features`.
        - `key`: a `jax.random.PRNGKey` for the adapter's dropout (none without).

        **Returns:**

        The adapted linear's output, in the base's compute dtype.
        """
        return self.base(x) + self.adapter.apply(x, self.base.dtype, key)


def weight_shape(linear: Any) -> tuple[int, ...]:
    """The shape of a linear's weight, `(*layers, out_features, in_features)`,
    under any adapter (and quantized or not)."""
    if isinstance(linear, LoRALinear):
        return weight_shape(linear.base)
    return tuple(linear.weight.shape)


def _is_linear(node: Any) -> bool:
    return isinstance(node, Linear | LoRALinear)


def linear_paths(model: Any) -> dict[str, Any]:
    """The model's linears (plain or adapted) by dotted path."""
    nodes, _ = jax.tree_util.tree_flatten_with_path(model, is_leaf=_is_linear)
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): node
        for path, node in nodes
        if _is_linear(node)
    }


# PEFT's `target_modules` as Llama-style checkpoints name the modules (and most
# families copy them): accepted as targets too.
PEFT_NAMES = {
    "q_proj": "query_proj",
    "k_proj": "key_proj",
    "v_proj": "value_proj",
    "o_proj": "output_proj",
    "gate_proj": "mlp.gate",
    "up_proj": "mlp.up",
    "down_proj": "mlp.down",
    "embed_tokens": "embedding.embedding",
    "lm_head": "reverse_embedding",
}


def matches(target: str, path: str) -> bool:
    """Whether `target` (or the module it names in `PEFT_NAMES`) names the module at
    `path`: the whole path or its end, at a dot."""
    target = PEFT_NAMES.get(target, target)
    return path == target or path.endswith("." + target)


def chosen_paths(targets: Sequence[str], paths: Sequence[str]) -> list[str]:
    """The `paths` that some target names. Raises a `ValueError` naming `targets` for
    a target that names none, or for no targets at all."""
    if isinstance(targets, str) or not targets:
        raise ValueError(
            f"targets must be a non-empty list of module names, got {targets!r}."
        )
    for target in targets:
        if not any(matches(target, path) for path in paths):
            raise ValueError(
                f"targets: {target!r} matches no module; expected the end of one of "
                f"{sorted(paths)}."
            )
    return [path for path in paths if any(matches(t, path) for t in targets)]


def _get(tree: Any, path: str) -> Any:
    for name in path.split("."):
        tree = getattr(tree, name)
    return tree


def replace_at(model: Any, replacements: dict[str, Any]) -> Any:
    """`model` with the modules at the dotted paths replaced."""
    if not replacements:
        return model
    paths = list(replacements)
    return eqx.tree_at(
        lambda m: [_get(m, path) for path in paths],
        model,
        [replacements[path] for path in paths],
    )


@checked
def add_lora(
    model: Any,
    *,
    rank: int,
    alpha: float | int,
    targets: Sequence[str],
    key: PRNGKeyArray,
    dropout: float | int = 0.0,
    dtype: DTypeLike | None = None,
) -> Any:
    """`model` with a LoRA adapter beside each weight that `targets` names, starting
    at zero (the model's outputs are unchanged until it trains).

    **Arguments:**

    - `model`: a `TransformerLM` (or any module holding its linears).
    - `rank`: the rank of every update, at most the smaller side of each weight.
    - `alpha`: the update is scaled by `alpha / rank`.
    - `targets`: module names, as described in the module docstring.
    - `key`: a `jax.random.PRNGKey` for the adapters' initial `down` factors.
    - `dropout`: PEFT's `lora_dropout`, applied to an adapter's input when it is
        called with a key; a `TransformerLM` passes its layers no key, so there it
        must be 0.
    - `dtype`: the adapters' dtype; defaults to each weight's.

    **Returns:**

    The adapted model. Train `eqx.filter(model, lora_filter(model))`.

    **Raises:**

    - `ValueError`: a target that names no module, a `rank` that is not a positive
        integer or exceeds a chosen weight's smaller side, a non-positive `alpha`,
        a `dropout` outside `[0, 1)` (or positive on a `TransformerLM`), a weight
        that already has an adapter.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2,
        num_heads=2, max_position_embeddings=16, tie_word_embeddings=True,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    adapted = eqx_embed.add_lora(
        model, rank=4, alpha=8, targets=["q_proj", "v_proj", "embedding"],
        key=jax.random.key(1),
    )
    tokens = jnp.arange(8)
    assert jnp.allclose(adapted(tokens), model(tokens))  # the updates start at zero
    trainable, frozen = eqx.partition(adapted, eqx_embed.lora_filter(adapted))
    ```
    """
    if isinstance(model, TransformerLM) and 0 < dropout < 1:
        raise ValueError(
            f"dropout={dropout!r}: a TransformerLM passes no key to its layers, so an "
            "adapter's dropout would never apply; use dropout=0 (PEFT's default), or "
            "call the LoRALinear layers yourself with a key."
        )
    candidates = dict(linear_paths(model))
    for path in TABLE_PATHS.values():
        if _get(model, path) is not None:
            candidates[path] = _get(model, path).weight
    chosen = chosen_paths(targets, list(candidates))
    replacements = {}
    for path, key_ in zip(chosen, jax.random.split(key, len(chosen)), strict=True):
        node = candidates[path]
        is_table = path in TABLE_PATHS.values()
        if isinstance(node, LoRALinear | LoRATable):
            raise ValueError(f"targets: {path} already has a LoRA adapter.")
        *layers, rows, columns = node.shape if is_table else weight_shape(node)
        base_dtype = jnp.dtype((node if is_table else node.weight).dtype)
        try:
            adapter = low_rank(
                rows,
                columns,
                rank=rank,
                alpha=alpha,
                dropout=dropout,
                dtype=base_dtype if dtype is None else jnp.dtype(dtype),
                table=is_table,
                key=key_,
                layers=tuple(layers),
            )
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if is_table:
            replacements[path + ".weight"] = LoRATable(node, adapter)
        else:
            replacements[path] = LoRALinear(node, adapter)
    return replace_at(model, replacements)


def _merged(base: Any, delta: Any, what: str, dequantize: bool) -> Any:
    """`base + delta` rounded once to the base's dtype; a table kind's base (a
    quantized one) is refused unless `dequantize`."""
    if not is_plain(base):
        if not dequantize:
            raise ValueError(
                f"merge_lora: {what} has a quantized base ({type(base).__name__}); "
                "expected a float one, or dequantize=True to merge into its "
                "dequantized float weights."
            )
        base = as_array(base)
    summed = base.astype(jnp.promote_types(base.dtype, jnp.float32)) + delta
    return summed.astype(base.dtype)


@checked
def merge_lora(model: Any, *, dequantize: bool = False) -> Any:
    """`model` with every adapter folded into its weight: `W + scale * up @ down`,
    rounded once to the weight's dtype, as plain modules again.

    **Arguments:**

    - `model`: a model from `add_lora` (or trained from one).
    - `dequantize`: whether to merge into a quantized base (QLoRA) by dequantizing
        it to float first; otherwise that raises.

    **Returns:**

    The model with plain float weights, which computes what the adapted one did.

    **Raises:**

    - `ValueError`: an adapter on a quantized base without `dequantize=True`.

    **Example:**

    ```python
    import jax
    import jax.numpy as jnp

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "qwen2", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, max_position_embeddings=16,
    )
    model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
    adapted = eqx_embed.add_lora(
        model, rank=2, alpha=4, targets=["mlp.down"], key=jax.random.key(1)
    )
    merged = eqx_embed.merge_lora(adapted)  # plain weights, same logits
    assert jax.tree.structure(merged) == jax.tree.structure(model)
    ```
    """
    merged = {}
    for path, linear in linear_paths(model).items():
        if isinstance(linear, LoRALinear):
            base = linear.base
            weight = _merged(base.weight, linear.adapter.delta(), path, dequantize)
            merged[path] = eqx.tree_at(lambda m: m.weight, base, weight)
    for target, path in TABLE_PATHS.items():
        table = adapted_table(model, target)
        if isinstance(table, LoRATable):
            merged[path + ".weight"] = _merged(
                table.base, table.adapter.delta(), target, dequantize
            )
    return replace_at(model, merged)


def _is_adapter(node: Any) -> bool:
    return isinstance(node, LowRank)


def has_lora(model: Any) -> bool:
    """Whether `model` holds a LoRA adapter."""
    return any(map(_is_adapter, jax.tree.leaves(model, is_leaf=_is_adapter)))


@checked
def lora_filter(model: Any) -> Any:
    """A pytree of booleans shaped as `model`, `True` exactly at the adapters' arrays
    (`up` and `down` of each `LowRank`): `eqx.partition(model, lora_filter(model))`
    splits the trainable adapters from the frozen rest, which then gets no gradient
    and no optimiser state.

    **Arguments:**

    - `model`: an adapted model.

    **Returns:**

    The filter spec.

    **Raises:**

    Nothing: a model without adapters gives a spec of `False` only.

    **Example:**

    ```python
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_embed

    config = eqx_embed.TransformerConfig(
        "gemma", vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1,
        num_heads=2, head_dim=16, max_position_embeddings=16,
    )
    model = eqx_embed.add_lora(
        eqx_embed.TransformerLM(config, key=jax.random.key(0)),
        rank=4, alpha=8, targets=["q_proj", "v_proj"], key=jax.random.key(1),
    )
    trainable, frozen = eqx.partition(model, eqx_embed.lora_filter(model))
    optimizer = optax.adam(1e-3)
    state = optimizer.init(trainable)  # moments for the adapters only

    def loss(trainable, tokens):
        model = eqx.combine(trainable, frozen)
        return model.mean_loss(tokens[:, :-1], tokens[:, 1:])

    grads = eqx.filter_grad(loss)(trainable, jnp.arange(16).reshape(2, 8))
    updates, state = optimizer.update(grads, state)
    trainable = eqx.apply_updates(trainable, updates)
    ```
    """
    return jax.tree.map(
        lambda node: jax.tree.map(lambda _: True, node) if _is_adapter(node) else False,
        model,
        is_leaf=_is_adapter,
    )


TABLE_PATHS = {
    "embedding": "embedding.embedding",
    "reverse_embedding": "embedding.reverse_embedding",
}
"""The tables that `add_lora` adapts, by target name: the paths of their
`Embedding`s in a `TransformerLM`."""


def adapted_table(model: Any, target: str) -> Any:
    """The table (`Embedding.weight`) that `target` names, or `None` (a tied
    model's `reverse_embedding`)."""
    module = _get(model, TABLE_PATHS[target])
    return None if module is None else module.weight


def untie_decode(model: Any) -> Any:
    """A tied `TransformerLM` made untied, the decode's table a copy of the lookup's
    (PEFT's adapter on a tied lookup without `ensure_weight_tying`)."""
    from ._transformer import TransformerLM

    config = dataclasses.replace(model.config, tie_word_embeddings=False)
    table = model.embedding.weight
    embedding = make_embedding(
        config, key=None, weight=table, reverse_weight=jnp.array(table, copy=True)
    )
    return TransformerLM(config, **dict(model.parts(), embedding=embedding))


def with_table_adapter(model: Any, target: str, adapter: LowRank) -> Any:
    """`model` with `adapter` on the table that `target` names."""
    table = adapted_table(model, target)
    return eqx.tree_at(
        lambda m: _get(m, TABLE_PATHS[target]).weight, model, LoRATable(table, adapter)
    )
