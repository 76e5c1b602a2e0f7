"""Rematerialisation of the layer scan: what a training step keeps of each layer's
forward pass for the backward pass, and what it recomputes there.

- `"none"`: every intermediate the backward pass needs is kept, for every layer.
- `"layer"`: only each layer's input is kept (the scan's carry); the backward pass
    reruns the whole layer (MaxText's `remat_policy="full"`, penzai's and Flax's
    gradient checkpointing of each block).
- `"matmuls"`: the outputs of the matmuls with the weights (the projections and the
    MLP's) are kept, and the rest (norms, activations, attention scores) is recomputed:
    `jax.checkpoint_policies.dots_with_no_batch_dims_saveable`, MaxText's `"minimal"`.

The policy is applied inside the scan, to one layer's step, so the kept values of a
layer are its own whatever the depth.
"""

import typing
from collections.abc import Callable
from typing import Literal, TypeVar, get_args

import jax

RematPolicy = Literal["none", "layer", "matmuls"]
"""What the layer scan keeps for the backward pass (see the module's docstring)."""

REMAT_POLICIES: tuple[str, ...] = get_args(RematPolicy)

F = TypeVar("F", bound=Callable)


def check_remat_policy(policy: str) -> None:
    if policy not in REMAT_POLICIES:
        raise ValueError(
            f"remat_policy must be one of {REMAT_POLICIES}, got {policy!r}."
        )


def rematerialised(step: F, policy: RematPolicy) -> F:
    """`step`, one layer of the scan, under `policy`."""
    if policy == "none":
        return step
    saveable = {
        "layer": jax.checkpoint_policies.nothing_saveable,
        "matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[policy]
    # Inside a scan, the loop already keeps XLA from merging the recomputation with
    # the forward pass, so the barriers of `prevent_cse` would only cost.
    return typing.cast(F, jax.checkpoint(step, policy=saveable, prevent_cse=False))
