"""Eager calls that run compiled.

A `TransformerLM` called outside `jit` would dispatch its primitives from Python one
at a time, and trace and compile its inner `jit`s (the scan over layers) again on
every call: seconds per call for a tiny model whose compiled forward takes a
millisecond (`benchmarks/bench_eager.py`). `compiled_when_eager` compiles such a call
instead, once per argument shapes, dtypes and static settings (the model's config,
Python arguments), as `eqx.filter_jit` does, and reuses the program for every later
call of the same shapes. Inside the user's own transformation (`jit`, `grad`, `vmap`,
`make_jaxpr`), the method runs as written, so the program the user traces is the one
they wrote: wrap an eager `jax.vmap(model)` in `eqx.filter_jit` to compile it.
"""

import functools
import typing
from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.core
import numpy as np

from ..nn._indices import check_indices

Method = TypeVar("Method", bound=Callable)


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _has_sequences(args, kwargs) -> bool:
    """Whether an argument is a Python list or tuple (of ids), which `filter_jit`
    would take as a static value, compiling once per distinct sequence."""
    return any(isinstance(value, list | tuple) for value in (*args, *kwargs.values()))


def _has_narrowed_integers(args, kwargs) -> bool:
    """Whether an argument is a NumPy integer array that JAX would narrow (int64 or
    uint64 without x64) when it becomes an argument of a compiled call: checked
    eagerly instead, in its own dtype, so that a wide id cannot wrap onto a row."""
    return any(
        isinstance(value, np.ndarray | np.integer)
        and np.issubdtype(value.dtype, np.integer)
        and jax.dtypes.canonicalize_dtype(value.dtype) != value.dtype
        for value in (*args, *kwargs.values())
    )


def compiled_when_eager(method: Method) -> Method:
    """Runs `method(self, ...)` through `eqx.filter_jit` when no argument (`self`'s
    arrays included) is traced.

    Under the `"error"` index policy the call stays eager: there, concrete token ids
    and positions raise a `ValueError` at once, which a compiled call could only
    report when it runs, as a runtime error. Python sequences of ids stay eager too
    (as static values they would compile once per sequence), and so do NumPy ids of
    a dtype that JAX would narrow (int64 without x64), which are checked in their
    own dtype eagerly. Under `"nan"`,
    concrete positions are checked before the call, as they would be eagerly.
    """
    compiled = eqx.filter_jit(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if (
            self.config.out_of_range == "error"
            or _has_sequences(args, kwargs)
            or _has_narrowed_integers(args, kwargs)
            or _is_traced((self, args, kwargs))
        ):
            return method(self, *args, **kwargs)
        positions = kwargs.get("token_positions")
        if positions is not None:
            # Positions known now raise now, whatever the policy (as the model's RoPE
            # does): check them here, before the compiled call makes them traced.
            check_indices(
                positions,
                size=self.config.max_position_embeddings,
                out_of_range="error",
                name="position",
                negative_from_end=False,
            )
        return compiled(self, *args, **kwargs)

    return typing.cast(Method, call)
