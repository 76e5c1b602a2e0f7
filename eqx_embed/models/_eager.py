"""Eager calls that run compiled.

A `TransformerLM` called outside `jit` would dispatch every primitive of every layer
from Python, one at a time: about a second per call for a tiny model whose compiled
forward takes a millisecond. `compiled_when_eager` compiles such a call instead, once
per argument shapes, dtypes and static settings (the model's config, Python
arguments), as `eqx.filter_jit` does, and reuses the program for every later call of
the same shapes. Inside the user's own transformation it is a nested `jit`, which
costs nothing under `jit` (XLA inlines it) and makes an eager `jax.vmap(model)` run
compiled too.
"""

import functools
from collections.abc import Callable
from typing import TypeVar

import equinox as eqx
import jax

Method = TypeVar("Method", bound=Callable)


def _is_traced(tree) -> bool:
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


def compiled_when_eager(method: Method) -> Method:
    """Runs `method(self, ...)` through `eqx.filter_jit`.

    Except for an eager call under the `"error"` index policy, which stays eager:
    there, concrete token ids and positions raise a `ValueError` at once, which a
    compiled call could only report when it runs, as a runtime error.
    """
    compiled = eqx.filter_jit(method)

    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if self.config.out_of_range == "error" and not _is_traced((self, args, kwargs)):
            return method(self, *args, **kwargs)
        return compiled(self, *args, **kwargs)

    return call
