"""The weights of a `TransformerLM` as the config implies them: built fresh, named by
their dotted paths, and checked against modules a user passes in."""

from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
from jaxtyping import Array, Float, PRNGKeyArray

from ..nn._position import PositionEmbedding
from ..nn._reversible import ReversibleEmbedding
from ..nn._rope import RotaryPositionalEmbedding
from ._blocks import DecoderBlock, make_norm
from ._config import TransformerConfig


def make_rope(
    config: TransformerConfig, *, local: bool = False
) -> RotaryPositionalEmbedding | None:
    """The model's RoPE, or with `local=True` Gemma 3's second one for the sliding
    layers (its own theta, unscaled); `None` where the config has no such RoPE."""
    theta = config.rope_local_theta if local else config.rope_theta
    if config.position_embedding != "rope" or theta is None:
        return None
    return RotaryPositionalEmbedding(
        config.head_dim,
        max_seq_len=config.max_position_embeddings,
        theta=theta,
        rotary_dim=config.rotary_dim,
        scaling=None if local else config.rope_scaling,
        out_of_range=config.out_of_range,
    )


def make_embedding(
    config: TransformerConfig,
    *,
    key: PRNGKeyArray | None,
    weight: Float[Array, "vocab hidden"] | None = None,
    reverse_weight: Float[Array, "vocab hidden"] | None = None,
) -> ReversibleEmbedding:
    activation_dtype = jnp.dtype(config.activation_dtype)
    return ReversibleEmbedding(
        config.vocab_size,
        config.hidden_size,
        weight,
        tie_weights=config.tie_word_embeddings,
        reverse_weight=reverse_weight,
        logit_soft_cap=config.final_logit_soft_cap,
        reverse_dtype=activation_dtype,
        dtype=activation_dtype,
        param_dtype=jnp.dtype(config.param_dtype),
        # Unit-variance logits at initialisation for a tied table.
        init=jax.nn.initializers.normal(stddev=config.hidden_size**-0.5),
        out_of_range=config.out_of_range,
        key=key,
    )


def initial_parts(config: TransformerConfig, key: PRNGKeyArray) -> dict[str, Any]:
    """Freshly initialised `embedding`, `blocks` (stacked), `final_norm` and
    `position_embedding` (`None` unless the config's positions are learned)."""
    embedding_key, blocks_key, position_key = jax.random.split(key, 3)
    blocks = eqx.filter_vmap(lambda k: DecoderBlock(config, key=k))(
        jax.random.split(blocks_key, config.num_layers)
    )
    position_embedding = None
    if config.position_embedding == "learned":
        position_embedding = PositionEmbedding(
            config.max_position_embeddings,
            config.hidden_size,
            key=position_key,
            dtype=jnp.dtype(config.activation_dtype),
            param_dtype=jnp.dtype(config.param_dtype),
            out_of_range=config.out_of_range,
        )
    return dict(
        embedding=make_embedding(config, key=embedding_key),
        blocks=blocks,
        final_norm=make_norm(config),
        position_embedding=position_embedding,
    )


def named_leaves(tree: Any) -> dict[str, Any]:
    """The array leaves of `tree` by dotted path, such as `"blocks.mlp.up.weight"`."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(path, simple=True, separator="."): leaf
        for path, leaf in leaves
    }


def given_parts(
    config: TransformerConfig,
    key: PRNGKeyArray | None,
    required: dict[str, Any],
    position_embedding: PositionEmbedding | None,
) -> dict[str, Any]:
    """The modules `TransformerLM.__init__` takes: fresh ones from `key`, or the
    `required` ones (`embedding`, `blocks`, `final_norm`), all given, with
    `position_embedding`."""
    given = [name for name, part in required.items() if part is not None]
    if key is not None and given:
        raise ValueError(f"Pass either `key` or existing modules, not both: {given}.")
    if key is not None:
        return initial_parts(config, key)
    missing = [name for name, part in required.items() if part is None]
    if missing:
        raise ValueError(
            "TransformerLM needs either `key` or all of `embedding`, `blocks` "
            f"and `final_norm`; missing {missing}."
        )
    return dict(required, position_embedding=position_embedding)


def check_parts(config: TransformerConfig, actual: dict[str, Any]) -> None:
    """Raises a `ValueError` naming the first way in which the modules `actual`
    disagree with what `config` implies, or in which they store one array twice."""
    expected = eqx.filter_eval_shape(initial_parts, config, jax.random.key(0))
    expected_leaves, actual_leaves = named_leaves(expected), named_leaves(actual)
    if expected_leaves.keys() != actual_leaves.keys():
        raise ValueError(
            "The modules do not have the weights the config implies: missing "
            f"{sorted(expected_leaves.keys() - actual_leaves.keys())}, unexpected "
            f"{sorted(actual_leaves.keys() - expected_leaves.keys())}."
        )
    for name, want in expected_leaves.items():
        got = actual_leaves[name]
        if (got.shape, got.dtype) != (want.shape, want.dtype):
            raise ValueError(
                f"{name} has shape {got.shape} and dtype {got.dtype}, but the "
                f"config implies {want.shape} and {want.dtype}."
            )
    if jax.tree.structure(expected) != jax.tree.structure(actual):
        raise ValueError(
            "The modules' static settings (dtypes, norm epsilons, soft caps, "
            "activation, residual layout) disagree with the config:\n"
            f"config implies {jax.tree.structure(expected)}\n"
            f"got {jax.tree.structure(actual)}"
        )
    # The weight-tying trap: one array stored as two leaves, which training would
    # then update as two independent copies.
    seen: dict[int, str] = {}
    for name, leaf in actual_leaves.items():
        if isinstance(leaf, jax.core.Tracer):
            continue
        if id(leaf) in seen:
            raise ValueError(
                f"{seen[id(leaf)]} and {name} are the same array stored twice; "
                "training would update them as two copies. To share a table, "
                "tie it (tie_word_embeddings=True) instead."
            )
        seen[id(leaf)] = name
