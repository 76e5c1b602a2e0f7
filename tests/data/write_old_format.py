"""Writes the `tree_serialise_leaves` files read by
`tests/nn/test_reversible_old_files.py` and
`tests/models/test_transformer_old_files.py` with the code of commit 5944356 (before
the package layout), so that today's code is tested against files it did not write:

    git worktree add /tmp/old5944 5944356
    PYTHONPATH=/tmp/old5944 python tests/data/write_old_format.py
    git worktree remove /tmp/old5944

Every array leaf is perturbed away from its initialisation (norm scales of one, zero
biases), so that two leaves swapped on loading change the outputs.
"""

import json
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_embed

HERE = pathlib.Path(__file__).parent
TINY = dict(
    vocab_size=16,
    hidden_size=8,
    intermediate_size=12,
    num_layers=2,
    num_heads=2,
    max_position_embeddings=8,
)
MODELS = {
    "llama": dict(family="llama", **TINY, num_kv_heads=1),
    "gemma2": dict(
        family="gemma2",
        **TINY,
        head_dim=4,
        sliding_window=2,
        attention_logit_soft_cap=2.0,
        final_logit_soft_cap=3.0,
    ),
    "gpt_neox": dict(
        family="gpt_neox", **TINY, tie_word_embeddings=False, partial_rotary_factor=0.5
    ),
}
TOKENS = np.array([3, 1, 4, 1, 5, 9, 2, 6], dtype=np.int32)
HIDDEN = np.linspace(-1.0, 1.0, 3 * 8, dtype=np.float32).reshape(3, 8)


def perturbed(tree, seed):
    leaves, structure = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [
        leaf + 0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
        if eqx.is_inexact_array(leaf)
        else leaf
        for key, leaf in zip(keys, leaves, strict=True)
    ]
    return jax.tree.unflatten(structure, leaves)


def main():
    for name, settings in MODELS.items():
        config = eqx_embed.TransformerConfig(**settings)
        model = eqx_embed.TransformerLM(config, key=jax.random.key(0))
        # The RoPE tables are computed, not trained: keep them exact.
        model = eqx.tree_at(
            lambda m: (m.embedding, m.blocks, m.final_norm),
            model,
            perturbed((model.embedding, model.blocks, model.final_norm), seed=1),
        )
        eqx.tree_serialise_leaves(HERE / f"transformer_{name}.eqx", model)
        (HERE / f"transformer_{name}.json").write_text(
            json.dumps(config.to_dict(), indent=1) + "\n"
        )
        np.save(HERE / f"transformer_{name}_logits.npy", np.asarray(model(TOKENS)))
    for tie_weights in (True, False):
        name = "tied" if tie_weights else "untied"
        embedding = eqx_embed.ReversibleEmbedding(
            16, 8, tie_weights=tie_weights, padding_idx=0, key=jax.random.key(2)
        )
        embedding = perturbed(embedding, seed=3)
        eqx.tree_serialise_leaves(HERE / f"reversible_{name}.eqx", embedding)
        np.save(
            HERE / f"reversible_{name}_logits.npy",
            np.asarray(jax.vmap(embedding.decode)(jnp.asarray(HIDDEN))),
        )


if __name__ == "__main__":
    main()
