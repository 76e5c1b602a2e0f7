"""Runtime contracts: the shape checks of every public call, and the checks of
positive sizes and settings.

Every public call is wrapped in `checked`: jaxtyping binds the named dimensions of its
annotations and beartype checks them. The check runs in Python, so under `jax.jit` it
runs once per trace and costs nothing at run time. Set `JAXTYPING_DISABLE=1` in the
environment before importing to turn it off.
"""

import math
import numbers
from typing import Any

from beartype import beartype
from jaxtyping import jaxtyped

checked = jaxtyped(typechecker=beartype)

# The most bytes a table built on the host from a size argument may take (RoPE's
# tables, built in float64 from `max_position_embeddings`; the rows that
# `pad_vocabulary` appends): past it, a typo (10**9 positions, a multiple of 10**12)
# would exhaust the memory rather than fail.
MAX_TABLE_BYTES = 4 * 2**30


def check_feature_size(array, expected: int, *, name: str, owner: str) -> None:
    """Raises a `ValueError` naming `name` unless `array`'s last axis is `expected`.

    For widths that the annotations cannot bind, because the size lives in a module
    field rather than in another argument.
    """
    if array.shape[-1:] != (expected,):
        raise ValueError(
            f"{name} must have a last axis of size {expected} (the {owner}), "
            f"got shape {tuple(array.shape)}."
        )


def check_positive(name: str, value: Any, *, integer: bool = False) -> None:
    """Raises a `ValueError` naming `name` unless `value` is a positive integer
    (`integer=True`) or a positive finite real number. Booleans are neither."""
    kind = numbers.Integral if integer else numbers.Real
    if (
        isinstance(value, bool)
        or not isinstance(value, kind)
        or not math.isfinite(value)
        or not float(value) > 0
    ):
        expected = "a positive integer" if integer else "a positive finite number"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")
