"""Runtime shape contracts.

Every public call is wrapped in `checked`: jaxtyping binds the named dimensions of its
annotations and beartype checks them. The check runs in Python, so under `jax.jit` it
runs once per trace and costs nothing at run time. Set `JAXTYPING_DISABLE=1` in the
environment before importing to turn it off.
"""

from beartype import beartype
from jaxtyping import jaxtyped

checked = jaxtyped(typechecker=beartype)


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
