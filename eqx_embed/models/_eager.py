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
from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp

from ..nn._indices import check_indices

Method = TypeVar("Method", bound=Callable)


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def _as_array(value):
    return jnp.asarray(value) if isinstance(value, list | tuple) else value


def compiled_when_eager(method: Method) -> Method:
    """Runs `method(self, ...)` through `eqx.filter_jit` when no argument (`self`'s
    arrays included) is traced.

    Under the `"error"` index policy the call stays eager: there, concrete token ids
    and positions raise a `ValueError` at once, which a compiled call could only
    report when it runs, as a runtime error. Under `"nan"`, concrete positions are
    checked before the call, as they would be eagerly.
    """
    compiled = eqx.filter_jit(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.config.out_of_range == "error" or _is_traced((self, args, kwargs)):
            return method(self, *args, **kwargs)
        # Python sequences of ids as arrays: `filter_jit` would take them as static
        # values and compile once per distinct sequence.
        args = tuple(_as_array(arg) for arg in args)
        kwargs = {name: _as_array(value) for name, value in kwargs.items()}
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

    return call
