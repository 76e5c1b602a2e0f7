"""Eager calls of a tiny TransformerLM (what a notebook does) against the same calls
under the user's `eqx.filter_jit`.

The model: Llama family, 2 layers, width 64, 4 query heads sharing 2 key/value heads,
MLP width 192, vocabulary 256 (about 115k parameters), one sequence of 22 tokens,
float32. Every case is a shape compiled before (the harness calls each case once
before timing), so an eager call here is what every call after a notebook's first
costs.

Cases:

- forward: `model(tokens)`, eagerly and under `eqx.filter_jit`.
- loss: `model.loss(tokens, targets)`, eagerly and under `eqx.filter_jit`.
- `jit disabled`: the eager call under `jax.disable_jit()`, every primitive dispatched
  from Python. (Before TransformerLM compiled its public methods itself, a plain eager
  call was slower still: the scan over layers and the other inner `jit`s were traced
  and compiled again on every call.)

Goal: an eager call within 5x of the jitted one.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from _harness import (  # noqa: E402
    Goal,
    Row,
    check_goal,
    machine_description,
    report,
    time_interleaved,
)

from eqx_embed import TransformerConfig, TransformerLM  # noqa: E402

SEQ_LEN = 22
GOAL_RATIO = 5.0  # issue 15


def build() -> tuple[TransformerLM, jax.Array, jax.Array]:
    config = TransformerConfig(
        family="llama",
        vocab_size=256,
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        max_position_embeddings=64,
    )
    model = TransformerLM(config, key=jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (SEQ_LEN + 1,), 0, 256)
    return model, tokens[:-1], tokens[1:]


def jit_disabled(fn):
    def run():
        with jax.disable_jit():
            return fn()

    return run


def eager_goal(call: str, medians: dict[str, float]) -> Goal:
    return check_goal(
        f"eager {call} / under filter_jit, {SEQ_LEN} tokens",
        medians[f"{call}, eager"] / medians[f"{call}, filter_jit"],
        GOAL_RATIO,
        source="issue 15",
    )


def main() -> list[Row | Goal]:
    model, tokens, targets = build()
    jitted_forward = eqx.filter_jit(lambda m, t: m(t))
    jitted_loss = eqx.filter_jit(lambda m, t, y: m.loss(t, y))
    parameters = sum(
        leaf.size for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_inexact_array))
    )
    print(f"{parameters} parameters, {SEQ_LEN} tokens")
    rows, goals = [], []
    forward = {
        "forward, filter_jit": lambda: jitted_forward(model, tokens),
        "forward, eager": lambda: model(tokens),
        "forward, eager, jit disabled": jit_disabled(lambda: model(tokens)),
    }
    medians = time_interleaved(forward, rounds=5, min_round_seconds=0.02)
    rows += report("eager forward", medians, baseline="forward, filter_jit")
    goals.append(eager_goal("forward", medians))
    loss = {
        "loss, filter_jit": lambda: jitted_loss(model, tokens, targets),
        "loss, eager": lambda: model.loss(tokens, targets),
        "loss, eager, jit disabled": jit_disabled(lambda: model.loss(tokens, targets)),
    }
    medians = time_interleaved(loss, rounds=5, min_round_seconds=0.02)
    rows += report("eager loss", medians, baseline="loss, filter_jit")
    goals.append(eager_goal("loss", medians))
    assert jnp.isfinite(model.loss(tokens, targets)).all()
    return rows + goals


if __name__ == "__main__":
    print(machine_description())
    main()
