"""Fixed tables (RoPE's cos and sin, sinusoidal position encodings) kept out of
training: stored bit-cast to unsigned integers, or built at trace time per sequence
length and kept by their module. And static settings made hashable: `frozen`, and
`FrozenMapping`, a read-only dict of them."""

import copy
from collections.abc import Callable, Iterator, Mapping
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


class FrozenMapping(Mapping[str, Any]):
    """A read-only, hashable dict of JSON values, so that a config holding one can be
    a static field. It hashes by `frozen`, the library's one freezing of JSON
    values."""

    def __init__(self, values: Mapping[str, Any]):
        self._values = copy.deepcopy(dict(values))

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __hash__(self) -> int:
        return hash(frozen(self._values))

    def __repr__(self) -> str:
        return repr(self._values)

    def to_dict(self) -> dict[str, Any]:
        """A plain, JSON-able dict."""
        return copy.deepcopy(self._values)
