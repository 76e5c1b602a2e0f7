"""Learns a bigram model of its own source: a tied ReversibleEmbedding, with optax.

Each byte predicts the next through `decode(lookup(byte))`, the smallest model whose
lookup and decode share one table. Prints the loss every 50 steps, in bits per byte
(as the training example does).

    python examples/quickstart.py [--steps 300]
"""

import argparse
import math
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqx_embed


def main(steps: int = 300) -> None:
    data = jnp.frombuffer(pathlib.Path(__file__).read_bytes(), dtype=jnp.uint8)
    tokens, targets = data[:-1].astype(jnp.int32), data[1:].astype(jnp.int32)
    # Scaled so that the initial logits are of order one (see default_embedding_init).
    init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
    model = eqx_embed.ReversibleEmbedding(256, 32, init=init, key=jax.random.key(0))
    optimiser = optax.adamw(1e-2)
    state = optimiser.init(eqx.filter(model, eqx.is_inexact_array))

    def loss_fn(model):
        logits = jax.vmap(lambda token: model.decode(model(token)))(tokens)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
        updates, state = optimiser.update(
            grads, state, eqx.filter(model, eqx.is_inexact_array)
        )
        return eqx.apply_updates(model, updates), state, loss

    for i in range(steps):
        model, state, loss = step(model, state)
        if i % 50 == 0 or i == steps - 1:
            bits = float(loss) / math.log(2)  # The loss is in nats.
            print(f"step {i:4d}  loss {bits:.3f} bits/byte")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
