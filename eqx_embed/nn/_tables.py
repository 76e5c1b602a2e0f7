"""Fixed tables (RoPE's cos and sin, sinusoidal position encodings) kept out of
training: stored bit-cast to unsigned integers, or built at trace time per sequence
length and kept by their module."""

from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

_UNSIGNED_OF_WIDTH = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}


def as_bits(table: np.ndarray) -> Array:
    """Reinterprets a float table as unsigned integers of the same width: an array
    leaf that `eqx.is_inexact_array` leaves out of gradients, optimiser state and
    weight decay."""
    return jnp.asarray(table.view(_UNSIGNED_OF_WIDTH[table.dtype.itemsize]))


def frozen(value: Any) -> Any:
    """A hashable copy of a JSON-like value (dicts and lists become tuples)."""
    if isinstance(value, Mapping):
        return tuple(sorted((key, frozen(item)) for key, item in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(frozen(item) for item in value)
    return value


class TablesPerLength:
    """The tables of a module built without `max_seq_len`: for each static sequence
    length, built at trace time in float64 NumPy the first time it is asked for and
    kept in this instance, so a length is computed once (and compiled in as a
    constant), never per call at run time.

    Unlike equinox's global RoPE cache, which is keyed by `(embedding_size, dtype)`
    only, the tables belong to the module that computed them. As a static field it
    compares by the settings that decide the tables (theta and the scaling dict
    included), so that `jit` reuses a compilation only for a module whose tables are
    the same.
    """

    def __init__(self, settings: tuple, build: Callable[[int], Any]):
        self.settings = settings
        self._build = build
        self._by_length: dict[int, Any] = {}

    def __call__(self, seq_len: int) -> Any:
        if seq_len not in self._by_length:
            self._by_length[seq_len] = self._build(seq_len)
        return self._by_length[seq_len]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TablesPerLength) and self.settings == other.settings

    def __hash__(self) -> int:
        return hash(self.settings)
