"""Rematerialisation of the layer scan (`TransformerConfig.remat_policy`): XLA's
temporary memory and the time of a training step under each policy.

The model: Llama, tied embeddings, 8 layers, width 512, 8 heads, MLP width 1536,
vocabulary 8192; a batch of 4 sequences of 1024 tokens, float32. The step is
`bench_transformer`'s: `eqx.filter_value_and_grad` of `model.mean_loss` and an
`optax.adamw` update, under `eqx.filter_jit`.

- `none`: the backward pass reads every intermediate the forward pass kept, for
    every layer (attention's scores among them: `batch * heads * seq**2` floats a
    layer).
- `layer`: each layer's input only; the backward pass reruns the layer.
- `matmuls`: the outputs of the weight matmuls; norms, activations and attention are
    recomputed.

Issue 22 sets the goal: the `layer` policy's temporaries at most 0.35x of `none`'s.
"""

import dataclasses
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    machine_description,
    report,
    time_interleaved,
)
from bench_transformer import (  # noqa: E402
    OPTIMISER,
    make_train_step,
    train_step_temp_bytes,
)

from eqx_embed import TransformerConfig, TransformerLM  # noqa: E402

FULL_SIZE = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_layers=8,
    num_heads=8,
    batch=4,
    seq=1024,
)
POLICIES = ("none", "layer", "matmuls")
GOAL = 0.35


def mean_loss(model: TransformerLM, tokens, targets):
    return model.mean_loss(tokens, targets)


def main(size: dict | None = None, rounds: int = 5) -> list[Row | Goal]:
    size = dict(FULL_SIZE if size is None else size)
    batch, seq = size.pop("batch"), size.pop("seq")
    config = TransformerConfig("llama", **size, max_position_embeddings=seq)
    print(machine_description())
    print(
        f"Llama, tied: {config.num_layers} layers, width {config.hidden_size}, "
        f"{config.num_heads} heads, MLP {config.intermediate_size}, vocab "
        f"{config.vocab_size}; batch {batch} x seq {seq}, float32"
    )
    data = np.random.default_rng(0).integers(0, config.vocab_size, (batch, seq + 1))
    tokens, targets = data[:, :-1], data[:, 1:]
    step = make_train_step(mean_loss)
    temporaries, steps = {}, {}
    for policy in POLICIES:
        # The same key, so the same weights: only the static config differs.
        model = TransformerLM(
            dataclasses.replace(config, remat_policy=policy), key=jax.random.key(0)
        )
        temporaries[policy] = train_step_temp_bytes(step, model, tokens, targets)
        state = OPTIMISER.init(eqx.filter(model, eqx.is_inexact_array))
        steps[policy] = functools.partial(step, model, state, tokens, targets)
    print("\nremat_temporaries_mib  (XLA's temporary MiB of a training step)")
    rows = []
    for policy, nbytes in temporaries.items():
        ratio = nbytes / temporaries["none"]
        print(f"  {policy:<8}  {nbytes / 2**20:10.1f}  {ratio:6.2f}x")
        rows.append(Row("remat_temporaries_mib", policy, nbytes / 2**20, ratio, "none"))
    rows += report(
        f"Training step (adamw) by remat_policy, {batch * seq} tokens",
        time_interleaved(steps, rounds=rounds),
        baseline="none",
    )
    goal = check_goal(
        "remat_temporaries_mib: layer / none",
        temporaries["layer"] / temporaries["none"],
        GOAL,
        source="issue 22 item 3",
    )
    return [*rows, goal]


if __name__ == "__main__":
    main()
